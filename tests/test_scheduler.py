"""ConsistencyScheduler against (a) a direct transcription of openai/consistency_models' stochastic_iterative_sampler
(CM Algorithm 1) and (b) diffusers' CMStochasticIterativeScheduler / ConsistencyModelPipeline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

from gensample.core.parametrization import ConsistencyFunction
from gensample.pipelines import ConsistencyPipeline
from gensample.schedulers import ConsistencyScheduler, ConsistencySchedulerOutput

SIGMA_MIN, SIGMA_MAX, RHO, STEPS = 0.002, 80.0, 7.0, 40


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: one intra-op thread is faster and immune to CPU contention from other jobs; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(channels: int = 1, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8,
    ).eval()


# --------------------------------------------------------------------------------------------------------------------
# (a) openai/consistency_models, cm/karras_diffusion.py, transcribed (not imported from gensample)
# --------------------------------------------------------------------------------------------------------------------
def openai_karras_t(index: int, steps: int = STEPS, t_min: float = SIGMA_MIN, t_max: float = SIGMA_MAX,
                    rho: float = RHO) -> float:
    t_max_rho, t_min_rho = t_max ** (1 / rho), t_min ** (1 / rho)
    return (t_max_rho + index / (steps - 1) * (t_min_rho - t_max_rho)) ** rho


def openai_multistep(distiller, x, ts_sigmas, generator, t_min=SIGMA_MIN, t_max=SIGMA_MAX):
    """stochastic_iterative_sampler over the noise levels t_0 > t_1 > ... (the last one is t_min) with
    ``distiller`` = the clamped denoiser of karras_sample. Draws z on *every* iteration, like openai."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(ts_sigmas) - 1):
        t = ts_sigmas[i]
        x0 = distiller(x, t * s_in)
        next_t = float(np.clip(ts_sigmas[i + 1], t_min, t_max))
        x = x0 + torch.randn(x.shape, generator=generator, dtype=x.dtype) * math.sqrt(next_t**2 - t_min**2)
    return x


def openai_sample(f, shape, ts_sigmas, seed):
    """karras_sample: x_T = sigma_max * z, then the multistep sampler (one level = sample_onestep), clamp."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g) * SIGMA_MAX

    def distiller(x, t):
        return f(x, t).clamp(-1, 1)

    if len(ts_sigmas) == 2:  # sample_onestep == one iteration whose noise is multiplied by 0
        out = distiller(x_T, ts_sigmas[0] * x_T.new_ones([shape[0]]))
    else:
        out = openai_multistep(distiller, x_T, ts_sigmas, g)
    return out.clamp(-1, 1)


def scheduler_sample(unet, scheduler, shape, seed, **set_timesteps_kwargs):
    """The diffusers-style loop: scale_model_input -> unet -> step; x_T from the same generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(**set_timesteps_kwargs)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        model_out = unet(model_in, t).sample
        x = scheduler.step(model_out, t, x, generator=g).prev_sample
    return x


TS_CASES = {1: [0], 2: [0, 22], 3: [0, 12, 26]}


@pytest.mark.parametrize("n_steps", [1, 2, 3])
def test_scheduler_matches_openai_sampler_with_timesteps(n_steps):
    unet = tiny_unet()
    f = ConsistencyFunction(unet)
    shape = (2, 1, 8, 8)
    ts = TS_CASES[n_steps] + [STEPS - 1]  # openai's ts include the final index, e.g. (0, 22, 39)
    ts_sigmas = [openai_karras_t(i) for i in ts]
    with torch.no_grad():
        expected = openai_sample(f, shape, ts_sigmas, seed=7)
        got = scheduler_sample(unet, ConsistencyScheduler(num_train_timesteps=STEPS), shape, seed=7,
                               timesteps=TS_CASES[n_steps])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # non-trivial: the samples are not saturated and the number of steps changes them
    assert ((got > -1) & (got < 1)).float().mean() > 0.5


