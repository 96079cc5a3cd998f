"""diffusers' scheduler contract (tests/schedulers/test_schedulers.py ``SchedulerCommonTest`` and
test_scheduler_consistency_model.py at huggingface/diffusers 58eb52c0), checked on every scheduler gensample ships.

The dummy sample, noise and model below are written from SchedulerCommonTest's definitions (``dummy_sample_deter``,
``dummy_noise_deter``, ``dummy_model``); the three consistency-model loops reproduce the numbers asserted by diffusers'
``CMStochasticIterativeSchedulerTest`` through diffusers-style calls.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from gensample.schedulers import ConsistencyScheduler, CTMScheduler, EDMHeunScheduler

ICT_DIGITS_SCHEDULER = Path(__file__).resolve().parents[1] / "assets" / "pipelines" / "ict-digits" / "scheduler"

# (class, constructor kwargs, set_timesteps kwargs, classes `compatibles` must list)
CASES = {
    "consistency": (ConsistencyScheduler, dict(num_train_timesteps=201, sigma_min=0.002, sigma_max=80.0),
                    dict(num_inference_steps=10), {ConsistencyScheduler, CMStochasticIterativeScheduler}),
    "ctm": (CTMScheduler, dict(num_train_timesteps=18, gamma=0.5), dict(num_inference_steps=10), {CTMScheduler}),
    "edm_heun": (EDMHeunScheduler, dict(sigma_min=0.002, sigma_max=80.0), dict(num_inference_steps=6),
                 {EDMHeunScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler}),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    return CASES[request.param]


def make(case):
    cls, kwargs, set_kwargs, _ = case
    scheduler = cls(**kwargs)
    scheduler.set_timesteps(**set_kwargs)
    return scheduler


# -- SchedulerCommonTest's dummies ------------------------------------------------------------------------------------
def dummy_sample_deter() -> torch.Tensor:
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_noise_deter() -> torch.Tensor:
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_sample(seed: int = 0) -> torch.Tensor:
    return torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


def dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.device, dtype=sample.dtype)
    return sample * t / (t + 1)


def run_loop(scheduler, sample: torch.Tensor, timesteps, seed: int = 0) -> torch.Tensor:
    """diffusers' loop: scale_model_input -> model -> step(...).prev_sample."""
    generator = torch.Generator().manual_seed(seed)
    for t in timesteps:
        model_output = dummy_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
    return sample


def level(scheduler, i: int) -> torch.Tensor:
    """The noise level of timesteps[i], from the public schedule (EDM Heun: evaluation i is at t_{(i+1)//2})."""
    if isinstance(scheduler, EDMHeunScheduler):
        return scheduler.sigmas[(i + 1) // 2]
    return scheduler.sigmas[i]


# -- config -----------------------------------------------------------------------------------------------------------
def test_save_config_from_pretrained_round_trip(case, tmp_path):
    scheduler = make(case)
    scheduler.save_config(tmp_path)
    loaded = type(scheduler).from_pretrained(tmp_path)
    config = dict(scheduler.config)
    config.pop("_use_default_values", None)
    assert dict(loaded.config) == config
    loaded.set_timesteps(**case[2])
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps, rtol=0, atol=0)
    sample = dummy_sample()
    t = scheduler.timesteps[0]
    a = scheduler.step(0.1 * sample, t, sample, generator=torch.manual_seed(0)).prev_sample
    b = loaded.step(0.1 * sample, t, sample, generator=torch.manual_seed(0)).prev_sample
    assert torch.equal(a, b)


