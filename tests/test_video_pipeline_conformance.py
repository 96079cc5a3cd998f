"""MotionGuidedVideoPipeline behaves like diffusers' AnimateDiffPipeline (issue #13): call state properties,
``return_dict=False``, callback checks and interruption, and pipelines without a text encoder."""
from __future__ import annotations

import logging as std_logging

import numpy as np
import pytest
import torch
from test_video_guidance import _moving_square, _scheduler, _tiny_clip, _tiny_unet

from gensample.video.guidance import MotionGuidanceConfig

STATE = ("guidance_scale", "do_classifier_free_guidance", "num_timesteps", "cross_attention_kwargs", "clip_skip",
         "interrupt")


@pytest.fixture(scope="module")
def pixel_pipe():
    """Unconditional pixel-space model: no VAE, no text encoder (like the shipped video-digits)."""
    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    pipe = MotionGuidedVideoPipeline(unet=_tiny_unet()[2].eval(), scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16).eval()


def _animatediff(text_encoder=None, tokenizer=None):
    from diffusers import AnimateDiffPipeline

    unet2d, adapter, _ = _tiny_unet(cross_attention_dim=8, sample_size=8, in_channels=4)
    base = AnimateDiffPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet2d,
                               motion_adapter=adapter, scheduler=_scheduler())
    base.set_progress_bar_config(disable=True)
    return base


def _ours_from(base):
    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    ours = MotionGuidedVideoPipeline.from_pipe(base)
    ours.set_progress_bar_config(disable=True)
    return ours


class _UnetCalls:
    """Counts UNet forward passes (to check that input errors come before any work)."""

    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _recorder(log):
    def callback(pipe, i, t, tensors):
        log.append({name: getattr(pipe, name) for name in STATE})
        return {}

    return callback


# ---------------------------------------------------------------- 1. call state as in AnimateDiffPipeline
def test_call_state_properties_equal_animatediffs(tmp_path):
    text_encoder, tokenizer = _tiny_clip(tmp_path)
    base = _animatediff(text_encoder, tokenizer)
    ours = _ours_from(base)
    for guidance_scale in (3.0, 1.0):
        logs = {}
        for name, pipe in (("base", base), ("ours", ours)):
            logs[name] = []
            pipe(prompt="a digit", num_frames=4, height=16, width=16, num_inference_steps=3,
                 guidance_scale=guidance_scale, clip_skip=None, output_type="latent",
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=_recorder(logs[name]))
        assert len(logs["ours"]) == 3
        assert logs["ours"] == logs["base"]
        assert logs["ours"][0]["guidance_scale"] == guidance_scale
        assert logs["ours"][0]["do_classifier_free_guidance"] is (guidance_scale > 1)
        assert logs["ours"][0]["num_timesteps"] == 3
    assert ours.guidance_scale == 1.0 and ours.num_timesteps == 3  # kept after the call, as in AnimateDiff


def test_call_state_of_an_unconditional_model(pixel_pipe):
    log = []
    kwargs = {}
    pixel_pipe(num_frames=4, num_inference_steps=2, guidance_scale=7.5, cross_attention_kwargs=kwargs,
               reference_video=_moving_square(), motion_guidance=MotionGuidanceConfig(weight=10.0),
               output_type="latent", callback_on_step_end=_recorder(log))
    # no text encoder and no negative embeds: nothing to guide from, so no classifier-free guidance
    assert [entry["do_classifier_free_guidance"] for entry in log] == [False, False]
    assert log[0]["guidance_scale"] == 7.5 and log[0]["num_timesteps"] == 2 and log[0]["interrupt"] is False
    assert log[0]["cross_attention_kwargs"] is kwargs
    # negative_prompt_embeds give an unconditional branch: classifier-free guidance switches on
    log.clear()
    embeds = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    pixel_pipe(num_frames=4, num_inference_steps=2, guidance_scale=2.0, prompt_embeds=embeds,
               negative_prompt_embeds=torch.zeros_like(embeds), output_type="latent",
               callback_on_step_end=_recorder(log))
    assert [entry["do_classifier_free_guidance"] for entry in log] == [True, True]