@pytest.mark.parametrize("sigmas", [[80.0], [80.0, 0.821], [80.0, 5.0, 0.5]])
def test_scheduler_matches_openai_sampler_with_explicit_sigmas(sigmas):
    unet = tiny_unet()
    f = ConsistencyFunction(unet)
    shape = (2, 1, 8, 8)
    with torch.no_grad():
        expected = openai_sample(f, shape, sigmas + [SIGMA_MIN], seed=3)
        got = scheduler_sample(unet, ConsistencyScheduler(), shape, seed=3, sigmas=sigmas)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_openai_comparison_is_sensitive():
    """The reference comparison can fail: a different intermediate level or seed changes the sample."""
    unet = tiny_unet()
    shape = (2, 1, 8, 8)
    with torch.no_grad():
        a = scheduler_sample(unet, ConsistencyScheduler(), shape, seed=3, sigmas=[80.0, 0.821])
        b = scheduler_sample(unet, ConsistencyScheduler(), shape, seed=3, sigmas=[80.0, 1.5])
        c = scheduler_sample(unet, ConsistencyScheduler(), shape, seed=4, sigmas=[80.0, 0.821])
        one = scheduler_sample(unet, ConsistencyScheduler(), shape, seed=3, sigmas=[80.0])
    assert (a - b).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3
    assert (a - one).abs().max() > 1e-3


def test_step_returns_denoised_and_renoised_sample():
    """step: denoised = clamp(c_skip x + c_out F); prev = denoised + sqrt(sigma_next^2 - sigma_min^2) z."""
    sched = ConsistencyScheduler()
    sched.set_timesteps(sigmas=[10.0, 0.5])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    F = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sched.step(F, sched.timesteps[0], x, generator=torch.Generator().manual_seed(2))
    assert isinstance(out, ConsistencySchedulerOutput)
    # table values for sigma = 10 (consistency-training.md §7.3), computed independently
    c_skip, c_out = 0.25 / ((10.0 - 0.002) ** 2 + 0.25), (10.0 - 0.002) * 0.5 / math.sqrt(100.25)
    denoised = (c_skip * x + c_out * F).clamp(-1, 1)
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.denoised, denoised, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.prev_sample, denoised + math.sqrt(0.25 - 0.002**2) * z, rtol=0, atol=1e-6)
    # last step: no noise, prev_sample is the clean estimate
    out2 = sched.step(F, sched.timesteps[1], out.prev_sample, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out2.prev_sample, out2.denoised)
    with pytest.raises(ValueError, match="more times than there are timesteps"):
        sched.step(F, sched.timesteps[1], out.prev_sample)


def test_step_rejects_mismatched_model_output():
    sched = ConsistencyScheduler()
    with pytest.raises(ValueError, match="model_output shape"):
        sched.step(torch.zeros(1, 1, 4, 4), sched.timesteps[0], torch.zeros(1, 1, 8, 8))


def test_scale_model_input_is_c_in():
    sched = ConsistencyScheduler()
    sched.set_timesteps(sigmas=[80.0, 1.0])
    x = torch.ones(1, 1, 2, 2)
    assert sched.scale_model_input(x, sched.timesteps[0])[0, 0, 0, 0].item() == pytest.approx(0.012500, abs=1e-6)
    sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    assert sched.scale_model_input(x, sched.timesteps[1])[0, 0, 0, 0].item() == pytest.approx(0.894427, abs=1e-6)


