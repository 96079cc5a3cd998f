"""SCott (issue #14): the SDE teacher steps against closed forms and diffusers' DDIM, the Gaussian-toy marginals,
classifier-free guidance, the student's initialisation, the hinge losses through the method, the CD path, the
pipeline round trip, an end-to-end run whose loss falls, the k-NN precision/recall/coverage metric and bad input."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

from gensample.core.parametrization import EDMDenoiser
from gensample.core.sampling import (
    er_sde_step,
    sde_solve,
    stochastic_ddim_step,
    substep_sigmas,
)
from gensample.core.sigmas import karras_sigmas
from gensample.methods.scott import ClassifierFreeGuidance, SCottDistillation, guided_teacher
from gensample.metrics.precision_recall import knn_radii, precision_recall_coverage
from gensample.models import build_unet
from gensample.models.discriminator import hinge_d_loss, hinge_g_loss
from gensample.models.scott_student import SCottStudentUNet


# -- the SDE steps ----------------------------------------------------------------------------------------------------
def test_eta_zero_ddim_is_the_euler_step_of_the_ode():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    sigma, sigma_next = torch.tensor([2.0, 10.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 3.0, 0.1])
    euler = x + ((sigma_next - sigma) / sigma).float().view(3, 1, 1, 1) * (x - d)  # x + (s' - s)(x - D)/s
    got = stochastic_ddim_step(x, sigma, sigma_next, d, eta=0.0, noise=None)
    torch.testing.assert_close(got, euler, rtol=0, atol=1e-6)
    # with noise given it is ignored at eta = 0; to 0 the step returns D
    torch.testing.assert_close(stochastic_ddim_step(x, sigma, sigma_next, d, 0.0, torch.randn_like(x)), euler,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(stochastic_ddim_step(x, 2.0, 0.0, d, 0.6, torch.randn_like(x)), d)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_stochastic_ddim_equals_diffusers_ddim_in_vp_form(eta):
    """Our VE step == diffusers' DDIMScheduler.step (eta, variance_noise) after x_ve = x_vp / sqrt(alpha_bar)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    for t in (int(sched.timesteps[3]), int(sched.timesteps[30])):
        prev_t = t - 1000 // 50
        a, a_prev = sched.alphas_cumprod[t].double(), sched.alphas_cumprod[prev_t].double()
        sigma, sigma_prev = ((1 - a) / a).sqrt(), ((1 - a_prev) / a_prev).sqrt()
        x_ve = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * (sigma**2 + 0.25).sqrt()
        denoised = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * 0.5
        xi = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        eps = (x_ve - denoised) / sigma
        ref = sched.step(eps, t, x_ve * a.sqrt(), eta=eta, variance_noise=xi).prev_sample / a_prev.sqrt()
        ours = stochastic_ddim_step(x_ve, sigma, sigma_prev, denoised, eta, xi)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_er_sde_reduces_to_ddim_and_ddpm():
    g = torch.Generator().manual_seed(2)
    x, d, xi = (torch.randn(4, 1, 4, 4, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([5.0, 2.0, 1.0, 0.3]), torch.tensor([4.0, 1.0, 0.2, 0.1])
    torch.testing.assert_close(er_sde_step(x, sigma, sigma_next, d, None, phi="ode"),
                               stochastic_ddim_step(x, sigma, sigma_next, d, 0.0, None), rtol=0, atol=1e-6)
    # phi = sigma^2: x' = D + (s'^2/s^2)(x - D) + s' sqrt(1 - s'^2/s^2) xi  (DDPM's posterior, by hand)
    r = (sigma_next / sigma).view(4, 1, 1, 1)
    ddpm = d + r**2 * (x - d) + sigma_next.view(4, 1, 1, 1) * (1 - r**2).sqrt() * xi
    torch.testing.assert_close(er_sde_step(x, sigma, sigma_next, d, xi, phi="sde"), ddpm, rtol=0, atol=1e-5)
    torch.testing.assert_close(stochastic_ddim_step(x, sigma, sigma_next, d, 1.0, xi), ddpm, rtol=0, atol=1e-5)
    # ER-SDE 5, phi = s (e^{s^0.3} + 10), by hand for one sample
    phi = lambda s: s * (math.exp(s**0.3) + 10)  # noqa: E731
    rr = phi(1.0) / phi(2.0)
    hand = d[1] + rr * (x[1] - d[1]) + math.sqrt(1.0 - 4.0 * rr**2) * xi[1]
    torch.testing.assert_close(er_sde_step(x, sigma, sigma_next, d, xi)[1], hand, rtol=0, atol=1e-5)


def test_substep_levels_are_equally_spaced_in_rho_space():
    levels = substep_sigmas(torch.tensor([80.0, 1.0], dtype=torch.float64), torch.tensor([40.0, 0.002], dtype=torch.float64), 3)
    assert levels.shape == (4, 2) and levels[0].tolist() == [80.0, 1.0] and levels[-1].tolist() == [40.0, 0.002]
    root = levels ** (1 / 7)
    torch.testing.assert_close(root[1:] - root[:-1], (root[-1] - root[0]).expand(3, 2) / 3)


S2 = 0.25  # data variance of the Gaussian toy


def _gaussian_denoiser(x, sigma, **_):
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return S2 / (S2 + s**2) * x  # E[x_0 | x_sigma] for x_0 ~ N(0, S2)


STEPS = {"ddim-0": functools.partial(stochastic_ddim_step, eta=0.0), "ddim-0.3": functools.partial(
    stochastic_ddim_step, eta=0.3), "ddim-1": functools.partial(stochastic_ddim_step, eta=1.0),
    "er-sde-5": functools.partial(er_sde_step, phi="er-sde-5")}


@pytest.mark.parametrize("name", list(STEPS))
def test_sde_steps_keep_the_gaussian_marginal(name):
    """x_0 ~ N(0, s^2): (a) given the true x_0 every step lands exactly on N(x_0, sigma'^2), so Var x' = s^2 +
    sigma'^2; (b) with the exact denoiser D = s^2 x / (s^2 + sigma^2) one step has the variance of its linear
    Gaussian map, (s^2 + r sigma^2)^2 / (s^2 + sigma^2) + sigma'^2 - r^2 sigma^2 (a first-order step loses
    s^2 sigma^2 (1 - r)^2 / (s^2 + sigma^2)), and the h-substep solve converges to s^2 + sigma'^2."""
    g = torch.Generator().manual_seed(3)
    n, sigma, sigma_next = 200_000, 2.0, 1.0
    x0 = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64) * math.sqrt(S2)
    x = x0 + sigma * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    xi = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    step = STEPS[name]
    levels = (torch.tensor(sigma, dtype=torch.float64).expand(n), torch.tensor(sigma_next, dtype=torch.float64))
    exact = step(x, *levels, x0, noise=xi)
    assert abs(float(exact.var()) - (S2 + sigma_next**2)) < 0.015 * (S2 + sigma_next**2)
    assert abs(float((exact - x0).var()) - sigma_next**2) < 0.015 * sigma_next**2
    # (b) one step with the exact denoiser: r by hand
    if name.startswith("ddim"):
        eta = float(name.split("-")[1])
        s_eta = eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma
        r = math.sqrt(sigma_next**2 - s_eta**2) / sigma
    else:
        phi = lambda s: s * (math.exp(s**0.3) + 10)  # noqa: E731
        r = phi(sigma_next) / phi(sigma)
    closed = (S2 + r * sigma**2) ** 2 / (S2 + sigma**2) + sigma_next**2 - r**2 * sigma**2
    one = step(x, *levels, _gaussian_denoiser(x, levels[0]), noise=xi)
    assert abs(float(one.var()) - closed) < 0.015 * closed
    assert closed < 0.96 * (S2 + sigma_next**2)  # one first-order step does lose variance
    # 32 sub-steps: the defect shrinks like 1/h (ddim-1: 10.6% of the variance in one step, 0.4% in 32)
    fine = sde_solve(_gaussian_denoiser, x, sigma, sigma_next, 32, step, generator=g)
    assert abs(float(fine.var()) - (S2 + sigma_next**2)) < 0.015 * (S2 + sigma_next**2)


# -- guidance, student, teacher ---------------------------------------------------------------------------------------
class _LabelScaler(nn.Module):
    """D(x, sigma, c) = x (c + 1): a denoiser whose guided output is easy by hand."""

    def forward(self, x, sigma, class_labels=None):
        return x * (class_labels.view(-1, 1, 1, 1).to(x.dtype) + 1)


def test_classifier_free_guidance_by_hand():
    cfg = ClassifierFreeGuidance(_LabelScaler(), null_label=10)
    x = torch.ones(2, 1, 2, 2)
    out = cfg(x, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), class_labels=torch.tensor([2, 4]))
    # null label 10 -> 11 x;  w=3, c=2: 11 + 3 (3 - 11) = -13;  w=1, c=4: 5
    assert out[:, 0, 0, 0].tolist() == [-13.0, 5.0]


