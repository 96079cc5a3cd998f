"""CTM core: the two-time backbone (CTMUNet2DModel), init from an EDM teacher, the trajectory function G(x, t, s)
and the (t, u, s) time sampler."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gensample.core.parametrization import TrajectoryFunction

from gensample.core.sigmas import karras_sigmas_descending, heun_step_probabilities, sample_ctm_times
from gensample.core.parametrization import EDMDenoiser
from gensample.models import build_unet
from gensample.models.ctm_unet import CTMUNet2DModel, init_from_teacher
from gensample.methods.teachers import as_denoiser
@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def teacher_unet(preset: str = "tiny", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_unet(preset, sample_size=8, **overrides).eval()


def perturb_s_branch(model: CTMUNet2DModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.s_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------------
# CTMUNet2DModel and init_from_teacher
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("digits", {"num_class_embeds": 10})])
def test_init_from_teacher_student_g_equals_teacher_denoiser(preset, overrides):
    teacher = teacher_unet(preset, **overrides)
    student = CTMUNet2DModel(**{k: v for k, v in teacher.config.items() if not k.startswith("_")}).eval()
    perturb_s_branch(student)  # init_from_teacher itself must zero the s-branch output
    report = init_from_teacher(student, teacher)
    assert report["not_in_teacher"] == ["s_embedding.linear_1.bias", "s_embedding.linear_1.weight",
                                        "s_embedding.linear_2.bias", "s_embedding.linear_2.weight"]
    x = torch.randn(3, 1, 8, 8, generator=gen(0))
    t = torch.tensor([0.05, 1.0, 60.0], dtype=torch.float64)
    kwargs = {"class_labels": torch.tensor([1, 4, 9])} if overrides else {}
    G = TrajectoryFunction(student)
    with torch.no_grad():
        D = EDMDenoiser(teacher)(x, t, **kwargs)
        for s in (t, t / 3, torch.full_like(t, 0.002)):
            assert torch.equal(G.g(x, t, s, **kwargs), D)  # bit-exact: the s-branch adds exactly zero
        assert torch.equal(G.denoise(x, t, **kwargs), D)
        # the copied forward equals UNet2DModel.forward when the s-branch is zero
        c = torch.tensor([10.0, -50.0, 300.0])
        assert torch.equal(student(x, c, s_timestep=-c, **kwargs).sample, teacher(x, c, **kwargs).sample)


def test_s_branch_conditions_the_output_and_none_means_s_equals_t():
    student = CTMUNet2DModel.from_teacher(teacher_unet())
    perturb_s_branch(student)
    x = torch.randn(2, 1, 8, 8, generator=gen(1))
    t = torch.tensor([100.0, -200.0])
    with torch.no_grad():
        a = student(x, t, s_timestep=t - 300).sample
        b = student(x, t, s_timestep=t - 600).sample
        assert (a - b).abs().max() > 1e-4
        assert torch.equal(student(x, t).sample, student(x, t, s_timestep=t).sample)
        # a scalar s broadcasts over the batch
        assert torch.equal(student(x, t, s_timestep=5.0).sample,
                           student(x, t, s_timestep=torch.tensor([5.0, 5.0])).sample)


def test_ctm_unet_save_load_bit_exact(tmp_path):
    student = CTMUNet2DModel.from_teacher(teacher_unet())
    perturb_s_branch(student)
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "CTMUNet2DModel"
    loaded = CTMUNet2DModel.from_pretrained(tmp_path).eval()
    sd_a, sd_b = student.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = torch.randn(2, 1, 8, 8, generator=gen(2))
    with torch.no_grad():
        expected = student.eval()(x, 50.0, s_timestep=-20.0).sample
        assert torch.equal(loaded(x, 50.0, s_timestep=-20.0).sample, expected)


def test_student_in_edm_pipeline_samples_like_teacher_and_reloads(tmp_path):
    from gensample.pipelines.pipeline_edm import EDMPipeline
    from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler

    teacher = EDMPipeline(unet=teacher_unet(), scheduler=EDMHeunScheduler())
    student = EDMPipeline(unet=CTMUNet2DModel.from_teacher(teacher.unet).eval(), scheduler=EDMHeunScheduler())
    student.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["gensample.models.ctm_unet", "CTMUNet2DModel"]
    loaded = EDMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.unet, CTMUNet2DModel)
    images = []
    for p in (teacher, student, loaded):
        p.set_progress_bar_config(disable=True)
        images.append(p(batch_size=2, num_inference_steps=3, generator=gen(0), output_type="pt").images)
    assert torch.equal(images[0], images[1]) and torch.equal(images[1], images[2])


def test_init_from_teacher_rejects_other_architectures():
    student = CTMUNet2DModel.from_teacher(teacher_unet("tiny"))
    with pytest.raises(ValueError, match="from_teacher"):
        init_from_teacher(student, teacher_unet("digits-small"))
    with pytest.raises(ValueError, match="CTMUNet2DModel"):
        init_from_teacher(teacher_unet(), teacher_unet())
    with pytest.raises(ValueError, match="positional"):
        CTMUNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       time_embedding_type="fourier")


# ------------------------------------------------------------------------------------------------------------------
# TrajectoryFunction
# ------------------------------------------------------------------------------------------------------------------
def test_G_at_s_equals_t_is_identity_exactly():
    student = CTMUNet2DModel.from_teacher(teacher_unet())
    perturb_s_branch(student)
    G = TrajectoryFunction(student)
    x = torch.randn(4, 1, 8, 8, generator=gen(3)) * 5
    t = torch.tensor([0.002, 0.3, 7.0, 80.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(G(x, t, t), x)
        assert torch.equal(G(x, 2.5, 2.5), x)  # Python floats too
        assert not torch.equal(G(x, t, t / 2), x)


def test_G_formula_with_hand_scalings():
    seen = {}
    F = torch.full((2, 1, 2, 2), 0.7, dtype=torch.float64)

    def backbone(x_in, t_noise, s_timestep=None, **kw):
        seen.update(x_in=x_in, t_noise=t_noise, s_noise=s_timestep, kw=kw)
        return F

    G = TrajectoryFunction(backbone)
    x = torch.randn(2, 1, 2, 2, generator=gen(4), dtype=torch.float64)
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.5, 0.002], dtype=torch.float64)
    out = G(x, t, s, class_labels="y")
    # EDM scalings at t (hand values, sigma_data = 0.5): t = 1 -> c_skip .2, c_out .5/sqrt(1.25), c_in 1/sqrt(1.25);
    # t = 2 -> c_skip .25/4.25, c_out = c_in = 1/sqrt(4.25)
    c_skip = torch.tensor([0.2, 0.25 / 4.25], dtype=torch.float64).view(-1, 1, 1, 1)
    c_out = torch.tensor([0.5 / math.sqrt(1.25), 1 / math.sqrt(4.25)], dtype=torch.float64).view(-1, 1, 1, 1)
    c_in = torch.tensor([1 / math.sqrt(1.25), 1 / math.sqrt(4.25)], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_in"], c_in * x, rtol=1e-14, atol=0)
    torch.testing.assert_close(seen["t_noise"], torch.tensor([0.0, 250 * math.log(2.0)]), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(seen["s_noise"], torch.tensor([250 * math.log(0.5), 250 * math.log(0.002)]),
                               rtol=1e-6, atol=1e-4)
    assert seen["kw"] == {"class_labels": "y"}
    g = c_skip * x + c_out * 0.7
    ratio = torch.tensor([0.5, 0.001], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, ratio * x + (1 - ratio) * g, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(G.g(x, t, s), g, rtol=1e-13, atol=1e-14)
    # G(x, t, 0) is the full jump to the data end: g itself
    torch.testing.assert_close(G(x, t, 0.0), c_skip * x + c_out * 0.7, rtol=1e-13, atol=1e-14)


def test_G_rejects_bad_times():
    G = TrajectoryFunction(lambda x, t, s_timestep=None: x)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="0 <= s <= t"):
        G(x, 1.0, 2.0)
    with pytest.raises(ValueError, match="0 <= s <= t"):
        G(x, 1.0, -0.1)
    with pytest.raises(ValueError, match="t must be > 0"):
        G(x, 0.0, 0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        TrajectoryFunction(lambda x, t: x, sigma_data=-1)


def test_as_denoiser_of_trajectory_function_is_g_t_t():
    student = CTMUNet2DModel.from_teacher(teacher_unet())
    perturb_s_branch(student)
    G = TrajectoryFunction(student)
    D = as_denoiser(G)
    x = torch.randn(2, 1, 8, 8, generator=gen(5))
    with torch.no_grad():
        assert torch.equal(D(x, 3.0), G.g(x, 3.0, 3.0))


# ------------------------------------------------------------------------------------------------------------------
# (t, u, s) sampler
# ------------------------------------------------------------------------------------------------------------------
def test_ctm_grid_is_the_cifar_grid():
    grid = karras_sigmas_descending(18)
    # reference sec. 1.1, printed to 2-4 significant digits
    printed = [80, 57.59, 40.79, 28.37, 19.35, 12.91, 8.40, 5.32, 3.26, 1.92, 1.09, 0.585, 0.296, 0.140, 0.060,
               0.023, 0.0075, 0.002]
    np.testing.assert_allclose(grid.numpy(), printed, rtol=2e-2)
    assert float(grid[0]) == pytest.approx(80.0, rel=1e-14) and float(grid[-1]) == pytest.approx(0.002, rel=1e-12)


def test_heun_step_probabilities():
    p = heun_step_probabilities(4)
    torch.testing.assert_close(p, torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 10)
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(heun_step_probabilities(3, multiplier=0.0), uniform)
    with pytest.raises(ValueError):
        heun_step_probabilities(0)


def _expected_joint(N: int, K: int) -> dict[tuple[int, int, int], float]:
    """P(k, n, m) from the definition (reference sec. 1.3): p(k) = k / sum(1..K), n uniform on {0..N-1-k},
    m uniform on {n+k..N-1}."""
    total = K * (K + 1) / 2
    return {(k, n, m): (k / total) / (N - k) / (N - n - k)
            for k in range(1, K + 1) for n in range(N - k) for m in range(n + k, N)}


def test_time_sampler_joint_distribution_chi_square():
    N, K, draws = 7, 5, 12000
    g = gen(0)
    counts = Counter()
    for _ in range(draws // 4):  # 4 samples per call share k: test k on calls and (n, m) given k on samples
        times = sample_ctm_times(4, num_sigmas=N, max_heun_steps=K, generator=g)
        k = times.num_heun_steps
        assert torch.equal(times.u_index, times.t_index + k)
        for n, m in zip(times.t_index.tolist(), times.s_index.tolist()):
            counts[(k, n, m)] += 1
    expected = _expected_joint(N, K)
    assert set(counts) <= set(expected)  # never outside the support (s below u, u beyond the grid, ...)
    # k: one draw per call
    k_calls = np.array([sum(c for (k, _, _), c in counts.items() if k == kk) / 4 for kk in range(1, K + 1)])
    p_k = np.arange(1, K + 1) / (K * (K + 1) / 2)
    assert chisquare(k_calls, p_k * k_calls.sum()).pvalue > 1e-3
    assert chisquare(k_calls, np.full(K, k_calls.sum() / K)).pvalue < 1e-6  # a uniform k would be caught
    # (n, m) given k: per-sample, independent
    for kk in range(1, K + 1):
        cells = [c for c in expected if c[0] == kk]
        obs = np.array([counts[c] for c in cells], dtype=float)
        exp = np.array([expected[c] for c in cells])
        exp = exp / exp.sum() * obs.sum()
        assert chisquare(obs, exp).pvalue > 1e-4, kk
    # power: the same counts are rejected against a wrong law (all admissible (k, n, m) equally likely)
    cells = list(expected)
    obs = np.array([counts[c] for c in cells], dtype=float)
    wrong = np.array([1.0 / len(cells)] * len(cells)) * obs.sum()
    assert chisquare(obs, wrong).pvalue < 1e-6


def test_time_sampler_values_ranges_and_errors():
    times = sample_ctm_times(512, num_sigmas=18, max_heun_steps=17, num_heun_steps=3, generator=gen(1))
    grid = karras_sigmas_descending(18)
    assert times.num_heun_steps == 3
    assert torch.equal(times.t, grid[times.t_index]) and torch.equal(times.u, grid[times.u_index])
    assert torch.equal(times.s, grid[times.s_index])
    assert bool((times.t > times.u).all() and (times.u >= times.s).all() and (times.s >= 0.002 - 1e-15).all())
    assert int(times.t_index.max()) <= 18 - 1 - 3 and int(times.t_index.min()) == 0
    assert bool((times.s == times.u).any()) and bool((times.s_index == 17).any())
    a = sample_ctm_times(8, generator=gen(5))
    b = sample_ctm_times(8, generator=gen(5))
    assert a.num_heun_steps == b.num_heun_steps and torch.equal(a.s_index, b.s_index)
    for kwargs, match in [({"batch_size": 0}, "batch_size"), ({"num_sigmas": 1}, "num_sigmas"),
                          ({"max_heun_steps": 18}, "max_heun_steps"), ({"max_heun_steps": 0}, "max_heun_steps"),
                          ({"num_heun_steps": 18}, "num_heun_steps")]:
        with pytest.raises(ValueError, match=match):
            sample_ctm_times(**{"batch_size": 4, **kwargs})
