"""CTM training, gamma-sampling scheduler and pipeline (Kim et al., ICLR 2024; reference
ctm-scott-nct-lcsc-video.md sec. 1.3-1.7): CTMTraining, CTMScheduler, CTMPipeline, the discriminator and
``gensample train ctm``. Tiny 8x8 one-channel UNets, one thread."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from gensample.core.parametrization import TrajectoryFunction

from gensample.core.sigmas import karras_sigmas_descending
from gensample.core.parametrization import EDMDenoiser, edm_scalings
from gensample.kernels import ctm_gamma_step
from gensample.methods.ctm import CTMTraining, adaptive_weight, teacher_heun_solve
from gensample.models import build_unet
from gensample.models.ctm_unet import CTMUNet2DModel
from gensample.models.discriminator import Discriminator, diff_augment
from gensample.core.parametrization import consistency_scalings, input_scaling, noise_conditioning
from gensample.pipelines.pipeline_consistency import ConsistencyPipeline
from gensample.pipelines.pipeline_ctm import CTMPipeline
from gensample.pipelines.pipeline_edm import EDMPipeline
from gensample.core.sampling import heun_solve, sample_heun
from gensample.core.sigmas import edm_sigmas
from gensample.schedulers import ConsistencyScheduler
from gensample.schedulers.scheduling_ctm import CTMScheduler, CTMSchedulerOutput
from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler
from gensample.core.sigmas import karras_sigmas
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def edm_teacher(seed: int = 0, **overrides) -> EDMPipeline:
    torch.manual_seed(seed)
    pipe = EDMPipeline(unet=build_unet("tiny", sample_size=8, **overrides).eval(), scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ctm_unet(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> CTMUNet2DModel:
    """A CTM backbone from a tiny teacher with a non-zero s-branch (so the jump target s changes F)."""
    unet = CTMUNet2DModel.from_teacher(edm_teacher(seed, **overrides).unet).eval()
    g = gen(seed + 100)
    with torch.no_grad():
        for p in unet.s_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return unet.to(dtype)


def ctm_pipe(seed: int = 0, dtype: torch.dtype = torch.float64, **scheduler_kwargs) -> CTMPipeline:
    pipe = CTMPipeline(unet=ctm_unet(seed, dtype), scheduler=CTMScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def collect_latents(store: list):
    def callback(pipe, i, t, kwargs):
        store.append(kwargs["latents"].clone())
        return {}
    return callback


# ------------------------------------------------------------------------------------------------------------------
# CTMScheduler
# ------------------------------------------------------------------------------------------------------------------
def test_scheduler_schedule_jump_targets_and_state():
    sched = CTMScheduler()
    sched.set_timesteps(4, gamma=0.3)
    # CTM's karras_sample grid: the 5-point Karras grid from sigma_max to sigma_min, one jump per interval
    expected = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX, 7.0).flip(0)
    torch.testing.assert_close(sched.sigmas, expected, rtol=1e-15, atol=0)
    assert sched.sigmas[-1] == SIGMA_MIN and sched.init_noise_sigma == SIGMA_MAX
    hand = [math.sqrt(1 - 0.3**2) * (float(sched.sigmas[i + 1]) - SIGMA_MIN) + SIGMA_MIN for i in range(4)]
    torch.testing.assert_close(sched.jump_sigmas, torch.tensor(hand, dtype=torch.float64), rtol=1e-13, atol=0)
    torch.testing.assert_close(sched.timesteps, (250 * torch.log(expected[:4])).float())
    torch.testing.assert_close(sched.s_timesteps, (250 * torch.log(torch.tensor(hand))).float())
    # gamma = 0: s_i = sigma_{i+1} exactly; gamma = 1: s_i = sigma_min exactly (the config gamma is the default)
    sched0 = CTMScheduler(gamma=0.0)
    sched0.set_timesteps(sigmas=[80.0, 5.0, 0.5])
    assert sched0.jump_sigmas.tolist() == [5.0, 0.5, SIGMA_MIN]
    sched0.set_timesteps(sigmas=[80.0, 5.0, 0.5], gamma=1.0)
    assert sched0.jump_sigmas.tolist() == [SIGMA_MIN] * 3 and sched0.gamma == 1.0
    # grid indices into the N-point training grid (N = 18: CTM's CIFAR grid)
    sched0.set_timesteps(timesteps=[9, 0])
    torch.testing.assert_close(sched0.sigmas, torch.cat([karras_sigmas_descending(18)[[0, 9]], torch.tensor([SIGMA_MIN],
                                                         dtype=torch.float64)]))
    # jump_target / s_timestep follow the step counter; stepping past the end is an error
    sched.set_timesteps(2, gamma=0.5)
    x = torch.randn(2, 1, 4, 4, generator=gen(0))
    assert sched.jump_target() == sched.jump_sigmas[0] and sched.s_timestep() == sched.s_timesteps[0]
    out = sched.step(torch.zeros_like(x), sched.timesteps[0], x, generator=gen(1))
    assert isinstance(out, CTMSchedulerOutput) and sched.step_index == 1
    assert sched.jump_target() == sched.jump_sigmas[1]
    sched.step(torch.zeros_like(x), sched.timesteps[1], x)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros_like(x), sched.timesteps[1], x)


def test_scheduler_step_is_the_gamma_formula():
    """step: G = (s/t) x + (1 - s/t)(c_skip x + c_out F), then + sqrt(sigma_next^2 - s^2) z (hand scalings)."""
    sched = CTMScheduler()
    sched.set_timesteps(sigmas=[10.0, 0.5], gamma=0.6)
    x = torch.randn(2, 1, 4, 4, generator=gen(0), dtype=torch.float64) * 10
    F = torch.randn(2, 1, 4, 4, generator=gen(1), dtype=torch.float64)
    prev, denoised = sched.step(F, sched.timesteps[0], x, generator=gen(2), return_dict=False)
    t, t_next = 10.0, 0.5
    s = math.sqrt(1 - 0.36) * (t_next - SIGMA_MIN) + SIGMA_MIN
    c_skip, c_out = 0.25 / (t**2 + 0.25), t * 0.5 / math.sqrt(t**2 + 0.25)
    G = (s / t) * x + (1 - s / t) * (c_skip * x + c_out * F)
    z = torch.randn(2, 1, 4, 4, generator=gen(2), dtype=torch.float64)
    torch.testing.assert_close(denoised, G, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prev, G + math.sqrt(t_next**2 - s**2) * z, rtol=1e-12, atol=1e-12)
    # the last step lands on sigma_min and adds no noise
    prev2, denoised2 = sched.step(F, sched.timesteps[1], prev, generator=gen(3), return_dict=False)
    assert torch.equal(prev2, denoised2)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "a", None])
def test_scheduler_rejects_bad_gamma(bad):
    if bad is not None:
        with pytest.raises(ValueError, match="gamma"):
            CTMScheduler(gamma=bad)
        with pytest.raises(ValueError, match="gamma"):
            CTMScheduler().set_timesteps(2, gamma=bad)
    else:  # None in set_timesteps means the config gamma: valid
        CTMScheduler(gamma=0.25).set_timesteps(2, gamma=None)


def test_scheduler_rejects_bad_schedules():
    sched = CTMScheduler()
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(n)
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(2, sigmas=[80.0, 1.0])
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(sigmas=[1.0, 80.0])
    with pytest.raises(ValueError, match=r"\(sigma_min, sigma_max\]"):
        sched.set_timesteps(sigmas=[100.0, 1.0])
    with pytest.raises(ValueError, match="grid indices"):
        sched.set_timesteps(timesteps=[0, 17])
    with pytest.raises(ValueError, match="model_output shape"):
        sched.set_timesteps(1)
        sched.step(torch.zeros(1, 1, 4, 4), sched.timesteps[0], torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------------------------------
# gamma-sampling through the pipeline vs the reference algorithm, gamma = 1 vs CM multistep, gamma = 0 noise-free
# ------------------------------------------------------------------------------------------------------------------
def reference_gamma_sampling(G, z: torch.Tensor, sigmas: list[float], gamma: float,
                             generator: torch.Generator) -> list[torch.Tensor]:
    """sony/ctm ``sample_gamma_multistep`` transcribed (reference sec. 1.7) over levels sigmas + [sigma_min]:
    s_i = sqrt(1 - gamma^2)(sigma_{i+1} - sigma_min) + sigma_min;
    x = G(x, sigma_i, s_i) + sqrt(sigma_{i+1}^2 - s_i^2) z, no noise on the final step. Returns every state."""
    levels = list(sigmas) + [SIGMA_MIN]
    x, states = levels[0] * z, []
    for i in range(len(sigmas)):
        s = math.sqrt(1 - gamma**2) * (levels[i + 1] - SIGMA_MIN) + SIGMA_MIN
        x = G(x, levels[i], s)
        if i < len(sigmas) - 1 and gamma > 0:
            x = x + math.sqrt(levels[i + 1] ** 2 - s**2) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        states.append(x)
    return states


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_pipeline_gamma_sampling_equals_reference_algorithm(gamma):
    pipe = ctm_pipe()
    G = pipe.trajectory_function
    z = torch.randn(3, 1, 8, 8, generator=gen(5), dtype=torch.float64)
    sigmas = [80.0, 6.0, 0.7, 0.05]
    got: list = []
    g_pipe, g_ref = gen(9), gen(9)
    with torch.no_grad():
        image = pipe(batch_size=3, sigmas=sigmas, gamma=gamma, latents=z, generator=g_pipe, output_type="pt",
                     callback_on_step_end=collect_latents(got)).images
        expected = reference_gamma_sampling(G, z, sigmas, gamma, g_ref)
    assert len(got) == 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(image, (expected[-1] / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    # the generator was used exactly as often as the reference (0 draws for gamma = 0, n - 1 = 3 otherwise)
    assert torch.equal(g_pipe.get_state(), g_ref.get_state())
    untouched = torch.equal(g_pipe.get_state(), gen(9).get_state())
    assert untouched == (gamma == 0.0)
    # sensitivity: another gamma gives other samples (the comparison can fail)
    with torch.no_grad():
        other = reference_gamma_sampling(G, z, sigmas, 0.6, gen(9))
    assert (other[-1] - expected[-1]).abs().max() > 1e-3


def test_gamma_zero_draws_no_noise_and_is_deterministic():
    pipe = ctm_pipe()
    z = torch.randn(2, 1, 8, 8, generator=gen(1), dtype=torch.float64)
    g = gen(3)
    before = g.get_state()
    a = pipe(batch_size=2, num_inference_steps=4, gamma=0.0, latents=z, generator=g, output_type="pt").images
    assert torch.equal(g.get_state(), before)  # no noise drawn in 4 steps
    b = pipe(batch_size=2, num_inference_steps=4, gamma=0.0, latents=z, generator=gen(77), output_type="pt").images
    assert torch.equal(a, b)
    # gamma = 0 is CTM's "exact" sampler: x <- G(x, sigma_i, sigma_{i+1}) on the 5-point grid
    levels = karras_sigmas(5).flip(0).tolist()
    x = levels[0] * z
    with torch.no_grad():
        for i in range(4):
            x = pipe.trajectory_function(x, levels[i], levels[i + 1])
    torch.testing.assert_close(a, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    c = pipe(batch_size=2, num_inference_steps=4, gamma=0.5, latents=z, generator=gen(3), output_type="pt").images
    assert (a - c).abs().max() > 1e-3  # gamma > 0 does add noise


class ConsistencyAsTrajectory(torch.nn.Module):
    """A CTM backbone F built from a consistency model's backbone F_cm so that G(x, t, sigma_min) = f(x, t) =
    c_skip^CM(t) x + c_out^CM(t) F_cm(c_in(t) x, c_noise(t)): it inverts G = (s/t) x + (1 - s/t)(c_skip x + c_out F)
    (EDM scalings) for F at s = sigma_min. Only valid at s = sigma_min, so it records every s it is asked for."""

    def __init__(self, cm_unet: torch.nn.Module, levels: list[float]):
        super().__init__()
        self.cm_unet, self.levels = cm_unet, torch.tensor(levels, dtype=torch.float64)
        self.s_seen: list[torch.Tensor] = []

    def forward(self, sample, timestep, s_timestep=None, **kwargs):
        c_noise = noise_conditioning(self.levels).float()
        i = int((c_noise - timestep.float()).abs().argmin())
        assert c_noise[i] == timestep.float()  # the scheduler passes c_noise of a schedule level
        t = self.levels[i]
        self.s_seen.append(torch.as_tensor(s_timestep).clone())
        x = sample / input_scaling(t)
        cs, co = consistency_scalings(t, 0.5, SIGMA_MIN)
        f = cs * x + co * self.cm_unet(sample, timestep).sample
        r = SIGMA_MIN / t
        g = (f - r * x) / (1 - r)
        c_skip, c_out = edm_scalings(t)
        return ((g - c_skip * x) / c_out,)


def test_gamma_one_reproduces_consistency_scheduler():
    """gamma = 1 is CM multistep sampling: with a CTM model whose G(x, t, sigma_min) equals a consistency function
    f, CTMScheduler gives ConsistencyScheduler's samples for the same latents and generator (both schedulers run
    their own step code: ctm_gamma_step vs consistency_step)."""
    torch.manual_seed(4)
    cm_unet = build_unet("tiny", sample_size=8).double().eval()
    sigmas = [80.0, 3.0, 0.4]
    z = torch.randn(2, 1, 8, 8, generator=gen(11), dtype=torch.float64)
    cm = ConsistencyPipeline(unet=cm_unet, scheduler=ConsistencyScheduler(clip_denoised=False))
    cm.set_progress_bar_config(disable=True)
    cm_states: list = []
    g_cm = gen(21)
    cm(batch_size=2, sigmas=sigmas, latents=z, generator=g_cm, output_type="pt",
       callback_on_step_end=collect_latents(cm_states))

    def ctm_sampling(gamma: float):
        model = ConsistencyAsTrajectory(cm_unet, sigmas)
        sched = CTMScheduler()
        sched.set_timesteps(sigmas=sigmas, gamma=gamma)
        g = gen(21)
        x = z * sched.init_noise_sigma
        states = []
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                F = model(sched.scale_model_input(x, t), t, s_timestep=sched.s_timesteps[i])[0]
                x = sched.step(F, t, x, generator=g).prev_sample
                states.append(x)
        return states, model.s_seen, g

    ctm_states, s_seen, g_ctm = ctm_sampling(1.0)
    s_min = noise_conditioning(torch.tensor(SIGMA_MIN, dtype=torch.float64)).float()
    assert len(s_seen) == 3 and all(torch.equal(s, s_min) for s in s_seen)  # the model is asked for s = sigma_min
    for a, b in zip(ctm_states, cm_states):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.equal(g_cm.get_state(), g_ctm.get_state())  # the same number of noise draws
    # sensitive: gamma < 1 jumps to other s (where this model is not a consistency function) and changes the samples
    other, s_seen, _ = ctm_sampling(0.5)
    assert not torch.equal(s_seen[0], s_min) and (other[-1] - cm_states[-1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# CTMPipeline: boundary, Heun sampler, conventions, save/load
# ------------------------------------------------------------------------------------------------------------------
def test_boundary_G_t_t_is_identity_through_pipeline_and_kernel():
    pipe = ctm_pipe(dtype=torch.float32)
    G = pipe.trajectory_function
    x = torch.randn(3, 1, 8, 8, generator=gen(0)) * 7
    with torch.no_grad():
        for t in (SIGMA_MIN, 0.37, 5.0, SIGMA_MAX):
            assert torch.equal(G(x, t, t), x)
            # the scheduler's kernel path: a "step" from t to t (gamma = 0 jumps to s = sigma_next = t)
            c_noise = noise_conditioning(torch.tensor(t)).float()
            F = pipe.unet(x * float(input_scaling(t)), c_noise, s_timestep=c_noise).sample
            x_next, jumped = ctm_gamma_step(F, x, t, t, 0.0)
            assert torch.equal(x_next, x) and torch.equal(jumped, x)
        # and a real jump is not the identity (the check can fail)
        assert (G(x, 5.0, 1.0) - x).abs().max() > 1e-2


def test_heun_sampler_is_edm_heun_on_g_t_t():
    pipe = ctm_pipe()
    calls = []
    forward = pipe.unet.forward

    def spy(sample, timestep, class_labels=None, return_dict=True, s_timestep=None):
        calls.append((timestep.clone(), s_timestep.clone()))
        return forward(sample, timestep, class_labels=class_labels, return_dict=return_dict, s_timestep=s_timestep)

    pipe.unet.forward = spy
    z = torch.randn(2, 1, 8, 8, generator=gen(2), dtype=torch.float64)
    got = pipe(batch_size=2, num_inference_steps=3, sampler="heun", latents=z, output_type="pt").images
    assert len(calls) == 2 * 3 - 1  # NFE 2n - 1
    assert all(torch.equal(t, s) for t, s in calls)  # every evaluation is g(x, t, t)
    pipe.unet.forward = forward
    with torch.no_grad():
        expected = sample_heun(TrajectoryFunction(pipe.unet).denoise, z, edm_sigmas(3))
    torch.testing.assert_close(got, (expected / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-12)
    # explicit sigmas (0 appended) and a difference from the gamma sampler
    a = pipe(batch_size=2, sigmas=[80.0, 1.0], sampler="heun", latents=z, output_type="pt").images
    b = pipe(batch_size=2, sigmas=[80.0, 1.0, 0.0], sampler="heun", latents=z, output_type="pt").images
    c = pipe(batch_size=2, sigmas=[80.0, 1.0], latents=z, output_type="pt").images
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_pipeline_output_types_callback_and_class_labels():
    pipe = ctm_pipe(dtype=torch.float32)
    pil = pipe(batch_size=2, num_inference_steps=2, generator=gen(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    arr = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="np").images
    pt = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pt", return_dict=False)[0]
    assert arr.shape == (2, 8, 8, 1) and pt.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-7)
    assert np.array_equal(np.asarray(pil[0]), (arr[0, ..., 0] * 255).round().astype(np.uint8))
    # a list of generators (one per image) equals per-image calls
    both = pipe(batch_size=2, num_inference_steps=2, gamma=0.5, generator=[gen(1), gen(2)], output_type="pt").images
    one = pipe(batch_size=1, num_inference_steps=2, gamma=0.5, generator=[gen(2)], output_type="pt").images
    torch.testing.assert_close(both[1:], one, rtol=0, atol=1e-6)
    # callback sees latents and denoised (= G), and may replace latents
    seen = []

    def callback(p, i, t, kw):
        seen.append((i, sorted(kw)))
        return {"latents": torch.zeros_like(kw["latents"])}

    out = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pt", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    assert seen == [(0, ["denoised", "latents"]), (1, ["denoised", "latents"])]
    assert torch.equal(out, torch.full_like(out, 0.5))  # zeroed final state -> 0.5 gray
    # class-conditional UNet: labels are drawn or used, and they matter
    cond = CTMPipeline(unet=ctm_unet(dtype=torch.float32, num_class_embeds=10), scheduler=CTMScheduler())
    cond.set_progress_bar_config(disable=True)
    z = torch.randn(2, 1, 8, 8, generator=gen(4))
    l1 = cond(batch_size=2, latents=z, class_labels=[1, 1], output_type="pt").images
    l2 = cond(batch_size=2, latents=z, class_labels=[7, 7], output_type="pt").images
    assert (l1 - l2).abs().max() > 1e-4
    assert cond(batch_size=2, latents=z, sampler="heun", num_inference_steps=2, output_type="pt").images.shape == \
        (2, 1, 8, 8)


def test_pipeline_rejects_bad_inputs():
    pipe = ctm_pipe(dtype=torch.float32)
    cases = [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=-2), "num_inference_steps"),
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=-0.5), "gamma"),
        (dict(sampler="euler"), "sampler"),
        (dict(sampler="heun", gamma=0.3), "gamma"),
        (dict(sampler="heun", timesteps=[0]), "timesteps"),
        (dict(timesteps=[0], sigmas=[80.0]), "not both"),
        (dict(latents=torch.zeros(2, 1, 4, 4)), "latents"),
        (dict(generator=[gen(0)]), "generators"),
        (dict(output_type="jpg"), "output_type"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
        (dict(class_labels=[1]), "unconditional"),
        (dict(batch_size=0), "batch_size"),
        (dict(sigmas=[80.0, 100.0]), "descending"),
        (dict(sampler="heun", sigmas=[1.0, 5.0]), "descending"),
    ]
    for kwargs, match in cases:
        kwargs = {"batch_size": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)


def test_pipeline_save_load_bit_exact(tmp_path):
    pipe = ctm_pipe(dtype=torch.float32, gamma=0.4, num_train_timesteps=12)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "CTMPipeline"
    assert index["unet"] == ["gensample.models.ctm_unet", "CTMUNet2DModel"]
    assert index["scheduler"] == ["gensample.schedulers.scheduling_ctm", "CTMScheduler"]
    loaded = CTMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, CTMUNet2DModel) and loaded.scheduler.config.gamma == 0.4
    assert loaded.scheduler.config.num_train_timesteps == 12
    for kwargs in (dict(num_inference_steps=1), dict(num_inference_steps=3), dict(num_inference_steps=3, gamma=0.0),
                   dict(timesteps=[0, 5]), dict(num_inference_steps=2, sampler="heun")):
        a = pipe(batch_size=3, generator=gen(8), output_type="pt", **kwargs).images
        b = loaded(batch_size=3, generator=gen(8), output_type="pt", **kwargs).images
        assert torch.equal(a, b), kwargs
    # the config gamma (0.4) is the default: it draws noise, unlike gamma = 0
    d = pipe(batch_size=3, generator=gen(8), output_type="pt", num_inference_steps=3).images
    e = pipe(batch_size=3, generator=gen(8), output_type="pt", num_inference_steps=3, gamma=0.0).images
    assert (d - e).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# CTMTraining: teacher solver, roles, losses, adaptive weights, GAN alternation
# ------------------------------------------------------------------------------------------------------------------
def test_teacher_heun_solve_and_ctm_target_match_heun_solve_per_sample():
    method = CTMTraining(edm_teacher(), num_sigmas=7)
    x0 = torch.rand(6, 1, 8, 8, generator=gen(0)) * 2 - 1
    with torch.random.fork_rng():
        torch.manual_seed(3)
        times = method.sample_times(6, step=4)
    x_t = x0 + times.t.float().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen(1))
    grid = karras_sigmas_descending(7)
    k = times.num_heun_steps
    with torch.no_grad():
        got = teacher_heun_solve(method.teacher, x_t, grid, times.t_index, k)
        target = method.ctm_target(x_t, times)
        for i in range(6):
            n = int(times.t_index[i])
            x_u = heun_solve(method.teacher, x_t[i:i + 1], grid[n:n + k + 1])
            torch.testing.assert_close(got[i:i + 1], x_u, rtol=1e-5, atol=1e-5)
            # x_tgt = G_target(G_student(x_u, u, s), s, sigma_min) with u = sigma_{n+k}
            u, s = float(grid[n + k]), float(times.s[i])
            assert u == float(times.u[i]) and s <= u
            inner = method.student(x_u, u, s)
            torch.testing.assert_close(target[i:i + 1], method.target(inner, s, SIGMA_MIN), rtol=1e-5, atol=1e-5)
    assert (got - x_t).abs().max() > 1e-2  # the solver moved the state


def test_roles_init_gradients_and_target_ema():
    teacher = edm_teacher()
    method = CTMTraining(teacher, num_sigmas=5, target_ema=0.9)
    method.train()
    assert method.student.training and not method.teacher.training and not method.target.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert not any(p.requires_grad for p in method.target.parameters())
    assert all(p.requires_grad for p in method.student.parameters())
    assert list(method.trainable_groups()) == ["generator"] and method.groups_for_step(7) == ["generator"]
    assert method.ema_modules()["unet"] is method.student.backbone
    # the student starts as the teacher's denoiser for every s: g(x, t, s) = D(x, t)
    x = torch.randn(3, 1, 8, 8, generator=gen(0))
    t = torch.tensor([0.1, 2.0, 30.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(method.student.g(x, t, t / 3), EDMDenoiser(teacher.unet)(x, t), rtol=1e-5,
                                   atol=1e-5)
    # x_est: gradients reach the student (inner map and through the frozen target's input), never the target
    t5, s03 = torch.full((3,), 5.0, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64)
    est = method.ctm_estimate(x * 5, t5, s03)
    with torch.no_grad():  # x_est = G_target(G_student(x_t, t, s), s, sigma_min), by hand with the scalings
        inner = method.student(x * 5, t5, s03)
        g = method.target.g(inner, 0.3, SIGMA_MIN)
        torch.testing.assert_close(est, (SIGMA_MIN / 0.3) * inner + (1 - SIGMA_MIN / 0.3) * g)
        assert (est - inner).abs().max() > 1e-3
    est.square().mean().backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert method.get_last_layer().grad is not None and method.get_last_layer().grad.abs().sum() > 0
    # target EMA: theta- <- mu theta- + (1 - mu) theta, and it is a copy (no shared storage)
    old = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01)
    method.after_optimizer_step(0)
    for o, p_t, p_s in zip(old, method.target.parameters(), method.student.parameters()):
        torch.testing.assert_close(p_t, 0.9 * o + 0.1 * p_s, rtol=1e-6, atol=1e-7)
        assert p_t.data_ptr() != p_s.data_ptr()


def test_dsm_adaptive_weight_is_the_gradient_norm_ratio():
    method = CTMTraining(edm_teacher(), num_sigmas=5)
    x0 = torch.rand(8, 1, 8, 8, generator=gen(0)) * 2 - 1
    with torch.random.fork_rng():
        torch.manual_seed(5)
        out = method(x0, 3)
    w = out["dsm_weight"]
    assert torch.isfinite(w) and 0 < float(w) < 1e4
    # recompute the two terms with the same random numbers and form the ratio by hand
    W = method.get_last_layer()
    assert W is method.student.backbone.conv_out.weight
    with torch.random.fork_rng():
        torch.manual_seed(5)
        times = method.sample_times(8, 3)
        x_t = x0 + times.t.float().view(-1, 1, 1, 1) * torch.randn_like(x0)
        ctm = method.distance(method.ctm_estimate(x_t, times.t, times.s), method.ctm_target(x_t, times)).mean()
        dsm = method.dsm_loss(x0)
    with torch.random.fork_rng():  # L_DSM = mean lambda(sigma) mse(g(x_sigma, sigma, sigma), x_0), by hand
        torch.manual_seed(5)
        method.sample_times(8, 3)
        torch.randn_like(x0)
        sigma = method.sample_dsm_sigmas(8)
        x_sigma = x0 + sigma.float().view(-1, 1, 1, 1) * torch.randn_like(x0)
        with torch.no_grad():
            mse = (method.student.g(x_sigma, sigma, sigma) - x0).square().mean((1, 2, 3))
    lam = (sigma**2 + 0.25) / (0.25 * sigma**2)
    torch.testing.assert_close(dsm.detach(), (lam.float() * mse).mean(), rtol=1e-5, atol=0)
    g_ctm, = torch.autograd.grad(ctm, W, retain_graph=True)
    g_dsm, = torch.autograd.grad(dsm, W, retain_graph=True)
    expected = (g_ctm.norm() / (g_dsm.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["ctm"], ctm.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"].detach(), (ctm + expected * dsm).detach(), rtol=1e-5, atol=0)
    assert W.grad is None  # autograd.grad leaves .grad alone
    # clamps: [0, 1e4] for DSM, [0.01, 10] for GAN
    p = torch.ones(3, requires_grad=True)
    assert float(adaptive_weight(1e3 * p.sum(), 1e-3 * p.sum(), p, 0.01, 10.0)) == 10.0
    assert float(adaptive_weight(1e-3 * p.sum(), 1e3 * p.sum(), p, 0.01, 10.0)) == pytest.approx(0.01, rel=1e-6)
    torch.testing.assert_close(adaptive_weight(2 * p.sum(), p.sum(), p, 0.0, 1e4), torch.tensor(2.0), rtol=1e-4,
                               atol=0)
    # DSM noise levels: half log-normal(-1.2, 1.2), half rho-uniform in [sigma(0.7), sigma_max] = [0.318, 80]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sig = method.sample_dsm_sigmas(20000)
    assert abs(float(sig[:10000].log().mean()) + 1.2) < 0.05 and abs(float(sig[:10000].log().std()) - 1.2) < 0.05
    assert 0.3179 < float(sig[10000:].min()) and float(sig[10000:].max()) <= 80.0


def test_distances_and_diff_augment():
    teacher = edm_teacher()
    a = torch.rand(4, 1, 8, 8, generator=gen(0)) * 2 - 1
    b = a + 0.1 * torch.randn(4, 1, 8, 8, generator=gen(1))
    for name in ("pseudo_huber", "l2", "digits_features"):
        m = CTMTraining(teacher, num_sigmas=3, distance=name, dsm_weight=0.0)
        assert torch.equal(m.distance(a, a), torch.zeros(4))
        d = m.distance(b.requires_grad_(), a)
        assert d.shape == (4,) and (d > 0).all()
        assert torch.autograd.grad(d.sum(), b)[0].abs().sum() > 0
        b = b.detach()
    # pseudo-Huber with iCT's c on the per-sample L2 norm
    c = 0.00054 * 8
    expected = ((b - a).flatten(1).square().sum(1) + c**2).sqrt() - c
    torch.testing.assert_close(CTMTraining(teacher, num_sigmas=3).distance(b, a), expected)
    # DiffAugment: translation shifts by at most one pixel (8 * 0.125), cutout zeroes a 2x2 square (8 * 0.2)
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(16, 1, 1, 1) + 1
    assert torch.equal(diff_augment(x, ""), x)
    cut = diff_augment(x, "cutout", generator=gen(0))
    zeros = (cut == 0).flatten(1).sum(1)
    assert ((zeros >= 1) & (zeros <= 4)).all() and (zeros == 4).any()
    moved = diff_augment(x, "translation", generator=gen(0))
    for img, src in zip(moved, x):
        kept = img[img != 0]
        assert set(kept.tolist()) <= set(src.flatten().tolist()) and kept.numel() >= 49
    with pytest.raises(ValueError, match="DiffAugment"):
        diff_augment(x, "flip")
    assert [h.shape for h in Discriminator(1, 8, num_scales=2)(x)] == [(16, 64), (16, 16)]


def test_gan_alternation_in_the_trainer(tmp_path):
    """With the GAN term from step 2: steps 0-2 and 4 train the generator (with the GAN term from step 2 on),
    3 and 5 the discriminator; the target EMA and the Trainer's evaluation EMA move only after generator steps, the
    discriminator only after its own steps, and a generator step leaves no gradient in the discriminator. The
    discriminator's optimizer has its own lr and CTM's betas (0.5, 0.9)."""
    from gensample.training.trainer import TrainConfig, Trainer

    class Recording(CTMTraining):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls, self.snapshots = [], []
            self.trainer = None

        def forward(self, batch, step, group="generator"):
            out = super().forward(batch, step, group)
            self.calls.append((step, group, sorted(out)))
            return out

        def after_optimizer_step(self, step):
            super().after_optimizer_step(step)
            flat = lambda m: torch.cat([p.detach().flatten().clone() for p in m.parameters()])  # noqa: E731
            ema = self.trainer.emas["unet"]
            self.snapshots.append((flat(self.discriminator), flat(self.target), flat(self.student),
                                   all(p.grad is None for p in self.discriminator.parameters()),
                                   flat(ema.model), ema.num_updates))

    torch.manual_seed(0)
    method = Recording(edm_teacher(), num_sigmas=3, gan=True, gan_start_step=2, gan_augment="translation",
                       discriminator_lr=2e-4)
    assert method.optimizer_settings() == {"discriminator": {"betas": (0.5, 0.9), "lr": 2e-4}}
    assert [method.groups_for_step(s) for s in range(6)] == [["generator"]] * 3 + [["discriminator"],
                                                                                    ["generator"], ["discriminator"]]
    start = (torch.cat([p.detach().flatten().clone() for p in method.discriminator.parameters()]),
             torch.cat([p.detach().flatten().clone() for p in method.target.parameters()]),
             torch.cat([p.detach().flatten().clone() for p in method.student.parameters()]))
    data = torch.rand(32, 1, 8, 8) * 2 - 1
    config = TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=4, learning_rate=1e-3, progress=False,
                         checkpoint_every=0, num_sample_images=2, sample_steps=(1,), seed=0)
    trainer = method.trainer = Trainer(method, data, config)
    groups = {name: o.optimizer.param_groups[0] for name, o in zip(trainer.group_names, trainer.optimizers)}
    assert (groups["discriminator"]["lr"], groups["discriminator"]["betas"]) == (2e-4, (0.5, 0.9))
    assert (groups["generator"]["lr"], groups["generator"]["betas"]) == (1e-3, (0.9, 0.999))
    start_ema = torch.cat([p.detach().flatten().clone() for p in trainer.emas["unet"].model.parameters()])
    trainer.train()
    assert [(s, g) for s, g, _ in method.calls] == [(0, "generator"), (1, "generator"), (2, "generator"),
                                                    (3, "discriminator"), (4, "generator"), (5, "discriminator")]
    keys = {s: k for s, _, k in method.calls}
    assert "gan_g" not in keys[0] and "gan_g" not in keys[1] and "gan_g" in keys[2] and "gan_g" in keys[4]
    assert {"d_real", "d_fake", "loss"} == set(keys[3])
    previous = (*start, start_ema)
    for step, (disc, target, student, no_disc_grad, ema, ema_updates) in enumerate(method.snapshots):
        d_step = step in (3, 5)
        assert torch.equal(disc, previous[0]) != d_step, step          # D moves only on its steps
        assert torch.equal(target, previous[1]) == d_step, step         # target EMA only after G steps
        assert torch.equal(student, previous[2]) == d_step, step        # student only on G steps
        assert torch.equal(ema, previous[3]) == d_step, step            # evaluation EMA only after G steps
        assert ema_updates == [1, 2, 3, 3, 4, 4][step], step
        if not d_step:
            assert no_disc_grad, step
        previous = (disc, target, student, ema)


def test_ctm_method_errors():
    teacher = edm_teacher()
    with pytest.raises(ValueError, match="teacher"):
        CTMTraining(None)
    from diffusers import DDPMScheduler

    from gensample.methods.teachers import as_denoiser
    vp_teacher = as_denoiser(build_unet("tiny", sample_size=8), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="student"):
        CTMTraining(vp_teacher)
    CTMTraining(vp_teacher, student=ctm_unet(dtype=torch.float32), num_sigmas=3)  # with a student it works
    with pytest.raises(ValueError, match="CTMUNet2DModel"):
        CTMTraining(teacher, student=build_unet("tiny", sample_size=8))
    with pytest.raises(FileNotFoundError):
        CTMTraining("/nonexistent/edm/pipeline")
    with pytest.raises(ValueError, match="class-conditional"):
        CTMTraining(edm_teacher(num_class_embeds=10))
    bad = [dict(distance="lpips"), dict(lpips_weights="x.safetensors"), dict(lpips_resize=0),
           dict(discriminator_lr=0.0), dict(discriminator_betas=(0.5, 1.0)), dict(target_ema=1.0), dict(num_sigmas=1),
           dict(max_heun_steps=18),
           dict(target_inner="teacher"), dict(sigma_data=0.7), dict(discriminator=Discriminator()),
           dict(gan_augment="rotate"), dict(sample_gamma=2.0), dict(dsm_weight=-1.0), dict(gan_start_step=-1)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            CTMTraining(teacher, **kwargs)
    with pytest.raises(ValueError, match="group"):
        CTMTraining(teacher, num_sigmas=3)(torch.zeros(2, 1, 8, 8), 0, "discriminator")


@pytest.fixture(scope="module")
def digits_data():
    from gensample.data import load_digits

    return load_digits("train")


def test_ctm_training_loss_falls_and_exports_pipeline(tmp_path, digits_data):
    """20 steps of CTM (+DSM) distillation of a tiny untrained EDM teacher on the digits: on a fixed evaluation batch
    the CTM loss falls, and so does the error of G(x_t, t, s) against the teacher's own Heun solution from t to s
    (what CTM learns)."""
    from gensample.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    method = CTMTraining(edm_teacher(), num_sigmas=6, max_heun_steps=3)
    x0 = digits_data[:96]

    def evaluate(m):
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            ctm = float(m(x0, 0)["ctm"])
            times = m.sample_times(len(x0), 5)
            x_t = x0 + times.t.float().view(-1, 1, 1, 1) * torch.randn_like(x0)
            G = m.student(x_t, times.t, times.s)
            exact = torch.empty_like(x_t)
            for n in times.t_index.unique().tolist():
                for s in times.s_index.unique().tolist():
                    sel = (times.t_index == n) & (times.s_index == s)
                    if sel.any() and s > n:
                        exact[sel] = heun_solve(m.teacher, x_t[sel], m.grid[n:s + 1])
                    elif sel.any():
                        exact[sel] = x_t[sel]
            return ctm, float((G - exact).square().mean())

    before = evaluate(method)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=20, batch_size=16, learning_rate=2e-3, progress=False,
                         checkpoint_every=0, num_sample_images=4, sample_steps=(1,), seed=0)
    summary = Trainer(method, digits_data, config).train()
    after = evaluate(method)  # measured (teacher seeds 0-2): ctm ~5.05 -> 3.2-3.4, trajectory error ~0.70 -> 0.24-0.29
    assert after[0] < 0.85 * before[0] and after[1] < 0.6 * before[1], (before, after)
    pipe = CTMPipeline.from_pretrained(summary["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_train_timesteps == 6 and pipe.scheduler.config.gamma == 0.0
    images = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    run = json.loads((tmp_path / "run_config.json").read_text())
    assert run["method"] == "ctm" and run["method_config"]["num_sigmas"] == 6
    assert run["method_config"]["max_heun_steps"] == 3
    assert run["method_config"]["distance"] == "pseudo_huber" and run["method_config"]["target_ema"] == 0.999


def test_cli_train_ctm(tmp_path):
    from gensample.cli.train_ctm import register

    teacher_dir = tmp_path / "teacher"
    edm_teacher().save_pretrained(teacher_dir)
    parser = argparse.ArgumentParser(prog="gensample")
    train_sub = parser.add_subparsers(dest="command").add_parser("train").add_subparsers(dest="method")
    register(train_sub)
    out = tmp_path / "run"
    args = parser.parse_args(["train", "ctm", "--teacher", str(teacher_dir), "--max-steps", "2", "--batch-size", "8",
                              "--num-sigmas", "4", "--output", str(out), "--num-sample-images", "2",
                              "--sample-steps", "1", "--no-progress", "--checkpoint-every", "0", "--gamma", "0.5",
                              "--dsm-weight", "0.5"])
    summary = args.func(args)
    assert summary["steps"] == 2
    run = json.loads((out / "run_config.json").read_text())
    assert run["method"] == "ctm" and run["method_config"]["num_sigmas"] == 4
    assert run["method_config"]["sample_gamma"] == 0.5 and run["method_config"]["dsm_weight"] == 0.5
    assert run["train"]["extra"]["teacher"] == str(teacher_dir)
    loaded = CTMPipeline.from_pretrained(out / "pipeline")
    assert loaded.scheduler.config.gamma == 0.5 and loaded.unet.config.sample_size == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "ctm", "--output", str(tmp_path / "x")])  # --teacher is required
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "ctm", "--teacher", str(teacher_dir), "--output", "x", "--gamma", "1.5"])
    bad = parser.parse_args(["train", "ctm", "--teacher", str(tmp_path / "missing"), "--output", str(tmp_path / "y")])
    with pytest.raises(FileNotFoundError):
        bad.func(bad)
    bad = parser.parse_args(["train", "ctm", "--teacher", str(teacher_dir), "--output", str(tmp_path / "z"),
                             "--model", "tiny"])
    with pytest.raises(ValueError, match="--model"):
        bad.func(bad)