def test_from_config_of_our_config(case):
    scheduler = make(case)
    again = type(scheduler).from_config(scheduler.config)
    assert type(again) is type(scheduler)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def test_compatibles_resolve_to_the_declared_classes(case):
    """diffusers resolves `_compatibles` names in its own namespace only (and so would drop our classes, even the
    scheduler itself); ours also looks in gensample.schedulers. Every compatible class loads our config and gives
    it back unchanged (SchedulerCommonTest.test_compatibles)."""
    scheduler = make(case)
    assert set(scheduler.compatibles) == case[3]
    assert len(scheduler.compatibles) == len(case[3])
    for compatible in scheduler.compatibles:
        other = compatible.from_config(scheduler.config)
        back = type(scheduler).from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config and not k.startswith("_")} == {
            k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def test_edm_compatibles_share_the_levels_but_not_the_time_conditioning():
    """diffusers' EDM schedulers, listed as compatible with EDMHeunScheduler, sample the same levels from its
    config, but their timesteps are c_noise = 0.25 ln(sigma), 1/1000 of the 250 ln(sigma) gensample's EDM models
    take (EDMPipeline converts; a hand-written loop must pass 1000 t)."""
    ours = EDMHeunScheduler()
    ours.set_timesteps(5)
    for cls in (EDMEulerScheduler, EDMDPMSolverMultistepScheduler):
        theirs = cls.from_config(ours.config)
        theirs.set_timesteps(5)
        torch.testing.assert_close(theirs.sigmas.double(), ours.sigmas, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours.timesteps[::2].double(), 1000 * theirs.timesteps.double(), rtol=1e-6, atol=0)


# -- add_noise --------------------------------------------------------------------------------------------------------
def test_add_noise_at_any_timestep_is_x0_plus_sigma_noise(case):
    scheduler = make(case)
    x0, noise = dummy_sample(0), dummy_sample(1)
    for i, t in enumerate(scheduler.timesteps):
        want = x0 + level(scheduler, i).float() * noise
        assert torch.equal(scheduler.add_noise(x0, noise, t), want), i
        assert torch.equal(scheduler.add_noise(x0, noise, scheduler.timesteps[i:i + 1]), want), i
        assert torch.equal(scheduler.add_noise_at_sigma(x0, noise, level(scheduler, i)), want), i
    # one timestep per sample
    picks = [0, 3, 1, len(scheduler.timesteps) - 1]
    got = scheduler.add_noise(x0, noise, scheduler.timesteps[picks])
    for b, i in enumerate(picks):
        assert torch.equal(got[b], x0[b] + level(scheduler, i).float() * noise[b])


def test_add_noise_refuses_values_that_are_not_timesteps(case):
    scheduler = make(case)
    x0 = dummy_sample()
    with pytest.raises(ValueError, match="not one of scheduler.timesteps.*add_noise_at_sigma"):
        scheduler.add_noise(x0, x0, float(level(scheduler, 1)))  # a sigma: the old meaning of the argument


# -- the step index ---------------------------------------------------------------------------------------------------
def start_indices(scheduler) -> list[int]:
    """Where a run may start: every step (EDM Heun: every predictor, the even evaluations)."""
    if isinstance(scheduler, EDMHeunScheduler):
        return list(range(2, len(scheduler.timesteps), 2))
    return list(range(1, len(scheduler.timesteps)))


def test_mid_schedule_start_equals_a_schedule_that_starts_there(case):
    """diffusers' test_full_loop_with_noise pattern: add_noise at timesteps[k], then loop over timesteps[k:]; equal
    to sampling a schedule whose first level is that sigma from add_noise_at_sigma(sigma_k)."""
    x0, noise = dummy_sample_deter(), dummy_noise_deter()
    for k in start_indices(make(case)):
        scheduler = make(case)
        timesteps = scheduler.timesteps[k:]
        got = run_loop(scheduler, scheduler.add_noise(x0, noise, timesteps[:1]), timesteps, seed=k)

        reference = make(case)
        sigma_k = level(reference, k)
        rest = reference.sigmas[(k + 1) // 2:] if isinstance(reference, EDMHeunScheduler) else reference.sigmas[k:-1]
        reference.set_timesteps(sigmas=rest)
        torch.testing.assert_close(reference.timesteps, timesteps, rtol=0, atol=0)
        want = run_loop(reference, reference.add_noise_at_sigma(x0, noise, sigma_k), reference.timesteps, seed=k)
        assert torch.equal(got, want), k
        # and it differs from a run from the start (the protocol does not silently begin at step 0)
        full = make(case)
        assert not torch.equal(run_loop(full, full.add_noise(x0, noise, timesteps[:1]), full.timesteps, seed=k), got)


def test_set_begin_index(case):
    scheduler = make(case)
    n = len(scheduler.timesteps)
    k = 2 if n > 2 else 0
    x0, noise = dummy_sample(0), dummy_sample(1)
    scheduler.set_begin_index(k)
    assert scheduler.begin_index == k and scheduler.step_index is None
    # with a begin index, add_noise (before the first step) uses its level for any timestep, as diffusers does
    want = x0 + level(scheduler, k).float() * noise
    assert torch.equal(scheduler.add_noise(x0, noise, scheduler.timesteps[0]), want)
    # the first call starts at begin_index whatever timestep it gets; each step advances by one
    scheduler.scale_model_input(x0, scheduler.timesteps[0])
    assert scheduler.step_index == k
    scheduler.step(0.1 * x0, scheduler.timesteps[0], x0, generator=torch.manual_seed(0))
    assert scheduler.step_index == k + 1
    # same result as a run located by timestep
    a, b = make(case), make(case)
    a.set_begin_index(k)
    assert torch.equal(run_loop(a, x0, a.timesteps[k:]), run_loop(b, x0, b.timesteps[k:]))
    # set_timesteps clears it; bad values are refused
    scheduler.set_timesteps(**case[2])
    assert scheduler.begin_index is None and scheduler.step_index is None
    for bad in (-1, n, 1.5, None):
        with pytest.raises(ValueError, match="begin_index"):
            scheduler.set_begin_index(bad)


def test_step_locates_its_index_from_the_timestep(case):
    scheduler = make(case)
    k = start_indices(scheduler)[0]
    sample = dummy_sample()
    scheduler.scale_model_input(sample, scheduler.timesteps[k])
    assert scheduler.step_index == k
    fresh = make(case)
    fresh.step(0.1 * sample, fresh.timesteps[k], sample, generator=torch.manual_seed(0))
    assert fresh.step_index == k + 1
    # an index from enumerate() instead of a timestep value is refused with a hint
    with pytest.raises(ValueError, match="enumerate"):
        make(case).step(0.1 * sample, 1, sample)
    # stepping past the end of the schedule is refused
    done = make(case)
    run_loop(done, sample, done.timesteps)
    with pytest.raises(ValueError, match="set_timesteps"):
        done.step(0.1 * sample, done.timesteps[-1], sample)


def test_edm_heun_repeated_timesteps_resolve_to_the_predictor():
    """timesteps = c_noise(t_0, t_1, t_1, t_2, t_2, ...): a repeated t_j resolves to its second entry 2j (diffusers'
    index_for_timestep), the predictor of Heun step j; a run cannot start at a corrector."""
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) == 7 and len(scheduler) == 7
    for j in (1, 2, 3):
        assert scheduler.timesteps[2 * j - 1] == scheduler.timesteps[2 * j]
        assert scheduler.index_for_timestep(scheduler.timesteps[2 * j]) == 2 * j
    sample = dummy_sample()
    scheduler.set_begin_index(3)
    with pytest.raises(ValueError, match="corrector of Heun step 1"):
        scheduler.step(0.1 * sample, scheduler.timesteps[3], sample)


# -- step outputs -----------------------------------------------------------------------------------------------------
def test_step_shapes_and_both_output_forms(case):
    sample = dummy_sample()
    residual = 0.1 * sample
    scheduler = make(case)
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    out_0 = scheduler.step(residual, t0, sample, generator=torch.manual_seed(0))
    out_1 = scheduler.step(residual, t1, sample, generator=torch.manual_seed(0))
    assert out_0.prev_sample.shape == sample.shape == out_1.prev_sample.shape
    assert out_0.denoised.shape == sample.shape
    # tuple form: first element prev_sample, then denoised; equal to the dict form
    again = make(case)
    tup = again.step(residual, t0, sample, generator=torch.manual_seed(0), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2
    assert torch.equal(tup[0], out_0.prev_sample) and torch.equal(tup[1], out_0.denoised)
    assert list(out_0.keys())[:2] == ["prev_sample", "denoised"]
    # the clean estimate under diffusers' name
    if isinstance(scheduler, CTMScheduler):  # only where the jump lands on sigma_min (here: gamma = 0.5, not last)
        assert out_0.pred_original_sample is None
    else:
        assert out_0.pred_original_sample is out_0.denoised


def test_ctm_pred_original_sample_on_jumps_to_sigma_min():
    sample = dummy_sample()
    for gamma, first_is_clean in ((1.0, True), (0.0, False)):
        scheduler = CTMScheduler(gamma=gamma)
        scheduler.set_timesteps(2)
        outs = [scheduler.step(0.1 * sample, t, sample, generator=torch.manual_seed(0)) for t in scheduler.timesteps]
        assert (outs[0].pred_original_sample is outs[0].denoised) is first_is_clean
        assert outs[1].pred_original_sample is outs[1].denoised  # the last step lands on sigma_min


def test_public_api(case):
    scheduler = make(case)
    for name in ("init_noise_sigma", "order", "timesteps", "sigmas", "num_inference_steps", "step_index",
                 "begin_index", "set_begin_index", "index_for_timestep", "add_noise", "add_noise_at_sigma",
                 "scale_model_input", "step", "set_timesteps"):
        assert hasattr(scheduler, name), name
    assert len(scheduler) > 0
    assert scheduler.scale_model_input(dummy_sample(), scheduler.timesteps[0]).shape == dummy_sample().shape


# -- diffusers' CMStochasticIterativeSchedulerTest numbers ------------------------------------------------------------
CM_CONFIG = dict(num_train_timesteps=201, sigma_min=0.002, sigma_max=80.0)


def cm_full_loop(cls, mode: str) -> torch.Tensor:
    scheduler = cls(**CM_CONFIG)
    if mode == "onestep":
        scheduler.set_timesteps(1)
    elif mode == "multistep":
        scheduler.set_timesteps(timesteps=[106, 0])
    else:
        scheduler.set_timesteps(10)
    generator = torch.manual_seed(0)
    sample = dummy_sample_deter() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if mode == "with_noise":
        timesteps = scheduler.timesteps[8 * scheduler.order:]
        sample = scheduler.add_noise(sample, dummy_noise_deter(), timesteps[:1])
    for t in timesteps:
        residual = dummy_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(residual, t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("cls", [ConsistencyScheduler, CMStochasticIterativeScheduler], ids=["ours", "diffusers"])
@pytest.mark.parametrize("mode, result_sum, result_mean", [
    ("onestep", 192.7614, 0.2510), ("multistep", 347.6357, 0.4527), ("with_noise", 763.9186, 0.9947),
])
def test_diffusers_consistency_model_numbers(cls, mode, result_sum, result_mean):
    sample = cm_full_loop(cls, mode)
    assert abs(sample.abs().sum().item() - result_sum) < 1e-2
    assert abs(sample.abs().mean().item() - result_mean) < 1e-3


def test_consistency_equals_diffusers_on_the_full_loop_with_noise():
    torch.testing.assert_close(cm_full_loop(ConsistencyScheduler, "with_noise"),
                               cm_full_loop(CMStochasticIterativeScheduler, "with_noise"), rtol=0, atol=1e-5)


# -- tuned schedules and diffusers' CM scheduler ----------------------------------------------------------------------
def test_diffusers_timesteps_without_a_tuned_schedule_is_diffusers_rule():
    ours = ConsistencyScheduler(num_train_timesteps=40)
    for n in (1, 2, 3, 7):
        timesteps = ours.diffusers_timesteps(n)
        assert timesteps == sorted(timesteps, reverse=True)
        theirs = CMStochasticIterativeScheduler(num_train_timesteps=40)
        theirs.set_timesteps(timesteps=timesteps)
        ours.set_timesteps(n)
        torch.testing.assert_close(theirs.sigmas.double(), ours.sigmas, rtol=1e-6, atol=0)
    assert ours.diffusers_timesteps(2) == [20, 0]


def test_diffusers_timesteps_of_a_tuned_schedule_on_the_grid():
    grid_22 = ConsistencyScheduler(num_train_timesteps=40)
    grid_22.set_timesteps(timesteps=[0, 22])
    ours = ConsistencyScheduler(num_train_timesteps=40, sampling_sigmas=[80.0, float(grid_22.sigmas[1])])
    assert ours.diffusers_timesteps(2) == [22, 0]
    theirs = CMStochasticIterativeScheduler.from_config(ours.config)
    theirs.set_timesteps(timesteps=ours.diffusers_timesteps(2))
    ours.set_timesteps(2)
    torch.testing.assert_close(cm_loop_with(theirs), cm_loop_with(ours), rtol=0, atol=1e-5)


def cm_loop_with(scheduler) -> torch.Tensor:
    return run_loop(scheduler, dummy_sample_deter() * scheduler.init_noise_sigma, scheduler.timesteps)


def test_tuned_ict_digits_schedule_has_no_diffusers_equivalent():
    """The shipped ict-digits config records sampling_sigmas [80, 1.2] on a 1281-point grid: 1.2 lies between grid
    indices 740 (1.20412) and 741 (1.19480), diffusers' CM scheduler takes no custom sigma, and its from_config keeps
    the key only as an unused hidden entry (it samples the grid rule instead)."""
    ours = ConsistencyScheduler.from_pretrained(ICT_DIGITS_SCHEDULER)
    assert list(ours.config.sampling_sigmas) == [80.0, 1.2] and ours.config.num_train_timesteps == 1281
    assert ours.diffusers_timesteps(1) == [0]
    assert ours.diffusers_timesteps(3) == [854, 427, 0]  # beyond the tuned length: diffusers' own rule
    with pytest.raises(ValueError, match=r"1\.2 \(between index 740: 1\.20412 and index 741: 1\.1948\).*no custom "
                                         r"sigmas.*timesteps=\[740, 0\]"):
        ours.diffusers_timesteps(2)
    theirs = CMStochasticIterativeScheduler.from_config(ours.config)
    theirs.set_timesteps(2)
    ours.set_timesteps(2)
    assert ours.sigmas[1].item() == 1.2
    assert not math.isclose(float(theirs.sigmas[1]), 1.2, rel_tol=1e-3)  # diffusers samples another level
    # the tuned schedule survives a round trip through diffusers' scheduler (kept as a hidden config entry)
    back = ConsistencyScheduler.from_config(theirs.config)
    back.set_timesteps(2)
    assert back.sigmas.tolist() == ours.sigmas.tolist()