def _tiny_teacher(num_classes: int | None = 10):
    from gensample.methods.edm import EDMTraining

    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8, num_class_embeds=None if num_classes is None else num_classes + 1)
    return EDMTraining(unet, num_classes=num_classes, label_dropout=0.1 if num_classes else 0.0).build_pipeline(
        {"unet": unet})


def test_student_starts_as_the_teacher_and_w_trains():
    pipe = _tiny_teacher()
    student = SCottStudentUNet.from_teacher(pipe.unet)
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([-300.0, 10.0, 800.0]), torch.tensor([0, 5, 9])
    ref = pipe.unet(x, t, class_labels=c).sample
    for w in (1.0, 2.5, torch.tensor([0.0, 1.0, 7.0])):
        assert torch.equal(student(x, t, class_labels=c, guidance_scale=w).sample, ref)
    # the w-projection gets a gradient at once, and once it moves w matters
    student(x, t, class_labels=c, guidance_scale=3.0).sample.square().sum().backward()
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_()
    assert not torch.allclose(student(x, t, class_labels=c, guidance_scale=3.0).sample,
                              student(x, t, class_labels=c, guidance_scale=1.0).sample)


def test_hinge_losses_by_hand_through_the_method():
    assert float(hinge_d_loss([torch.tensor([[0.5, -2.0]])], [torch.tensor([[0.3, -1.5]])])) == pytest.approx(2.4)
    assert float(hinge_g_loss([torch.tensor([[0.3, -1.5]]), torch.tensor([[1.0]])])) == pytest.approx(-0.2)

    class Constant(nn.Module):  # D(x, s, c) = b everywhere
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.tensor(0.5))

        def forward(self, x, sigma, class_labels=None):
            return [self.b.expand(x.shape[0], 3)]

    pipe = _tiny_teacher()
    method = SCottDistillation(SCottStudentUNet.from_teacher(pipe.unet), pipe, karras_sigmas(8), adv_weight=0.4,
                               discriminator=Constant())
    batch = (torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3]))
    g = method(batch, 0, "generator")
    assert float(g["adv_g"]) == pytest.approx(-0.5)  # -mean D(fake) = -b
    assert float((g["loss"] - g["cd"]).detach()) == pytest.approx(0.4 * -0.5)
    g["loss"].backward()
    assert method.discriminator.b.grad is None  # the generator step leaves D alone
    d = method(batch, 0, "discriminator")
    assert float(d["loss"].detach()) == pytest.approx(0.5 + 1.5)  # relu(1 - b) + relu(1 + b)
    assert method.groups_for_step(0) == ["generator", "discriminator"]