def test_timesteps_are_c_noise_like_diffusers():
    """[0, 22] -> UNet timesteps 250 ln(sigma) = [1095.51, 80.95] (diffusers: timesteps=[22, 0]); order-free."""
    for ts in ([0, 22], [22, 0]):
        sched = ConsistencyScheduler(num_train_timesteps=40)
        sched.set_timesteps(timesteps=ts)
        torch.testing.assert_close(sched.timesteps, torch.tensor([1095.5067, 80.9495]), rtol=0, atol=1e-3)
        torch.testing.assert_close(sched.sigmas, torch.tensor([80.0, 1.38237, 0.002], dtype=torch.float64),
                                   rtol=5e-6, atol=0)
    sched.set_timesteps(2)
    torch.testing.assert_close(sched.timesteps, torch.tensor([1095.507, 201.668]), rtol=0, atol=1e-3)
    assert sched.sigmas[1].item() == pytest.approx(2.2404, abs=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# (b) diffusers' CMStochasticIterativeScheduler and ConsistencyModelPipeline
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def both_pipelines():
    # 3 channels: diffusers' ConsistencyModelPipeline.check_inputs hard-codes 3 channels for explicit latents
    unet = tiny_unet(channels=3)
    ours = ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler(num_train_timesteps=40))
    theirs = ConsistencyModelPipeline(
        unet=unet, scheduler=CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80)
    )
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize(
    "ours_kwargs, theirs_kwargs",
    [
        (dict(num_inference_steps=1), dict(num_inference_steps=1)),
        (dict(num_inference_steps=2), dict(num_inference_steps=2)),
        (dict(timesteps=[0, 22]), dict(num_inference_steps=None, timesteps=[22, 0])),
    ],
    ids=["1step", "2steps", "ts22"],
)
@pytest.mark.parametrize("explicit_latents", [True, False], ids=["latents", "generator"])
def test_pipeline_agrees_with_diffusers(both_pipelines, ours_kwargs, theirs_kwargs, explicit_latents):
    ours, theirs = both_pipelines
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11)) if explicit_latents else None
    a = ours(batch_size=2, latents=latents, generator=torch.Generator().manual_seed(5), output_type="pt",
             **ours_kwargs).images
    b = theirs(batch_size=2, latents=latents, generator=torch.Generator().manual_seed(5), output_type="pt",
               **theirs_kwargs).images
    assert a.shape == b.shape == (2, 3, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the images are not constant (so the comparison means something)
    assert a.std() > 0.01


def test_diffusers_comparison_is_sensitive(both_pipelines):
    ours, theirs = both_pipelines
    a = ours(batch_size=2, timesteps=[0, 22], generator=torch.Generator().manual_seed(5), output_type="pt").images
    b = theirs(batch_size=2, num_inference_steps=None, timesteps=[17, 0], generator=torch.Generator().manual_seed(5),
               output_type="pt").images
    assert (a - b).abs().max() > 1e-3


def test_step_return_tuple_differs_from_diffusers():
    """Documented difference: ours returns (prev_sample, denoised), diffusers a 1-tuple (prev_sample,)."""
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 80
    F = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = ConsistencyScheduler(num_train_timesteps=40)
    ours.set_timesteps(timesteps=[0, 22])
    theirs = CMStochasticIterativeScheduler(num_train_timesteps=40)
    theirs.set_timesteps(timesteps=[22, 0])
    theirs.scale_model_input(x, theirs.timesteps[0])
    r_ours = ours.step(F, ours.timesteps[0], x, generator=torch.Generator().manual_seed(2), return_dict=False)
    r_theirs = theirs.step(F, theirs.timesteps[0], x, generator=torch.Generator().manual_seed(2), return_dict=False)
    assert isinstance(r_ours, tuple) and len(r_ours) == 2
    assert isinstance(r_theirs, tuple) and len(r_theirs) == 1
    torch.testing.assert_close(r_ours[0], r_theirs[0], rtol=0, atol=1e-5)
    # our second element is the clean estimate: prev_sample = denoised + sqrt(1.38237^2 - 0.002^2) z
    z = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(r_ours[0], r_ours[1] + math.sqrt(1.38237**2 - 0.002**2) * z, rtol=0, atol=1e-4)


def _final_step_generator_advance(scheduler, set_kwargs):
    """Run every step with one generator and return (state changed by the final step?, changed over all steps?)."""
    scheduler.set_timesteps(**set_kwargs)
    g = torch.Generator().manual_seed(0)
    start = g.get_state().clone()
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(9)) * 80
    n = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        scheduler.scale_model_input(x, t)
        before = g.get_state().clone()
        x = scheduler.step(torch.zeros_like(x), t, x, generator=g, return_dict=False)[0]
        if i == n - 1:
            final_changed = not torch.equal(before, g.get_state())
    return final_changed, not torch.equal(start, g.get_state())


