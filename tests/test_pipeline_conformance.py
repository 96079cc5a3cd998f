"""gensample's image pipelines against diffusers' pipeline contract, in the spirit of diffusers' PipelineTesterMixin:
output types (incl. "latent"), ``return_dict=False``, ``callback_on_step_end`` with tensor inputs, ``num_timesteps``,
scheduler swaps (diffusers' CM and EDM schedulers, ``from_pipe`` both ways, folders diffusers saved), refusal of
schedulers a pipeline cannot serve, and generic loading with ``DiffusionPipeline.from_pretrained``.

Tiny random UNets on 8x8 images, one intra-op thread; the generic-loading checks run in one fresh interpreter.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDIMScheduler,
    DiffusionPipeline,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
    LCMScheduler,
)
from diffusers.callbacks import PipelineCallback

import gensample
from gensample.loading import enable_generic_loading
from gensample.models import build_unet
from gensample.models.ctm_unet import CTMUNet2DModel
from gensample.pipelines import (
    ConsistencyPipeline,
    CTMPipeline,
    EDMPipeline,
    LatentConsistencyPipeline,
    MotionGuidedVideoPipeline,
)
from gensample.pipelines.pipeline_utils import GENERIC_LOADING_KWARGS, LOADER_MODULE, loader_source
from gensample.schedulers import ConsistencyScheduler, CTMScheduler, EDMHeunScheduler

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "pipelines"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_unet("tiny", sample_size=8, **overrides).eval()


def ctm_unet(seed: int = 1) -> CTMUNet2DModel:
    unet = CTMUNet2DModel.from_teacher(tiny_unet(seed)).eval()
    g = gen(101)
    with torch.no_grad():  # a random s-branch, so that s matters
        for p in unet.s_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return unet


@pytest.fixture(scope="module")
def slct() -> LatentConsistencyPipeline:
    return quiet(LatentConsistencyPipeline.from_pretrained(ASSETS / "slct-digits"))


# (pipeline factory, call kwargs, expected num_timesteps); the factories build fresh pipelines
CASES = {
    "consistency": (lambda: ConsistencyPipeline(unet=tiny_unet(), scheduler=ConsistencyScheduler()),
                    dict(num_inference_steps=3), 3),
    "consistency+CMStochasticIterative": (
        lambda: ConsistencyPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler()),
        dict(num_inference_steps=3), 3),
    "edm_heun": (lambda: EDMPipeline(unet=tiny_unet(), scheduler=EDMHeunScheduler()), dict(num_inference_steps=3), 5),
    "edm+EDMEuler": (lambda: EDMPipeline(unet=tiny_unet(), scheduler=EDMEulerScheduler()),
                     dict(num_inference_steps=3), 3),
    "edm+EDMDPMSolverMultistep": (lambda: EDMPipeline(unet=tiny_unet(), scheduler=EDMDPMSolverMultistepScheduler()),
                                  dict(num_inference_steps=3), 3),
    "ctm_gamma": (lambda: CTMPipeline(unet=ctm_unet(), scheduler=CTMScheduler()),
                  dict(num_inference_steps=3, gamma=0.5), 3),
    "ctm_heun": (lambda: CTMPipeline(unet=ctm_unet(), scheduler=CTMScheduler()),
                 dict(num_inference_steps=3, sampler="heun"), 3),
    "latent_consistency": (None, dict(num_inference_steps=2), 2),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request, slct):
    factory, kwargs, n = CASES[request.param]
    pipe = slct if factory is None else quiet(factory())
    return request.param, pipe, kwargs, n


def to_images(pipe, latents: torch.Tensor) -> torch.Tensor:
    """What the pipeline post-processes its final latents into (output_type="pt")."""
    if isinstance(pipe, LatentConsistencyPipeline):
        return pipe.decode_latents(latents)
    return (latents / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# output types, return_dict, num_timesteps, callbacks
# --------------------------------------------------------------------------------------------------------------------
def test_output_types_including_latent(case):
    name, pipe, kwargs, _ = case
    out = pipe(batch_size=2, generator=gen(0), output_type="pt", **kwargs)
    assert isinstance(out, ImagePipelineOutput)
    pt = out.images
    assert pt.ndim == 4 and pt.shape[0] == 2 and 0 <= pt.min() and pt.max() <= 1
    npy = pipe(batch_size=2, generator=gen(0), output_type="np", **kwargs).images
    np.testing.assert_array_equal(npy, pt.permute(0, 2, 3, 1).numpy())
    pil = pipe(batch_size=2, generator=gen(0), output_type="pil", **kwargs).images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) for im in pil)
    np.testing.assert_array_equal(np.asarray(pil[0]), (npy[0, ..., 0] * 255).round().astype(np.uint8))
    latents = pipe(batch_size=2, generator=gen(0), output_type="latent", **kwargs).images
    assert latents.shape == (2, *pipe.latent_shape)
    assert torch.equal(to_images(pipe, latents), pt), name  # "latent" is the final state, before post-processing


def test_return_dict_false_is_a_one_tuple(case):
    _, pipe, kwargs, _ = case
    out = pipe(batch_size=2, generator=gen(1), output_type="pt", return_dict=False, **kwargs)
    assert isinstance(out, tuple) and len(out) == 1
    assert torch.equal(out[0], pipe(batch_size=2, generator=gen(1), output_type="pt", **kwargs).images)


def test_num_timesteps_and_callback_tensor_inputs(case):
    name, pipe, kwargs, n = case
    fresh = CASES[name][0]
    if fresh is not None:
        assert quiet(fresh()).num_timesteps is None  # before a call
    calls = []

    def callback(p, i, t, tensors):
        assert p is pipe
        calls.append((i, sorted(tensors)))
        for key in ("latents", "denoised"):
            value = tensors[key]
            assert value is None or value.shape == (2, *pipe.latent_shape)
        return {}

    pipe(batch_size=2, generator=gen(2), output_type="latent", callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=list(pipe._callback_tensor_inputs), **kwargs)
    assert pipe.num_timesteps == pipe._num_timesteps == n
    assert calls == [(i, sorted(pipe._callback_tensor_inputs)) for i in range(n)]


def test_unknown_callback_tensor_input_lists_the_allowed_ones(case):
    _, pipe, kwargs, _ = case
    with pytest.raises(ValueError, match=r"\['noise'\] not in \['latents', 'denoised'\]"):
        pipe(batch_size=2, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"], **kwargs)


def test_a_returned_tensor_replaces_the_state(case):
    _, pipe, kwargs, n = case
    zero_last = lambda p, i, t, tensors: {"latents": torch.zeros_like(tensors["latents"])} if i == n - 1 else {}  # noqa: E731
    out = pipe(batch_size=2, generator=gen(3), output_type="latent", callback_on_step_end=zero_last, **kwargs).images
    assert torch.equal(out, torch.zeros_like(out))
    plain = pipe(batch_size=2, generator=gen(3), output_type="latent", **kwargs).images
    shifted = pipe(batch_size=2, generator=gen(3), output_type="latent", **kwargs,
                   callback_on_step_end=lambda p, i, t, tensors: {"latents": tensors["latents"] + 0.5} if i == 0
                   else {}).images
    assert (shifted - plain).abs().max() > 1e-4


def test_diffusers_pipeline_callback_objects_bring_their_tensor_inputs():
    class ZeroState(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    pipe = quiet(ConsistencyPipeline(unet=tiny_unet(), scheduler=ConsistencyScheduler()))
    out = pipe(batch_size=2, num_inference_steps=2, output_type="latent", callback_on_step_end=ZeroState()).images
    assert torch.equal(out, torch.zeros_like(out))


def test_denoised_is_the_schedulers_clean_estimate_or_none():
    seen = {}

    def record(p, i, t, tensors):
        seen[type(p.scheduler).__name__] = tensors["denoised"]
        return {}

    for scheduler in (ConsistencyScheduler(), CMStochasticIterativeScheduler()):
        quiet(ConsistencyPipeline(unet=tiny_unet(), scheduler=scheduler))(
            batch_size=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["denoised"])
    for scheduler in (EDMHeunScheduler(), EDMEulerScheduler(), EDMDPMSolverMultistepScheduler()):
        quiet(EDMPipeline(unet=tiny_unet(), scheduler=scheduler))(
            batch_size=1, num_inference_steps=2, callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["denoised"])
    present = {k: v is not None for k, v in seen.items()}
    # diffusers' CM and DPM-Solver outputs carry no clean estimate; EDMEuler's is `pred_original_sample`
    assert present == {"ConsistencyScheduler": True, "CMStochasticIterativeScheduler": False,
                       "EDMHeunScheduler": True, "EDMEulerScheduler": True, "EDMDPMSolverMultistepScheduler": False}


def test_fast_sampling_num_timesteps_and_latent_output():
    pipe = quiet(ConsistencyPipeline(unet=tiny_unet(), scheduler=ConsistencyScheduler()))
    ref = pipe(batch_size=2, num_inference_steps=3, generator=gen(4), output_type="latent").images
    pipe.enable_fast_sampling()
    pipe._num_timesteps = None
    got = pipe.fast_call(2, num_inference_steps=3, generator=gen(4), output_type="latent").images
    assert torch.equal(got, ref) and pipe.num_timesteps == 3


@pytest.mark.parametrize("cls", [ConsistencyPipeline, EDMPipeline, CTMPipeline, LatentConsistencyPipeline])
def test_example_docstrings_are_attached(cls):
    doc = cls.__call__.__doc__
    assert "Examples:" in doc and ">>> pipe" in doc and "from_pretrained" in doc


# --------------------------------------------------------------------------------------------------------------------
# scheduler swaps
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [dict(num_inference_steps=1), dict(num_inference_steps=2),
                                      dict(num_inference_steps=3), dict(timesteps=[0, 22]), dict(timesteps=[22, 0])])
def test_consistency_pipeline_with_cm_stochastic_iterative_scheduler(schedule):
    """diffusers' scheduler gives our scheduler's samples for the same latents and generator (float32 vs float64
    sigmas: measured max |diff| 2.4e-6)."""
    unet = tiny_unet()
    ours = quiet(ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler()))
    theirs = quiet(ConsistencyPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler.from_config(
        ours.scheduler.config)))
    a = ours(batch_size=4, generator=gen(0), output_type="latent", **schedule).images
    b = theirs(batch_size=4, generator=gen(0), output_type="latent", **schedule).images
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert a.abs().max() > 0.1


def test_latent_consistency_pipeline_with_cm_stochastic_iterative_scheduler(slct):
    theirs = quiet(LatentConsistencyPipeline.from_pipe(
        slct, scheduler=CMStochasticIterativeScheduler.from_config(slct.scheduler.config)))
    assert isinstance(theirs.scheduler, CMStochasticIterativeScheduler)
    for steps in (1, 2):
        a = slct(batch_size=2, num_inference_steps=steps, generator=gen(0), output_type="latent").images
        b = theirs(batch_size=2, num_inference_steps=steps, generator=gen(0), output_type="latent").images
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_from_pipe_both_ways_with_diffusers_consistency_model_pipeline():
    unet = tiny_unet(in_channels=3)
    stock = quiet(ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler()))
    ours = quiet(ConsistencyPipeline.from_pipe(stock))
    assert type(ours) is ConsistencyPipeline and ours.unet is unet
    assert isinstance(ours.scheduler, CMStochasticIterativeScheduler)
    for steps in (1, 2):
        a = stock(batch_size=2, num_inference_steps=steps, generator=gen(5), output_type="pt").images
        b = ours(batch_size=2, num_inference_steps=steps, generator=gen(5), output_type="pt").images
        assert torch.equal(a, b)  # the same scheduler calls, in the same order, on the same draws

    native = quiet(ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler()))
    back = quiet(ConsistencyModelPipeline.from_pipe(native))
    assert type(back) is ConsistencyModelPipeline and isinstance(back.scheduler, ConsistencyScheduler)
    for steps in (1, 2):
        a = native(batch_size=2, num_inference_steps=steps, generator=gen(6), output_type="pt").images
        b = back(batch_size=2, num_inference_steps=steps, generator=gen(6), output_type="pt").images
        assert torch.equal(a, b)


def test_consistency_pipeline_loads_a_folder_diffusers_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stock = quiet(ConsistencyModelPipeline(unet=tiny_unet(in_channels=3), scheduler=CMStochasticIterativeScheduler()))
    stock.save_pretrained(tmp_path)
    loaded = quiet(ConsistencyPipeline.from_pretrained(tmp_path))
    assert isinstance(loaded.scheduler, CMStochasticIterativeScheduler)
    a = stock(batch_size=2, num_inference_steps=2, generator=gen(7), output_type="pt").images
    b = loaded(batch_size=2, num_inference_steps=2, generator=gen(7), output_type="pt").images
    assert torch.equal(a, b)
    # and swapped to gensample's scheduler: the same samples up to float32 sigmas
    loaded.scheduler = ConsistencyScheduler.from_config(loaded.scheduler.config)
    c = loaded(batch_size=2, num_inference_steps=2, generator=gen(7), output_type="pt").images
    torch.testing.assert_close(c, a, rtol=0, atol=1e-5)


def edm_pipes():
    unet = tiny_unet(1)
    heun = quiet(EDMPipeline(unet=unet, scheduler=EDMHeunScheduler()))
    euler = quiet(EDMPipeline(unet=unet, scheduler=EDMEulerScheduler.from_config(heun.scheduler.config)))
    dpm = quiet(EDMPipeline(unet=unet, scheduler=EDMDPMSolverMultistepScheduler.from_config(heun.scheduler.config)))
    return heun, euler, dpm


def test_edm_pipeline_with_diffusers_edm_schedulers():
    """One step is the same Euler step to sigma = 0 for all three (identical up to diffusers' initial noise scale
    sqrt(sigma_max^2 + 1) and float32 sigmas); with many steps Euler converges to Heun at first order and
    DPM-Solver++ (2nd order) closely."""
    heun, euler, dpm = edm_pipes()
    z = torch.randn(4, 1, 8, 8, generator=gen(3))

    def run(pipe, steps, scale=1.0):
        return pipe(batch_size=4, latents=z * scale, num_inference_steps=steps, output_type="latent").images

    one = run(heun, 1)
    rescale = heun.scheduler.init_noise_sigma / euler.scheduler.init_noise_sigma  # 80 / sqrt(80^2 + 1)
    torch.testing.assert_close(run(euler, 1, rescale), one, rtol=0, atol=5e-5)  # measured 1.5e-5
    torch.testing.assert_close(run(dpm, 1, rescale), one, rtol=0, atol=5e-5)
    errors = {}
    for steps in (32, 128):
        ref = run(heun, steps)
        errors[steps] = (float((run(euler, steps) - ref).abs().max()), float((run(dpm, steps) - ref).abs().max()))
    # measured: Euler 0.148 (32), 0.033 (128); DPM-Solver++ 2.6e-3 (32), 1.6e-4 (128); |x| ~ 1.5
    assert errors[128][0] < 0.05 and errors[128][0] < errors[32][0] / 3
    assert errors[128][1] < 1e-3 and errors[128][1] < errors[32][1]


def test_edm_unet_receives_its_own_noise_conditioning():
    """diffusers' EDM schedulers put 0.25 ln(sigma) in `timesteps`; the pipeline hands a "250_ln_sigma" UNet
    250 ln(sigma) of the same sigma (before this it ran silently 1000x off)."""
    heun, euler, _ = edm_pipes()
    received = {}
    for pipe in (heun, euler):
        seen = received.setdefault(type(pipe.scheduler).__name__, [])
        handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1])))
        try:
            pipe(batch_size=1, num_inference_steps=4, generator=gen(0), output_type="latent")
        finally:
            handle.remove()
    heun_levels = sorted(set(received["EDMHeunScheduler"]), reverse=True)  # t_0..t_3, each once
    np.testing.assert_allclose(received["EDMEulerScheduler"], heun_levels, rtol=1e-5)
    np.testing.assert_allclose(euler.scheduler.timesteps.numpy() * 1000, heun_levels, rtol=1e-5)


def test_edm_unet_trained_on_edm_noise_conditioning():
    unet = tiny_unet(1)
    pipe = quiet(EDMPipeline(unet=unet, scheduler=EDMEulerScheduler(), noise_conditioning="0.25_ln_sigma"))
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1])))
    try:
        pipe(batch_size=1, num_inference_steps=3, output_type="latent")
    finally:
        handle.remove()
    np.testing.assert_allclose(seen, pipe.scheduler.timesteps.numpy())  # passed through unchanged
    with pytest.raises(ValueError, match=r"noise_conditioning='0.25_ln_sigma'.*EDMHeunScheduler does not feed"):
        pipe.scheduler = EDMHeunScheduler()
    with pytest.raises(ValueError, match="must be one of"):
        EDMPipeline(unet=unet, scheduler=EDMHeunScheduler(), noise_conditioning="ln_sigma")


def test_noise_conditioning_is_saved_and_defaults_for_old_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = EDMPipeline(unet=tiny_unet(1), scheduler=EDMEulerScheduler(), noise_conditioning="0.25_ln_sigma")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["noise_conditioning"] == "0.25_ln_sigma"
    assert EDMPipeline.from_pretrained(tmp_path).config.noise_conditioning == "0.25_ln_sigma"
    del index["noise_conditioning"]  # a folder saved before the key existed
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert EDMPipeline.from_pretrained(tmp_path).config.noise_conditioning == "250_ln_sigma"


# --------------------------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------------------------
CM_NAMES = "ConsistencyScheduler, CMStochasticIterativeScheduler"
EDM_NAMES = "EDMHeunScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler"


@pytest.mark.parametrize("build, scheduler, names", [
    (lambda s: ConsistencyPipeline(unet=tiny_unet(), scheduler=s), DDIMScheduler(), CM_NAMES),
    (lambda s: ConsistencyPipeline(unet=tiny_unet(), scheduler=s), LCMScheduler(), CM_NAMES),
    (lambda s: EDMPipeline(unet=tiny_unet(), scheduler=s), ConsistencyScheduler(), EDM_NAMES),
    (lambda s: EDMPipeline(unet=tiny_unet(), scheduler=s), EulerDiscreteScheduler(), EDM_NAMES),
    (lambda s: CTMPipeline(unet=ctm_unet(), scheduler=s), ConsistencyScheduler(), "CTMScheduler only"),
])
def test_unservable_schedulers_are_refused_at_init(build, scheduler, names):
    with pytest.raises(ValueError, match=f"cannot sample with {type(scheduler).__name__}: its step math serves "
                                         f"{names}"):
        build(scheduler)


def test_unservable_schedulers_are_refused_on_assignment_and_from_pipe(slct):
    pipe = ConsistencyPipeline(unet=tiny_unet(), scheduler=ConsistencyScheduler())
    with pytest.raises(ValueError, match=CM_NAMES):
        pipe.scheduler = EDMEulerScheduler()
    assert isinstance(pipe.scheduler, ConsistencyScheduler)  # unchanged
    with pytest.raises(ValueError, match=EDM_NAMES):
        EDMPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match=CM_NAMES):
        LatentConsistencyPipeline.from_pipe(slct, scheduler=EDMHeunScheduler())


def test_schedule_arguments_a_scheduler_cannot_take_are_refused():
    cm = ConsistencyPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler())
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler.set_timesteps takes no `sigmas`"):
        cm(sigmas=[80.0, 1.0])
    euler = EDMPipeline(unet=tiny_unet(), scheduler=EDMEulerScheduler())
    with pytest.raises(ValueError, match="`sigmas` \\(noise levels\\) need EDMHeunScheduler"):
        euler(sigmas=[80.0, 1.0])


# --------------------------------------------------------------------------------------------------------------------
# generic loading: DiffusionPipeline.from_pretrained(folder, custom_pipeline="gensample_pipeline",
# trust_remote_code=True), in a fresh interpreter
# --------------------------------------------------------------------------------------------------------------------
def saved_pipelines(root: Path) -> dict[str, tuple]:
    """Folders our pipelines save: name -> (folder, the pipeline, call kwargs)."""
    out = {}
    for name, pipe, kwargs in [
        ("consistency", ConsistencyPipeline(unet=tiny_unet(), scheduler=ConsistencyScheduler()),
         dict(num_inference_steps=2)),
        ("edm", EDMPipeline(unet=tiny_unet(1), scheduler=EDMHeunScheduler()), dict(num_inference_steps=2)),
        ("ctm", CTMPipeline(unet=ctm_unet(), scheduler=CTMScheduler(gamma=0.3)), dict(num_inference_steps=2)),
    ]:
        pipe.save_pretrained(root / name)
        out[name] = (root / name, quiet(pipe), kwargs)
    return out


def image_sum(pipe, **kwargs) -> float:
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images
    return float(images.astype(np.float64).sum())


FRESH_PROCESS = r"""
import json, sys, torch
torch.set_num_threads(1)
assert "gensample" not in sys.modules
from diffusers import ConsistencyModelPipeline, DiffusionPipeline
assert "gensample" not in sys.modules
jobs = json.loads(sys.argv[1])
out = {}