def test_cd_path_is_eta_zero_ddim_and_the_teacher_solve_is_the_hand_euler_chain():
    pipe = _tiny_teacher()
    sigmas = karras_sigmas(6)
    batch = (torch.rand(5, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 4]))

    def loss(**kw):
        torch.manual_seed(7)
        method = SCottDistillation(SCottStudentUNet.from_teacher(pipe.unet), pipe, sigmas,
                                   guidance_range=(1.0, 3.0), substeps=2, **kw)
        return float(method(batch, 0)["loss"].detach())

    ode = loss(solver="ode")
    assert ode == loss(solver="ddim", eta=0.0) == loss(solver="er-sde", phi="ode")
    assert ode != loss(solver="ddim", eta=0.3)
    # the ODE teacher by hand: CFG by hand, Euler steps x + (s' - s)(x - D_w)/s at Karras sub-levels
    method = SCottDistillation(SCottStudentUNet.from_teacher(pipe.unet), pipe, sigmas, solver="ode", substeps=2,
                               guidance_range=(2.0, 2.0))
    den = EDMDenoiser(pipe.unet)
    x, c = torch.randn(5, 1, 8, 8), batch[1]
    t_n, t_m = sigmas[[3, 4, 5, 3, 2]], sigmas[[2, 3, 4, 2, 1]]
    got = method.teacher_solve(x, t_n, t_m, torch.full((5,), 2.0), class_labels=c)
    h, mid = x.clone(), ((t_n ** (1 / 7) + t_m ** (1 / 7)) / 2) ** 7
    for a, b in ((t_n, mid), (mid, t_m)):
        with torch.no_grad():
            cond, null = den(h, a, class_labels=c), den(h, a, class_labels=torch.full_like(c, 10))
        d = null + 2.0 * (cond - null)
        h = h + ((b - a) / a).float().view(5, 1, 1, 1) * (h - d)
    torch.testing.assert_close(got, h, rtol=0, atol=2e-5)