def test_generator_consumption_differs_from_diffusers_on_final_step():
    """Documented difference: ours draws no noise on the final step (next level = sigma_min); diffusers draws (and
    multiplies by zero) on every step of a multistep schedule. In a 1-step schedule neither draws (diffusers
    special-cases len(timesteps) == 1)."""
    ours_final, ours_any = _final_step_generator_advance(ConsistencyScheduler(), dict(timesteps=[0, 22]))
    theirs_final, theirs_any = _final_step_generator_advance(CMStochasticIterativeScheduler(),
                                                            dict(timesteps=[22, 0]))
    assert ours_any and theirs_any  # both draw between the two steps
    assert not ours_final
    assert theirs_final
    # 1-step schedules: the generator is untouched by either
    assert _final_step_generator_advance(ConsistencyScheduler(), dict(num_inference_steps=1)) == (False, False)
    assert _final_step_generator_advance(CMStochasticIterativeScheduler(), dict(num_inference_steps=1)) == (False,
                                                                                                            False)


def test_pipeline_generator_state_after_sampling(both_pipelines):
    """Through the pipelines: same state after a 1-step run (latents only), diffusers one draw ahead after 2 steps."""
    ours, theirs = both_pipelines
    for steps, same in ((1, True), (2, False)):
        g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ours(batch_size=2, num_inference_steps=steps, generator=g_ours, output_type="pt")
        theirs(batch_size=2, num_inference_steps=steps, generator=g_theirs, output_type="pt")
        assert torch.equal(g_ours.get_state(), g_theirs.get_state()) is same
        if not same:
            # diffusers is exactly one (2, 3, 8, 8) normal draw ahead of us
            torch.randn((2, 3, 8, 8), generator=g_ours)
            assert torch.equal(g_ours.get_state(), g_theirs.get_state())


# --------------------------------------------------------------------------------------------------------------------
# (c) config round trip and set_timesteps validation
# --------------------------------------------------------------------------------------------------------------------
def test_config_round_trip(tmp_path):
    sched = ConsistencyScheduler(num_train_timesteps=151, sigma_min=0.003, sigma_max=40.0, sigma_data=0.6, rho=5.0,
                                 s_noise=0.9, clip_denoised=False)
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = ConsistencyScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded, ConsistencyScheduler)
    for key in ("num_train_timesteps", "sigma_min", "sigma_max", "sigma_data", "rho", "s_noise", "clip_denoised"):
        assert loaded.config[key] == sched.config[key], key
    assert loaded.config.num_train_timesteps == 151 and loaded.config.clip_denoised is False
    assert loaded.init_noise_sigma == 40.0
    for s in (sched, loaded):
        s.set_timesteps(timesteps=[0, 67])
    torch.testing.assert_close(loaded.sigmas, sched.sigmas, rtol=0, atol=0)
    assert loaded.sigmas[-1].item() == pytest.approx(0.003)
    # defaults survive a round trip too
    ConsistencyScheduler().save_pretrained(tmp_path / "default")
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(ConsistencyScheduler.from_pretrained(tmp_path / "default").config) == public(
        ConsistencyScheduler().config
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=0), r"`num_inference_steps` must be an integer >= 1, got 0"),
        (dict(num_inference_steps=-1), r"`num_inference_steps` must be an integer >= 1, got -1"),
        (dict(num_inference_steps=41), r"cannot exceed `num_train_timesteps` \(40\).*sigmas"),
        (dict(num_inference_steps=2, sigmas=[80.0, 1.0]), r"exactly one of"),
        (dict(num_inference_steps=2, timesteps=[0, 22]), r"exactly one of"),
        (dict(), r"exactly one of"),
        (dict(sigmas=[1.0, 80.0]), r"strictly descending"),
        (dict(sigmas=[80.0, 80.0]), r"strictly descending"),
        (dict(sigmas=[]), r"non-empty"),
        (dict(sigmas=[100.0, 1.0]), r"\(sigma_min, sigma_max\] = \(0.002, 80.0\]"),
        (dict(sigmas=[80.0, 0.002]), r"\(sigma_min, sigma_max\]"),
        (dict(sigmas=[80.0, 0.001]), r"\(sigma_min, sigma_max\]"),
        (dict(timesteps=[0, 22, 39]), r"index 39 is sigma_min, the implicit end point: leave it out"),
        (dict(timesteps=[0, 40]), r"\[0, 38\]"),
        (dict(timesteps=[-1, 22]), r"\[0, 38\]"),
        (dict(timesteps=[0, 0]), r"distinct"),
        (dict(timesteps=[]), r"distinct grid indices"),
        (dict(timesteps=[0, 22.5]), r"distinct grid indices"),
        (dict(num_inference_steps=True), r"`num_inference_steps` must be an integer >= 1, got True"),
        (dict(sigmas=[80.0, float("nan")]), r"finite"),
    ],
)
def test_set_timesteps_errors(kwargs, match):
    sched = ConsistencyScheduler(num_train_timesteps=40)
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(**kwargs)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 2"):
        ConsistencyScheduler(num_train_timesteps=1)
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        ConsistencyScheduler(sigma_min=1.0, sigma_max=0.5)