def image_sum(pipe, kwargs):
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images
    return float(images.astype("float64").sum())

# diffusers' own ConsistencyModelPipeline class, before anything has imported gensample
pipe = ConsistencyModelPipeline.from_pretrained(jobs["ict-digits"][0], custom_pipeline="gensample_pipeline",
                                                trust_remote_code=True)
out["ConsistencyModelPipeline:ict-digits"] = [type(pipe).__module__ + "." + type(pipe).__name__,
                                              image_sum(pipe, jobs["ict-digits"][1])]
stock = ConsistencyModelPipeline.from_pipe(pipe)
out["from_pipe:ict-digits"] = [type(stock).__name__ + "+" + type(stock.scheduler).__name__,
                               image_sum(stock, {"num_inference_steps": 2})]
for name, (folder, kwargs, extra) in jobs.items():
    pipe = DiffusionPipeline.from_pretrained(folder, **extra)
    out[name] = [type(pipe).__module__ + "." + type(pipe).__name__, image_sum(pipe, kwargs)]
print("RESULT=" + json.dumps(out))
"""


def test_generic_loading_in_a_fresh_interpreter(tmp_path):
    generic = GENERIC_LOADING_KWARGS
    jobs, expected = {}, {}
    for name, kwargs in [("ict-digits", dict(num_inference_steps=2)), ("slct-digits", dict(num_inference_steps=2))]:
        pipe = quiet(gensample.load_pipeline(ASSETS / name))
        jobs[name] = [str(ASSETS / name), kwargs, generic]
        expected[name] = (type(pipe), image_sum(pipe, **kwargs))
    for name, (folder, pipe, kwargs) in saved_pipelines(tmp_path).items():
        jobs[name] = [str(folder), kwargs, generic]
        expected[name] = (type(pipe), image_sum(pipe, **kwargs))
    # a folder in diffusers' custom-code form (`_class_name` = [file, class]) needs only trust_remote_code
    listed = tmp_path / "listed"
    shutil.copytree(tmp_path / "consistency", listed)
    index = json.loads((listed / "model_index.json").read_text())
    index["_class_name"] = [LOADER_MODULE, "ConsistencyPipeline"]
    (listed / "model_index.json").write_text(json.dumps(index))
    jobs["listed"] = [str(listed), dict(num_inference_steps=2), {"trust_remote_code": True}]
    expected["listed"] = expected["consistency"]
    # the video folder ships without the loader file (its pipeline does not write it yet): a copy with it loads
    video = tmp_path / "video-digits"
    shutil.copytree(ASSETS / "video-digits", video)
    enable_generic_loading(video)

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    code = FRESH_PROCESS + (
        "from diffusers import DiffusionPipeline\n"
        f"v = DiffusionPipeline.from_pretrained({str(video)!r}, **{generic!r})\n"
        "print('VIDEO=' + type(v).__name__)\n")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = dict(line.split("=", 1) for line in res.stdout.splitlines() if line.startswith(("RESULT=", "VIDEO=")))
    got = json.loads(lines["RESULT"])
    for name, (cls, total) in expected.items():
        assert got[name][0] == f"{cls.__module__}.{cls.__name__}", name  # gensample's own class, not a copy
        assert got[name][1] == pytest.approx(total, abs=1e-6), name
    # diffusers gives the folder's pipeline class precedence over the class from_pretrained is called on ...
    assert got["ConsistencyModelPipeline:ict-digits"] == got["ict-digits"]
    # ... and from_pipe makes the stock pipeline of it, with the folder's scheduler
    assert got["from_pipe:ict-digits"][0] == "ConsistencyModelPipeline+ConsistencyScheduler"
    stock = ConsistencyModelPipeline.from_pipe(gensample.load_pipeline(ASSETS / "ict-digits"))
    assert got["from_pipe:ict-digits"][1] == pytest.approx(image_sum(quiet(stock), num_inference_steps=2), abs=1e-6)
    assert lines["VIDEO"] == MotionGuidedVideoPipeline.__name__


def test_saved_folders_hold_the_loader_and_keep_their_model_index(tmp_path):
    for name, (folder, pipe, _) in saved_pipelines(tmp_path).items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == type(pipe).__name__  # a plain string, as before
        source = (folder / f"{LOADER_MODULE}.py").read_text()
        assert source == loader_source(type(pipe), index)
        assert f"from {type(pipe).__module__} import {type(pipe).__name__} as" in source
        for module in {v[0] for v in index.values() if isinstance(v, list) and not v[0].startswith("diffusers")}:
            assert f"import {module}\n" in source
    for name in ("ict-digits", "slct-digits"):  # the shipped folders carry it too
        index = json.loads((ASSETS / name / "model_index.json").read_text())
        cls = gensample.loading.pipeline_classes()[index["_class_name"]]
        assert (ASSETS / name / f"{LOADER_MODULE}.py").read_text() == loader_source(cls, index)


def test_without_trust_remote_code_diffusers_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Pass `trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(ASSETS / "ict-digits", custom_pipeline=LOADER_MODULE)


def test_old_and_listed_folders_load_with_our_classes(tmp_path, monkeypatch):
    """XPipeline.from_pretrained / load_pipeline read old folders (no loader file), new ones and the custom-code form
    [file, class] without executing any file; enable_generic_loading adds the loader to an old folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, pipe, kwargs = saved_pipelines(tmp_path)["consistency"]
    expected = image_sum(pipe, **kwargs)
    loader = folder / f"{LOADER_MODULE}.py"
    written = loader.read_text()
    loader.unlink()  # an old folder
    assert image_sum(quiet(ConsistencyPipeline.from_pretrained(folder)), **kwargs) == expected
    assert image_sum(quiet(gensample.load_pipeline(folder)), **kwargs) == expected
    assert enable_generic_loading(folder) == loader and loader.read_text() == written
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [LOADER_MODULE, "ConsistencyPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))
    loader.write_text("raise RuntimeError('executed')\n")  # proves the file is not run
    assert image_sum(quiet(ConsistencyPipeline.from_pretrained(folder)), **kwargs) == expected
    assert type(gensample.load_pipeline(folder)) is ConsistencyPipeline