def test_scott_pipeline_round_trip(tmp_path):
    from gensample.loading import load_pipeline
    from gensample.pipelines import SCottPipeline

    pipe = _tiny_teacher()
    method = SCottDistillation(SCottStudentUNet.from_teacher(pipe.unet), pipe, karras_sigmas(10),
                               guidance_range=(1.0, 3.0))
    with torch.no_grad():
        method.student.backbone.time_embedding.cond_proj.weight.normal_(std=0.1)
    out = method.build_pipeline({"unet": method.student.backbone})
    assert out.config.num_classes == 10 and out.config.guidance_scale == 2.0
    out.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "SCottPipeline"
    for loaded in (SCottPipeline.from_pretrained(tmp_path), load_pipeline(tmp_path)):
        assert isinstance(loaded, SCottPipeline)
        for steps, w in ((1, 1.0), (4, 3.0)):
            a, b = (p(batch_size=3, num_inference_steps=steps, class_labels=[1, 2, 3], guidance_scale=w,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images for p in (out, loaded))
            assert torch.equal(a, b)
    one, three = (out(batch_size=3, class_labels=[1, 2, 3], guidance_scale=w, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images for w in (1.0, 3.0))
    assert not torch.equal(one, three)  # w reaches the student
    labels = out.prepare_class_labels(200, None, torch.Generator().manual_seed(0), "cpu")
    assert int(labels.max()) == 9  # the null label 10 is never drawn


class _GaussianTeacher(nn.Module):
    """The exact denoiser of x_0 ~ N(0, S2): an unconditional teacher whose PF-ODE is linear."""

    def forward(self, x, sigma, **_):
        return _gaussian_denoiser(x, torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]))


def test_end_to_end_loss_falls(tmp_path):
    """SCott (stochastic DDIM, eta 0.3, 2 sub-steps, EMA target) distils the exact Gaussian-data teacher into a
    randomly initialised tiny student through the Trainer: the loss on fixed draws falls (by 20% in 40 steps here;
    the stochastic target keeps a floor)."""
    from gensample.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    data = torch.randn(512, 1, 8, 8) * math.sqrt(S2)
    student = SCottStudentUNet(**dict(build_unet("tiny", sample_size=8).config))
    method = SCottDistillation(student, ClassifierFreeGuidance(_GaussianTeacher(), None), karras_sigmas(8),
                               substeps=2, solver="ddim", eta=0.3)

    def eval_loss() -> float:
        state = torch.random.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            value = float(method.generator_losses(data[:256], {})["cd"])
        torch.random.set_rng_state(state)
        return value

    before = eval_loss()
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=40, batch_size=16, learning_rate=2e-3,
                         checkpoint_every=0, sample_steps=(1,), num_sample_images=4, progress=False, log_every=40)
    Trainer(method, data, config).train()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)


