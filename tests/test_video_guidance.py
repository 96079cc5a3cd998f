"""Motion consistency loss, feature hooks, initial noise and MotionGuidedVideoPipeline (issue #6)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gensample.video.guidance import (
    FeatureRecorder,
    MotionGuidanceConfig,
    auto_keypoints,
    motion_consistency_loss,
    motion_patterns,
    reference_trajectories,
    soft_trajectory,
    temporal_attention_modules,
)
from gensample.video.init_noise import butterworth_low_pass, ddim_invert, lowfreq_mix


# ---------------------------------------------------------------- the loss math, against direct loops
def _direct_soft_trajectory(feats: np.ndarray, frame: int, row: int, col: int, target: int, scale: float):
    """M_target(j, k) = exp(scale cos(f_p, F(j,k))) / sum exp(...), written out cell by cell (one video)."""
    anchor = feats[frame, :, row, col]
    _, _, h, w = feats.shape
    logits = np.empty((h, w))
    for j in range(h):
        for k in range(w):
            v = feats[target, :, j, k]
            logits[j, k] = scale * anchor @ v / (np.linalg.norm(anchor) * np.linalg.norm(v))
    e = np.exp(logits - logits.max())
    return (e / e.sum()).reshape(-1)


def test_soft_trajectory_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 4, 3, 5, 6, generator=g, dtype=torch.float64)
    got = soft_trajectory(feats, 1, 2 * 6 + 4, [2, 3], logit_scale=10.0)
    for n, target in enumerate([2, 3]):
        want = _direct_soft_trajectory(feats[0].numpy(), 1, 2, 4, target, 10.0)
        np.testing.assert_allclose(got[0, n].numpy(), want, rtol=1e-10)
    assert torch.allclose(got.sum(-1), torch.ones(1, 2, dtype=torch.float64))


def test_motion_consistency_loss_matches_direct_sum_and_is_zero_on_equal_features():
    g = torch.Generator().manual_seed(1)
    ref = {"a": torch.randn(1, 4, 3, 4, 4, generator=g, dtype=torch.float64)}
    gen = {"a": torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64)}
    keypoints = [(0.3, 0.6)]
    anchors = reference_trajectories(ref, keypoints, local_range=2, logit_scale=10.0)
    loss = motion_consistency_loss(motion_patterns(gen, anchors, 2, 10.0), motion_patterns(ref, anchors, 2, 10.0))
    # direct: anchors f = 0..2, frames f+1..min(3, f+2), cell of frame f from the reference's argmax chain
    cells = [1 * 4 + 2 * 1]  # x = 0.3 -> col 1, y = 0.6 -> row 2 => 2 * 4 + 1
    cells = [2 * 4 + 1]
    r = ref["a"][0].numpy()
    for f in range(1, 4):
        a = max(0, f - 2)
        m = _direct_soft_trajectory(r, a, cells[a] // 4, cells[a] % 4, f, 10.0)
        cells.append(int(m.argmax()))
    assert anchors["a"][0].tolist() == cells
    for b in range(2):
        x = gen["a"][b].numpy()
        want = 0.0
        for f in range(3):
            for i in range(f + 1, min(3, f + 2) + 1):
                mg = _direct_soft_trajectory(x, f, cells[f] // 4, cells[f] % 4, i, 10.0)
                mr = _direct_soft_trajectory(r, f, cells[f] // 4, cells[f] % 4, i, 10.0)
                want += ((mg - mr) ** 2).sum()
        assert loss[b].item() == pytest.approx(want, rel=1e-10)
    same = motion_consistency_loss(motion_patterns(ref, anchors, 2, 10.0), motion_patterns(ref, anchors, 2, 10.0))
    assert same.item() == 0.0


def _blob_video(positions, size=8, channels=3, batch_shape=()):
    """Features with a distinctive vector at one cell per frame on a constant background."""
    feats = torch.zeros(*batch_shape, len(positions), channels, size, size, dtype=torch.float64)
    feats[..., 0, :, :] = 1.0  # background direction e0
    for f, (row, col) in enumerate(positions):
        feats[..., f, :, row, col] = torch.tensor([0.0, 1.0, 0.2], dtype=torch.float64)
    return feats


def test_gradient_pulls_the_generated_object_along_the_reference_trajectory():
    # reference object moves right along row 3; the generated one stays put at the start
    ref = {"l": _blob_video([(3, 1), (3, 3), (3, 5)], batch_shape=(1,))}
    anchors = reference_trajectories(ref, [((1 + 0.5) / 8, (3 + 0.5) / 8)], local_range=8, logit_scale=10.0)
    assert anchors["l"][0].tolist() == [3 * 8 + 1, 3 * 8 + 3, 3 * 8 + 5]
    ref_patterns = motion_patterns(ref, anchors, 8, 10.0)
    z = _blob_video([(3, 1), (3, 1), (3, 1)], batch_shape=(1,)).requires_grad_(True)
    loss = motion_consistency_loss(motion_patterns({"l": z}, anchors, 8, 10.0), ref_patterns)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    step = z.detach() - 0.05 * grad
    new_loss = motion_consistency_loss(motion_patterns({"l": step}, anchors, 8, 10.0), ref_patterns)
    assert new_loss.item() < loss.item()
    # on the last frame, the soft trajectory from frame 0 moves its mass from the stale cell to the reference's
    before = soft_trajectory(z.detach(), 0, anchors["l"][0, 0], [2], 10.0)[0, 0]
    after = soft_trajectory(step, 0, anchors["l"][0, 0], [2], 10.0)[0, 0]
    assert after[3 * 8 + 5] > before[3 * 8 + 5]
    assert after[3 * 8 + 1] < before[3 * 8 + 1]


def test_auto_keypoints_find_the_moving_object():
    video = torch.full((4, 1, 8, 8), -1.0)
    for f in range(4):
        video[f, 0, 2, 1 + f] = 1.0
    (x, y), = auto_keypoints(video)
    assert (x, y) == ((1 + 0.5) / 8, (2 + 0.5) / 8)
    with pytest.raises(ValueError, match="F >= 2"):
        auto_keypoints(video[:1])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="guidance_fraction"):
        MotionGuidanceConfig(guidance_fraction=1.5)
    with pytest.raises(ValueError, match="keypoints"):
        MotionGuidanceConfig(keypoints=[(1.2, 0.5)])
    with pytest.raises(ValueError, match="reference_mode"):
        MotionGuidanceConfig(reference_mode="both")
    with pytest.raises(ValueError, match="local_range"):
        MotionGuidanceConfig(local_range=0)


# ---------------------------------------------------------------- initial noise
def test_butterworth_mask_matches_freeinit_formula():
    mask = butterworth_low_pass(4, 6, 8, spatial_cutoff=0.25, temporal_cutoff=0.5, order=4)
    for f, h, w in [(0, 0, 0), (2, 3, 4), (1, 5, 2), (3, 2, 7)]:
        d2 = ((0.25 / 0.5) * (2 * f / 4 - 1)) ** 2 + (2 * h / 6 - 1) ** 2 + (2 * w / 8 - 1) ** 2
        assert mask[f, h, w].item() == pytest.approx(1 / (1 + (d2 / 0.25**2) ** 4), rel=1e-6)
    assert mask[2, 3, 4].item() == 1.0  # the centre of the shifted spectrum (zero frequency)


def test_lowfreq_mix_keeps_low_frequencies_of_one_and_high_of_the_other():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(1, 2, 4, 8, 8, generator=g), torch.randn(1, 2, 4, 8, 8, generator=g)
    assert torch.allclose(lowfreq_mix(low, high, torch.ones(4, 8, 8)), low, atol=1e-5)
    assert torch.allclose(lowfreq_mix(low, high, torch.zeros(4, 8, 8)), high, atol=1e-5)
    mixed = lowfreq_mix(low, high, butterworth_low_pass(4, 8, 8))
    # the DC component (mean over F, H, W) comes from the low source
    assert torch.allclose(mixed.mean(dim=(2, 3, 4)), low.mean(dim=(2, 3, 4)), atol=1e-5)
    with pytest.raises(ValueError, match="mask shape"):
        lowfreq_mix(low, high, torch.ones(4, 4, 4))


def test_ddim_inversion_then_ddim_sampling_returns_to_the_start():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          set_alpha_to_one=True)
    x0 = torch.randn(1, 1, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trajectory = ddim_invert(lambda x, t: eps, x0, sched, 10)
    sched.set_timesteps(10)
    assert sorted(trajectory) == sorted(int(t) for t in sched.timesteps)
    x = trajectory[int(sched.timesteps[0])]
    # with a prediction that does not depend on x, inversion and sampling are exact inverses
    for t in sched.timesteps:
        x = sched.step(eps, t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-8)


# ---------------------------------------------------------------- the pipeline on tiny diffusers video models
def _tiny_unet(cross_attention_dim=8, sample_size=8, in_channels=1, seed=0):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=4)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    return unet2d, adapter, UNetMotionModel.from_unet2d(unet2d, adapter)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)


@pytest.fixture(scope="module")
def pixel_pipe():
    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    pipe = MotionGuidedVideoPipeline(unet=_tiny_unet()[2].eval(), scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _moving_square(num_frames=4, size=8, dx=1):
    video = torch.full((num_frames, 1, size, size), -1.0)
    for f in range(num_frames):
        video[f, 0, 2:4, 1 + dx * f:3 + dx * f] = 1.0
    return video


def test_guided_run_leaves_the_unet_unchanged_and_records_the_loss(pixel_pipe):
    unet = pixel_pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out = pixel_pipe(num_frames=4, num_inference_steps=2, reference_video=_moving_square(),
                     motion_guidance=MotionGuidanceConfig(weight=50.0, guidance_fraction=1.0),
                     init_noise="lowfreq_mix", generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.frames.shape == (1, 4, 1, 8, 8)
    assert len(out.motion_loss) == 2 and all(math.isfinite(v) and v > 0 for v in out.motion_loss)
    assert out.guidance_saved_bytes > 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unet.modules())
    assert not unet.is_gradient_checkpointing
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_guidance_changes_the_result_and_weight_zero_does_not(pixel_pipe):
    kwargs = dict(num_frames=4, num_inference_steps=3, reference_video=_moving_square(), init_noise="lowfreq_mix",
                  output_type="pt")
    off = pixel_pipe(**kwargs, motion_guidance=MotionGuidanceConfig(weight=0.0),
                     generator=torch.Generator().manual_seed(0)).frames
    on = pixel_pipe(**kwargs, motion_guidance=MotionGuidanceConfig(weight=100.0),
                    generator=torch.Generator().manual_seed(0)).frames
    assert not torch.equal(on, off)


def test_truncation_and_checkpointing_save_activation_memory(pixel_pipe):
    common = dict(num_frames=4, num_inference_steps=1, reference_video=_moving_square(), init_noise="random",
                  output_type="latent", generator=None)
    early = ["down_blocks.0.*"]
    full = pixel_pipe(**common, motion_guidance=MotionGuidanceConfig(layers=early, truncate_forward=False))
    cut = pixel_pipe(**common, motion_guidance=MotionGuidanceConfig(layers=early, truncate_forward=True))
    ckpt = pixel_pipe(**common, motion_guidance=MotionGuidanceConfig(layers=None, gradient_checkpointing=True))
    every = pixel_pipe(**common, motion_guidance=MotionGuidanceConfig(layers=None))
    assert cut.guidance_saved_bytes < full.guidance_saved_bytes
    assert ckpt.guidance_saved_bytes < every.guidance_saved_bytes
    # truncation changes memory, not the gradient: same loss values for the same start
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, 1, 4, 8, 8, generator=g)
    a = pixel_pipe(**{**common, "generator": torch.Generator().manual_seed(4)}, latents=lat,
                   motion_guidance=MotionGuidanceConfig(layers=early, truncate_forward=False)).frames
    b = pixel_pipe(**{**common, "generator": torch.Generator().manual_seed(4)}, latents=lat,
                   motion_guidance=MotionGuidanceConfig(layers=early, truncate_forward=True)).frames
    assert torch.allclose(a, b, atol=1e-6)


def test_feature_recorder_truncates_and_removes_hooks(pixel_pipe):
    unet = pixel_pipe.unet
    modules = temporal_attention_modules(unet)
    first = dict(list(modules.items())[:1])
    calls = []
    handle = unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 1, 4, 8, 8)
    emb = torch.zeros(4, 1, 8)
    try:
        with FeatureRecorder(first) as rec:
            feats = rec.run(unet, x, 10, encoder_hidden_states=emb, truncate=True)
            assert calls == []
            rec.run(unet, x, 10, encoder_hidden_states=emb, truncate=False)
            assert calls == [1]
    finally:
        handle.remove()
    (name, f), = feats.items()
    assert f.shape[:2] == (1, 4) and f.dim() == 5
    assert all(not m._forward_pre_hooks for m in modules.values())


def test_bad_inputs_give_clear_errors(pixel_pipe):
    with pytest.raises(ValueError, match="frames but num_frames=6"):
        pixel_pipe(num_frames=6, num_inference_steps=1, reference_video=_moving_square(4))
    with pytest.raises(ValueError, match="resize the reference"):
        pixel_pipe(num_frames=4, num_inference_steps=1, reference_video=_moving_square(4, size=16))
    with pytest.raises(ValueError):
        pixel_pipe(num_frames=4, num_inference_steps=1, reference_video=[])
    with pytest.raises(ValueError, match="needs a `reference_video`"):
        pixel_pipe(num_frames=4, num_inference_steps=1, init_noise="ddim_inversion")
    with pytest.raises(ValueError, match="no text encoder"):
        pixel_pipe("a cat", num_frames=4, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pixel_pipe(num_frames=4, num_inference_steps=0)
    with pytest.raises(ValueError, match="match no temporal-attention"):
        pixel_pipe(num_frames=4, num_inference_steps=1, reference_video=_moving_square(),
                   motion_guidance=MotionGuidanceConfig(layers=["nonexistent.*"]))


def test_save_load_round_trip_reproduces_guided_samples(pixel_pipe, tmp_path):
    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    # UNetMotionModel.from_unet2d builds a model whose float results differ from a config-built one in the last
    # bits (diffusers), so the round trip is checked between two loads: what is saved is everything there is.
    pixel_pipe.save_pretrained(tmp_path / "a")
    first = MotionGuidedVideoPipeline.from_pretrained(tmp_path / "a")
    first.save_pretrained(tmp_path / "b")
    second = MotionGuidedVideoPipeline.from_pretrained(tmp_path / "b")
    assert second.vae is None and second.text_encoder is None
    kwargs = dict(num_frames=4, num_inference_steps=2, reference_video=_moving_square(), init_noise="lowfreq_mix",
                  motion_guidance=MotionGuidanceConfig(weight=50.0), output_type="pt")
    outputs = []
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(**kwargs, generator=torch.Generator().manual_seed(5)).frames)
    assert torch.equal(*outputs)


# ---------------------------------------------------------------- equality with diffusers' AnimateDiffPipeline
def _tiny_clip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the AnimateDiff comparison needs transformers")

    def byte_chars():
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        return [chr(c) for c in cs]

    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                           model_max_length=12)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1)
    return transformers.CLIPTextModel(config).eval(), tokenizer


def test_without_reference_equals_animatediff_pipeline_bit_for_bit(tmp_path):
    from diffusers import AnimateDiffPipeline, AutoencoderKL

    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    text_encoder, tokenizer = _tiny_clip(tmp_path)
    unet2d, adapter, _ = _tiny_unet(cross_attention_dim=8, sample_size=8, in_channels=4)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16).eval()
    base = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet2d,
                               motion_adapter=adapter, scheduler=_scheduler())
    base.set_progress_bar_config(disable=True)
    ours = MotionGuidedVideoPipeline.from_pipe(base)
    ours.set_progress_bar_config(disable=True)
    assert ours.unet is base.unet
    kwargs = dict(prompt=["a digit", "a cat"], negative_prompt=["", "blurry"], num_frames=4, height=16, width=16,
                  num_inference_steps=3, guidance_scale=3.0, output_type="np")
    want = base(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    got = ours(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert got.shape == want.shape == (2, 4, 16, 16, 3)
    assert np.array_equal(got, want)
    # and guidance on this latent model runs and changes the result
    reference = torch.rand(4, 3, 16, 16) * 2 - 1
    guided = ours(**kwargs, reference_video=reference, init_noise="random",
                  motion_guidance=MotionGuidanceConfig(weight=1e3), generator=torch.Generator().manual_seed(0))
    assert len(guided.motion_loss) == 2 and not np.array_equal(guided.frames, want)


def test_video_cli_writes_gif_strip_and_summary(pixel_pipe, tmp_path):
    from PIL import Image

    from gensample.cli import main
    from gensample.video.io import load_video, save_gif

    pixel_pipe.save_pretrained(tmp_path / "model")
    save_gif(_moving_square(), tmp_path / "ref.gif")
    out = tmp_path / "out" / "result.gif"
    code = main(["video", "--model", str(tmp_path / "model"), "--reference", str(tmp_path / "ref.gif"),
                 "--num-inference-steps", "2", "--weight", "20", "--guidance-fraction", "1.0",
                 "--init-noise", "lowfreq_mix", "--output", str(out)])
    assert code == 0
    frames = load_video(out)
    assert frames.shape == (4, 1, 8, 8)
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(summary["motion_loss"]) == 2 and "motion_cosine" in summary
    strip = Image.open(tmp_path / "out" / "result-strip.png")
    assert strip.height > strip.width / 4 * 1.5  # two rows: reference and result
    assert main(["video", "--model", str(tmp_path / "model"), "--reference", str(tmp_path / "ref.gif"),
                 "--direction", "90", "--output", str(out)]) == 2


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_correction_is_the_same_step_for_every_prediction_type(prediction):
    from diffusers import DDIMScheduler

    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    def scheduler(kind):
        s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          prediction_type=kind)
        s.set_timesteps(10)
        return s

    g = torch.Generator().manual_seed(0)
    x_t, eps, shift = (torch.randn(1, 1, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = scheduler("epsilon").timesteps[3]
    a = scheduler("epsilon").alphas_cumprod[t].double()
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    output = {"v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction]
    want = scheduler("epsilon").step(eps + shift, t, x_t).prev_sample
    pipe = MotionGuidedVideoPipeline(unet=_tiny_unet()[2], scheduler=scheduler(prediction))
    got = pipe.scheduler.step(pipe.correct_prediction(output, shift, t), t, x_t).prev_sample
    assert torch.allclose(got, want, atol=1e-10)


def test_digit_scores_tell_moving_digits_from_noise():
    from gensample.data.moving_digits import make_moving_digits
    from gensample.video.evaluation import digit_crops, digit_scores

    data = make_moving_digits(8, split="heldout", seed=0)
    crops = digit_crops(data.videos)
    assert crops.shape == (8 * 8, 1, 12, 12)
    # the crop is centred on the sprite: its own centre of mass sits in the middle
    from gensample.video.motion_metrics import centre_of_mass

    centres = centre_of_mass(crops.reshape(8, 8, 1, 12, 12))
    assert torch.allclose(centres, torch.full_like(centres, 5.5), atol=0.75)
    real = digit_scores(data.videos)
    noise = digit_scores(torch.rand(8, 8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real["identity"] > 0.9 and real["confidence"] > 0.8
    assert noise["confidence"] < real["confidence"]