def test_interrupt_skips_the_remaining_steps(pixel_pipe):
    seen = []

    def stop_after_first(pipe, i, t, tensors):
        seen.append((i, tensors["latents"].clone()))
        pipe._interrupt = True
        return {}

    lat = torch.randn(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = pixel_pipe(num_frames=4, num_inference_steps=4, latents=lat, output_type="latent",
                     reference_video=_moving_square(), init_noise="random",
                     motion_guidance=MotionGuidanceConfig(weight=10.0, guidance_fraction=1.0),
                     callback_on_step_end=stop_after_first)
    assert [i for i, _ in seen] == [0]
    assert torch.equal(out.frames, seen[0][1])
    assert len(out.motion_loss) == 1  # the skipped steps are not guided either
    assert pixel_pipe.interrupt is True
    # the next call starts afresh
    again = pixel_pipe(num_frames=4, num_inference_steps=2, latents=lat, output_type="latent")
    assert pixel_pipe.interrupt is False and not torch.equal(again.frames, out.frames)


# ---------------------------------------------------------------- 2. return_dict=False
def test_return_dict_false_returns_only_the_frames(pixel_pipe):
    common = dict(num_frames=4, num_inference_steps=2, output_type="pt")
    for extra in ({}, dict(reference_video=_moving_square(), init_noise="lowfreq_mix",
                           motion_guidance=MotionGuidanceConfig(weight=50.0, guidance_fraction=1.0))):
        full = pixel_pipe(**common, **extra, generator=torch.Generator().manual_seed(0))
        tup = pixel_pipe(**common, **extra, generator=torch.Generator().manual_seed(0), return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 1
        assert torch.equal(tup[0], full.frames)
        # the guidance statistics stay on the output object
        assert isinstance(full.motion_loss, list) and isinstance(full.guidance_saved_bytes, int)
        assert len(full.motion_loss) == (2 if extra else 0)


def test_return_dict_false_matches_animatediffs_tuple(tmp_path):
    text_encoder, tokenizer = _tiny_clip(tmp_path)
    base = _animatediff(text_encoder, tokenizer)
    ours = _ours_from(base)
    kwargs = dict(prompt="a digit", num_frames=4, height=16, width=16, num_inference_steps=2, guidance_scale=2.0,
                  output_type="np", return_dict=False)
    want = base(**kwargs, generator=torch.Generator().manual_seed(0))
    got = ours(**kwargs, generator=torch.Generator().manual_seed(0))
    assert len(got) == len(want) == 1
    assert np.array_equal(got[0], want[0])


# ---------------------------------------------------------------- 3. callback tensor names
def test_unknown_callback_tensor_raises_value_error_before_any_work(pixel_pipe):
    called = []
    with _UnetCalls(pixel_pipe.unet) as calls, pytest.raises(ValueError) as info:
        pixel_pipe(num_frames=4, num_inference_steps=2, reference_video=_moving_square(),
                   init_noise="ddim_inversion", callback_on_step_end=lambda *a: called.append(1) or {},
                   callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    message = str(info.value)
    assert "noise_pred" in message
    assert all(name in message for name in pixel_pipe._callback_tensor_inputs)
    assert calls.count == 0 and called == []


def test_every_declared_callback_tensor_is_passed_and_replaceable(pixel_pipe):
    from diffusers.callbacks import PipelineCallback

    names = list(pixel_pipe._callback_tensor_inputs)
    assert names == ["latents", "prompt_embeds", "negative_prompt_embeds"]  # AnimateDiffPipeline's
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}

    out = pixel_pipe(num_frames=4, num_inference_steps=2, output_type="latent", callback_on_step_end=callback,
                     callback_on_step_end_tensor_inputs=names)
    assert seen == [sorted(names)] * 2
    assert torch.equal(out.frames, torch.zeros_like(out.frames))

    class Zeroing(PipelineCallback):  # diffusers' callback objects bring their own tensor_inputs
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    out = pixel_pipe(num_frames=4, num_inference_steps=2, output_type="latent",
                     callback_on_step_end=Zeroing(cutoff_step_ratio=None, cutoff_step_index=0))
    assert torch.equal(out.frames, torch.zeros_like(out.frames))


# ---------------------------------------------------------------- 4. no text encoder
def test_prompt_without_text_encoder_raises_a_helpful_value_error(pixel_pipe):
    for kwargs in (dict(prompt="a cat"), dict(prompt=["a cat", "a dog"]), dict(negative_prompt="blurry")):
        with _UnetCalls(pixel_pipe.unet) as calls, pytest.raises(ValueError) as info:
            pixel_pipe(**kwargs, num_frames=4, num_inference_steps=1, reference_video=_moving_square())
        message = str(info.value)
        assert "no text encoder" in message and "prompt_embeds" in message and "text_encoder=" in message
        assert "(batch, seq, 8)" in message
        assert calls.count == 0


def test_shipped_video_digits_rejects_a_prompt_clearly():
    from gensample.pipelines import MotionGuidedVideoPipeline

    from gensample.assets import asset_path

    pipe = MotionGuidedVideoPipeline.from_pretrained(asset_path("pipelines", "video-digits"))
    assert pipe.text_encoder is None
    with pytest.raises(ValueError, match="no text encoder.*pass `prompt_embeds`"):
        pipe("a digit", num_frames=8, num_inference_steps=1)


def test_prompt_embeds_work_without_a_text_encoder(pixel_pipe):
    embeds = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    common = dict(num_frames=4, num_inference_steps=2, output_type="pt")
    out = pixel_pipe(**common, prompt_embeds=embeds, generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (2, 4, 1, 8, 8) and torch.isfinite(out).all()
    uncond = pixel_pipe(**common, num_videos_per_prompt=2, generator=torch.Generator().manual_seed(0)).frames
    assert not torch.equal(out, uncond)  # the embeds condition the model
    # zero embeds of the unconditional default shape reproduce the unconditional run exactly
    zeros = pixel_pipe(**common, prompt_embeds=torch.zeros(1, 1, 8), num_videos_per_prompt=2,
                       generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(zeros, uncond)
    # and with a reference (guidance uses the conditional embeds)
    guided = pixel_pipe(**common, prompt_embeds=embeds[:1], reference_video=_moving_square(),
                        init_noise="lowfreq_mix", motion_guidance=MotionGuidanceConfig(weight=20.0, guidance_fraction=1.0))
    assert len(guided.motion_loss) == 2


def test_prompt_embeds_without_negative_warn_that_cfg_is_skipped(pixel_pipe):
    from diffusers.utils import logging

    records = []
    handler = std_logging.Handler()
    handler.emit = records.append
    logger = logging.get_logger("gensample.pipelines.pipeline_motion_guided_video")
    logger.addHandler(handler)
    try:
        pixel_pipe(num_frames=4, num_inference_steps=1, prompt_embeds=torch.randn(1, 3, 8), guidance_scale=5.0,
                   output_type="latent")
        assert any("guidance_scale=5.0 is ignored" in r.getMessage() for r in records)
        records.clear()
        pixel_pipe(num_frames=4, num_inference_steps=1, guidance_scale=5.0, output_type="latent")  # unconditional
        assert records == []
    finally:
        logger.removeHandler(handler)


def test_embeds_without_text_encoder_equal_animatediff_bit_for_bit():
    base = _animatediff(text_encoder=None, tokenizer=None)
    ours = _ours_from(base)
    assert ours.text_encoder is None
    g = torch.Generator().manual_seed(3)
    embeds, negative = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=4, height=16, width=16,
                  num_inference_steps=3, guidance_scale=3.0, output_type="np")
    want = base(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    got = ours(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert got.shape == want.shape == (2, 4, 16, 16, 3)
    assert np.array_equal(got, want)


def test_prompt_argument_checks_follow_animatediff(pixel_pipe, tmp_path):
    embeds = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="both `negative_prompt` and `negative_prompt_embeds`"):
        pixel_pipe(negative_prompt="x", negative_prompt_embeds=embeds, num_frames=4, num_inference_steps=1)
    with pytest.raises(ValueError, match="same shape"):
        pixel_pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.randn(1, 4, 8), num_frames=4,
                   num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\(batch, seq, 8\)"):
        pixel_pipe(prompt_embeds=torch.randn(1, 3, 5), num_frames=4, num_inference_steps=1)
    text_encoder, tokenizer = _tiny_clip(tmp_path)
    ours = _ours_from(_animatediff(text_encoder, tokenizer))
    with pytest.raises(ValueError, match="both `prompt` and `prompt_embeds`"):
        ours(prompt="a", prompt_embeds=embeds, num_frames=4, height=16, width=16, num_inference_steps=1)
    with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
        ours(num_frames=4, height=16, width=16, num_inference_steps=1)


# ---------------------------------------------------------------- 5. generic diffusers loading
def _frames_plain_and_guided(pipe, size):
    from gensample.data.moving_digits import make_reference_video

    pipe.set_progress_bar_config(disable=True)
    reference = make_reference_video(45, digit_index=0, split="heldout", num_frames=8, canvas=size).videos[0]
    common = {"num_frames": 8, "output_type": "pt", "generator": torch.Generator().manual_seed(0)}
    plain = pipe(**common, num_inference_steps=2).frames
    guided = pipe(**common, num_inference_steps=1, reference_video=reference, init_noise="ddim_inversion",
                  motion_guidance=MotionGuidanceConfig(weight=3.0, guidance_fraction=1.0)).frames
    return plain, guided


def test_shipped_video_digits_loads_with_diffusion_pipeline_from_pretrained():
    from diffusers import DiffusionPipeline
    from gensample.pipelines import MotionGuidedVideoPipeline
    from gensample.pipelines.pipeline_utils import GENERIC_LOADING_KWARGS, LOADER_MODULE

    from gensample.assets import asset_path

    folder = asset_path("pipelines", "video-digits")
    assert (folder / f"{LOADER_MODULE}.py").is_file()
    generic = DiffusionPipeline.from_pretrained(folder, **GENERIC_LOADING_KWARGS)
    direct = MotionGuidedVideoPipeline.from_pretrained(folder)
    assert type(generic) is MotionGuidedVideoPipeline
    assert generic.config.default_motion_weight == direct.config.default_motion_weight == 3.0
    size = direct.unet.config.sample_size
    for got, want in zip(_frames_plain_and_guided(generic, size), _frames_plain_and_guided(direct, size)):
        assert torch.equal(got, want)


def test_save_pretrained_writes_the_generic_loader(pixel_pipe, tmp_path):
    from diffusers import DiffusionPipeline
    from gensample.pipelines import MotionGuidedVideoPipeline
    from gensample.pipelines.pipeline_utils import GENERIC_LOADING_KWARGS, LOADER_MODULE

    pixel_pipe.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / f"{LOADER_MODULE}.py").is_file()
    direct = MotionGuidedVideoPipeline.from_pretrained(tmp_path / "a")
    generic = DiffusionPipeline.from_pretrained(tmp_path / "a", **GENERIC_LOADING_KWARGS)
    assert type(generic) is MotionGuidedVideoPipeline and generic.text_encoder is None and generic.vae is None
    kwargs = {"num_frames": 4, "num_inference_steps": 2, "output_type": "pt", "reference_video": _moving_square(),
              "init_noise": "lowfreq_mix", "motion_guidance": MotionGuidanceConfig(weight=50.0)}
    outputs = []
    for pipe in (direct, generic):
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(**kwargs, generator=torch.Generator().manual_seed(5)).frames)
    assert torch.equal(*outputs)