def test_set_timesteps_resets_step_index():
    sched = ConsistencyScheduler()
    sched.set_timesteps(2)
    x = torch.zeros(1, 1, 2, 2)
    sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    assert sched.step_index == 1
    sched.set_timesteps(2)
    assert sched.step_index is None
    assert sched.scale_model_input(torch.ones(1, 1, 1, 1), None).item() == pytest.approx(0.0125, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# (d) add_noise
# --------------------------------------------------------------------------------------------------------------------
def test_add_noise_at_sigma_scalar_and_per_sample():
    sched = ConsistencyScheduler()
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sched.add_noise_at_sigma(x0, z, 2.5), x0 + 2.5 * z)
    torch.testing.assert_close(sched.add_noise_at_sigma(x0, z, torch.tensor(0.5)), x0 + 0.5 * z)
    sig = torch.tensor([0.002, 1.0, 80.0])
    got = sched.add_noise_at_sigma(x0, z, sig)
    for b in range(3):
        torch.testing.assert_close(got[b], x0[b] + sig[b].item() * z[b])
    # any sigma, not tied to the sampling timesteps
    sched.set_timesteps(1)
    torch.testing.assert_close(sched.add_noise_at_sigma(x0, z, 0.37), x0 + 0.37 * z)
    # dtype follows the samples
    assert sched.add_noise_at_sigma(x0.double(), z.double(), sig).dtype == torch.float64


def test_add_noise_reads_timesteps_like_diffusers():
    """add_noise(x0, z, t) takes values of scheduler.timesteps (diffusers' meaning), not sigmas: the same numbers as
    CMStochasticIterativeScheduler.add_noise; a value that is not a timestep is refused with a hint."""
    ours, theirs = ConsistencyScheduler(num_train_timesteps=40), CMStochasticIterativeScheduler(num_train_timesteps=40)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    per_sample = ours.timesteps[[0, 1, 2, 3]]
    torch.testing.assert_close(ours.add_noise(x0, z, per_sample),
                               theirs.add_noise(x0, z, theirs.timesteps[[0, 1, 2, 3]]), rtol=0, atol=1e-5)
    for i in range(4):
        want = x0 + ours.sigmas[i].float() * z
        torch.testing.assert_close(ours.add_noise(x0, z, ours.timesteps[i]), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps.*add_noise_at_sigma"):
        ours.add_noise(x0, z, 2.5)  # a sigma, the old meaning
    with pytest.raises(ValueError, match="enumerate"):
        ours.add_noise(x0, z, 1)  # an index


def test_recorded_sampling_sigmas_drive_num_inference_steps(tmp_path):
    from gensample.schedulers import ConsistencyScheduler as Sched

    sched = Sched(num_train_timesteps=1281, sampling_sigmas=[80.0, 1.5])
    sched.set_timesteps(2)
    assert sched.sigmas.tolist() == [80.0, 1.5, 0.002]
    sched.set_timesteps(3)  # longer than the recorded schedule: the grid-index rule
    assert sched.sigmas[1].item() != 1.5 and len(sched.sigmas) == 4
    sched.save_pretrained(tmp_path)
    again = Sched.from_pretrained(tmp_path)
    again.set_timesteps(2)
    assert again.sigmas.tolist() == [80.0, 1.5, 0.002]
    with pytest.raises(ValueError, match="sampling_sigmas"):
        Sched(sampling_sigmas=[1.0, 2.0])