def test_cli_train_scott_with_adversarial_term_and_sample(tmp_path):
    """`gensample train scott` (class-conditional teacher, LoRA discriminator) then `gensample sample` with a guidance
    scale and a class label."""
    from gensample.cli import main
    from gensample.loading import load_pipeline
    from gensample.pipelines import SCottPipeline

    _tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    assert main(["train", "scott", "--teacher", str(tmp_path / "teacher"), "--output", str(out), "--max-steps", "2",
                 "--batch-size", "8", "--num-sigmas", "8", "--substeps", "2", "--adv-weight", "0.4", "--lora-rank",
                 "2", "--guidance-range", "1", "3", "--sample-steps", "1", "--num-sample-images", "4",
                 "--checkpoint-every", "0", "--no-progress", "--threads", "1"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("discriminator/loss" in r for r in log)
    pipe = load_pipeline(out / "pipeline")
    assert isinstance(pipe, SCottPipeline) and pipe.config.guidance_scale == 2.0
    assert main(["sample", str(out / "pipeline"), "--num-inference-steps", "2", "--num-images", "4",
                 "--guidance-scale", "1.5", "--class-label", "7", "--output", str(tmp_path / "grid.png"),
                 "--no-progress"]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["sample", str(out / "pipeline"), "--class-label", "10", "--output", str(tmp_path / "g.png")]) == 2


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_precision_recall_coverage_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    gen = torch.tensor([[0.5], [1.2], [20.0], [21.0]])
    # k = 1 radii: real 1, 1, 1, 8 (10 -> 2); generated 0.7, 0.7, 1, 1
    assert knn_radii(real, 1).tolist() == [1.0, 1.0, 1.0, 8.0]
    out = precision_recall_coverage(real, gen, k=1)
    # precision: 0.5, 1.2 inside real balls; 20, 21 not -> 2/4. recall: real 0 (|0-0.5| <= .7) and 1 (|1-1.2| <= .7)
    # inside generated balls, 2 (|2-1.2| = .8 > .7) and 10 not -> 2/4. density: 0.5 in balls of 0, 1; 1.2 in balls
    # of 0? no (1.2 > 1), of 1 and 2 -> 4 / (1 * 4). coverage: balls of 0, 1, 2 hold a generated point -> 3/4.
    assert out == {"precision": 0.5, "recall": 0.5, "density": 1.0, "coverage": 0.75}


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path):
    from gensample.cli import main
    from gensample.methods.scott import check_student_matches_teacher

    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        stochastic_ddim_step(x, 2.0, 1.0, x, -0.1, x)
    with pytest.raises(ValueError, match="substeps"):
        sde_solve(_gaussian_denoiser, x, 2.0, 1.0, 0, STEPS["ddim-0"])
    with pytest.raises(ValueError, match="phi"):
        er_sde_step(x, 2.0, 1.0, x, x, phi="nope")
    pipe, uncond = _tiny_teacher(), _tiny_teacher(None)
    student = SCottStudentUNet.from_teacher(pipe.unet)
    for kwargs, match in (({"eta": -0.1}, "eta"), ({"substeps": 0}, "substeps"), ({"solver": "heun"}, "solver"),
                          ({"skip": 8}, "skip"), ({"adv_weight": 0.4}, "discriminator")):
        with pytest.raises(ValueError, match=match):
            SCottDistillation(student, pipe, karras_sigmas(8), **kwargs)
    with pytest.raises(ValueError, match="unconditional"):
        SCottDistillation(SCottStudentUNet.from_teacher(uncond.unet), uncond, karras_sigmas(8),
                          guidance_range=(1.0, 2.0))
    with pytest.raises(ValueError, match="from_teacher"):
        from gensample.models.scott_student import init_from_teacher

        init_from_teacher(SCottStudentUNet(**{**dict(build_unet("tiny", sample_size=8).config), "in_channels": 3,
                                              "out_channels": 3}), build_unet("tiny", sample_size=8))
    with pytest.raises(ValueError, match="teacher is 1-channel 8x8"):
        check_student_matches_teacher(build_unet("tiny", sample_size=16), pipe.unet)
    with pytest.raises(ValueError, match="labelled batches"):
        SCottDistillation(student, pipe, karras_sigmas(8))(torch.zeros(2, 1, 8, 8), 0)
    # the CLI: not a pipeline folder, eta < 0, substeps < 1, guidance on an unconditional teacher
    uncond.save_pretrained(tmp_path / "uncond")
    run = ["train", "scott", "--output", str(tmp_path / "out"), "--max-steps", "1"]
    assert main(run + ["--teacher", str(tmp_path)]) == 2
    assert main(run + ["--teacher", str(tmp_path / "uncond"), "--substeps", "0"]) == 2
    assert main(run + ["--teacher", str(tmp_path / "uncond"), "--guidance-range", "1", "3"]) == 2
    with pytest.raises(SystemExit):
        main(run + ["--teacher", str(tmp_path / "uncond"), "--eta", "-0.5"])
