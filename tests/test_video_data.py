"""Video data and training for motion-guided generation (#6): moving digits vs independently computed centres, GIF /
PNG I/O, motion metrics on hand-computed cases, the tiny video UNet, video-diffusion training and its saved pipeline."""
from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler

from gensample.data.digits import load_digits
from gensample.data.moving_digits import COMPASS_DIRECTIONS, make_moving_digits, make_reference_video
from gensample.methods.video_diffusion import VideoDiffusionTraining, _ddim_sample, video_scheduler
from gensample.video.io import load_video, save_gif, save_strip_png
from gensample.video.motion_metrics import centre_of_mass, motion_fidelity
from gensample.video.tiny_model import null_prompt_embeds, tiny_video_unet


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def numpy_com(frames: np.ndarray) -> np.ndarray:
    """Plain centre of mass (x = column, y = row) of (..., H, W) frames in [-1, 1], weights (x + 1) / 2."""
    w = (frames.astype(np.float64) + 1) / 2
    h, wd = frames.shape[-2:]
    mass = w.sum((-1, -2))
    cx = (w * np.arange(wd)[None, :]).sum((-1, -2)) / mass
    cy = (w * np.arange(h)[:, None]).sum((-1, -2)) / mass
    return np.stack([cx, cy], -1)


def dot_video(positions: list[tuple[int, int]], size: int = 16) -> torch.Tensor:
    """(F, 1, size, size) video in [-1, 1]: one bright pixel per frame at (x, y)."""
    v = torch.full((len(positions), 1, size, size), -1.0)
    for f, (x, y) in enumerate(positions):
        v[f, 0, y, x] = 1.0
    return v


# -- moving digits ------------------------------------------------------------------------------------------------
def test_moving_digits_shapes_and_centres_match_drawn_sprite():
    md = make_moving_digits(48, seed=1)
    assert md.videos.shape == (48, 8, 1, 32, 32) and md.labels.shape == (48,)
    assert md.velocities.shape == (48, 2) and md.centres.shape == (48, 8, 2)
    assert md.videos.min() >= -1 and md.videos.max() <= 1
    com = numpy_com(md.videos[:, :, 0].numpy())
    assert np.abs(com - md.centres.numpy()).max() < 0.5
    assert np.abs(com - md.centres.numpy()).max() < 1e-3  # bilinear shifting moves the centre of mass exactly
    assert set(md.labels.tolist()) <= set(range(10))


def test_moving_digits_velocity_constant_speed_and_direction():
    md = make_moving_digits(64, speed=(1.5, 2.5), directions=COMPASS_DIRECTIONS, seed=2)
    steps = np.diff(numpy_com(md.videos[:, :, 0].numpy()), axis=1)  # measured on the pixels
    assert np.abs(steps - md.velocities.numpy()[:, None, :]).max() < 1e-3
    speed = md.velocities.norm(dim=-1)
    assert speed.min() >= 1.5 - 1e-5 and speed.max() <= 2.5 + 1e-5
    # direction theta (0 = right, 90 = up): velocity = speed (cos theta, -sin theta), y pointing down
    angle = torch.rad2deg(torch.atan2(-md.velocities[:, 1], md.velocities[:, 0])) % 360
    assert torch.allclose(angle, md.directions % 360, atol=1e-3)
    assert set(md.directions.round().tolist()) <= set(COMPASS_DIRECTIONS)


def test_moving_digits_stay_inside_canvas():
    md = make_moving_digits(64, speed=2.5, seed=3)
    # nothing is cut off: every frame holds the whole sprite's mass
    mass = ((md.videos + 1) / 2).sum((-1, -2, -3))
    sprites = (load_digits("train", resolution=12) + 1) / 2
    sprite_mass = sprites.sum((-1, -2, -3))
    assert torch.allclose(mass, mass[:, :1].expand_as(mass), atol=1e-3)
    assert bool(torch.isclose(mass[:, :1], sprite_mass[None, :], atol=1e-3).any(-1).all())
    # centres keep at least the sprite's centre offset from the border; ink never touches outside [0, 31]
    assert md.centres.min() >= 0 and md.centres.max() <= 31
    with pytest.raises(ValueError, match="speed"):
        make_moving_digits(2, speed=(2.0, 3.0))  # 7 * 3 = 21 px > 32 - 12


def test_moving_digits_deterministic():
    a, b = make_moving_digits(10, seed=5), make_moving_digits(10, seed=5)
    c = make_moving_digits(10, seed=6)
    assert torch.equal(a.videos, b.videos) and torch.equal(a.centres, b.centres) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.videos, c.videos)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(make_moving_digits(4, generator=g1).videos, make_moving_digits(4, generator=g2).videos)


def test_reference_video_directions():
    right = make_reference_video(0, speed=2.0)
    assert right.videos.shape == (1, 8, 1, 32, 32)
    assert torch.allclose(right.centres[0].diff(dim=0), torch.tensor([2.0, 0.0]).expand(7, 2), atol=1e-4)
    up = make_reference_video(90, speed=2.0, digit_index=3)
    assert torch.allclose(up.centres[0].diff(dim=0), torch.tensor([0.0, -2.0]).expand(7, 2), atol=1e-4)
    com = numpy_com(up.videos[0, :, 0].numpy())
    assert np.abs(com - up.centres[0].numpy()).max() < 1e-3
    with pytest.raises(ValueError, match="digit_index"):
        make_reference_video(0, digit_index=10**6)
    with pytest.raises(ValueError, match="speed"):
        make_reference_video(0, speed=4.0)


# -- I/O ----------------------------------------------------------------------------------------------------------
def test_gif_round_trip(tmp_path):
    video = make_moving_digits(1, seed=0).videos[0]
    path = save_gif(video, tmp_path / "v.gif", fps=4)
    back = load_video(path)
    assert back.shape == video.shape
    assert (back - video).abs().max() <= 1 / 255 + 1e-6  # uint8 quantisation: half a step of 2/255
    with PIL.Image.open(path) as im:
        assert im.n_frames == 8 and im.info.get("loop") == 0 and im.info.get("duration") == 250
    # identical consecutive frames (Pillow folds them into one GIF frame) still come back as F frames
    still = dot_video([(3, 4)] * 5)
    assert torch.equal(load_video(save_gif(still, tmp_path / "still.gif")), still)


def test_load_video_inputs():
    arr = np.zeros((3, 5, 6), np.uint8)
    arr[1, 2, 3] = 255
    x = load_video(arr)
    assert x.shape == (3, 1, 5, 6) and x[1, 0, 2, 3] == 1 and x[0].max() == -1
    assert torch.equal(load_video(arr.astype(np.float32) / 255), x)  # float arrays: [0, 1]
    assert torch.equal(load_video([PIL.Image.fromarray(a) for a in arr]), x)
    assert torch.equal(load_video(x), x)  # float tensors: already [-1, 1]
    rgb = load_video(np.zeros((2, 4, 4, 3), np.uint8))
    assert rgb.shape == (2, 3, 4, 4)


def test_io_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty list"):
        load_video([])
    with pytest.raises(ValueError, match=r"\(F, H, W\)"):
        load_video(np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0\]"):
        load_video(torch.zeros(1, 8, 1, 4, 4))
    with pytest.raises(ValueError, match="value_range"):
        load_video(torch.full((2, 1, 4, 4), 3.0))
    with pytest.raises(FileNotFoundError, match="GIF"):
        load_video(tmp_path / "missing.gif")
    with pytest.raises(TypeError, match="cannot read"):
        load_video(42)
    with pytest.raises(ValueError, match="empty"):
        save_strip_png([], tmp_path / "s.png")
    with pytest.raises(ValueError, match="fps"):
        save_gif(torch.zeros(2, 1, 4, 4), tmp_path / "a.gif", fps=0)


def test_strip_png_layout(tmp_path):
    top, bottom = dot_video([(0, 0), (1, 0)], size=4), dot_video([(3, 3)] * 3, size=4)
    path = save_strip_png([top, bottom], tmp_path / "strip.png", upscale=4, padding=1)
    img = np.asarray(PIL.Image.open(path))
    assert img.shape == (2 * (16 + 1) + 1, 3 * (16 + 1) + 1, 3)
    assert img[1, 1, 0] == 255 and img[1 + 4, 1 + 4, 0] == 0  # row 0 frame 0: bright pixel (0, 0), black elsewhere
    assert img[1, 1 + 17 + 4, 0] == 255  # row 0 frame 1: pixel (1, 0)
    assert img[18 + 12, 1 + 2 * 17 + 12, 0] == 255  # row 1 frame 2: pixel (3, 3)
    assert (img[1:17, 1 + 2 * 17:1 + 2 * 17 + 16] == 255).all()  # row 0 has no third frame: white


# -- motion metrics -------------------------------------------------------------------------------------------------
def test_centre_of_mass_hand_values():
    assert centre_of_mass(dot_video([(5, 3)]))[0].tolist() == [5.0, 3.0]
    square = torch.full((1, 1, 16, 16), -1.0)
    square[0, 0, 4:6, 10:12] = 1.0  # rows 4-5, columns 10-11
    assert centre_of_mass(square)[0].tolist() == pytest.approx([10.5, 4.5])
    faint = square.clone()
    faint[faint == -1] = -0.9  # weight 0.05, below the default floor 0.2
    assert centre_of_mass(faint)[0].tolist() == pytest.approx([10.5, 4.5])
    # without the floor the faint background (252 px of weight 0.05) pulls the centre: x = (4 * 10.5 + 0.05 *
    # (sum of all columns' x * 16 - 4 * 10.5)) / (4 + 0.05 * 252)
    expect_x = (4 * 10.5 + 0.05 * (16 * sum(range(16)) - 2 * (10 + 11))) / (4 + 0.05 * 252)
    assert centre_of_mass(faint, threshold=0)[0, 0].item() == pytest.approx(expect_x, rel=1e-5)
    assert centre_of_mass(torch.full((1, 1, 8, 10), -1.0))[0].tolist() == [4.5, 3.5]  # empty frame: the middle
    batch = torch.stack([dot_video([(1, 2), (3, 4)]), dot_video([(7, 0), (0, 7)])])
    assert centre_of_mass(batch).flatten().tolist() == pytest.approx([1, 2, 3, 4, 7, 0, 0, 7])
    with pytest.raises(ValueError, match="single-channel"):
        centre_of_mass(torch.zeros(2, 3, 8, 8))


def test_motion_fidelity_hand_values():
    right = dot_video([(2, 5), (3, 5), (4, 5), (5, 5)])  # +1 px/frame in x
    left = dot_video([(5, 5), (4, 5), (3, 5), (2, 5)])
    down2 = dot_video([(8, 1), (8, 3), (8, 5), (8, 7)])  # +2 px/frame in y
    same = motion_fidelity(right, right)
    assert same["cosine"].item() == pytest.approx(1.0) and same["endpoint_error"].item() == pytest.approx(0.0)
    opposite = motion_fidelity(left, right)
    assert opposite["cosine"].item() == pytest.approx(-1.0)
    assert opposite["endpoint_error"].item() == pytest.approx(6.0)  # (-3, 0) vs (3, 0)
    perpendicular = motion_fidelity(down2, right)
    assert perpendicular["cosine"].item() == pytest.approx(0.0, abs=1e-6)
    assert perpendicular["endpoint_error"].item() == pytest.approx(math.sqrt(45))  # (0, 6) vs (3, 0)
    # a batch against one reference (broadcast); means over videos
    out = motion_fidelity(torch.stack([right, left, down2]), right)
    assert out["cosine"].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)
    assert out["mean_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert out["mean_endpoint_error"] == pytest.approx((0 + 6 + math.sqrt(45)) / 3)
    # diagonal at 45 degrees to the reference: cos = 1/sqrt(2); frames where the reference is still are skipped
    diag = dot_video([(2, 2), (3, 3), (3, 3), (4, 4)])
    ref = dot_video([(2, 2), (3, 2), (3, 2), (4, 2)])
    assert motion_fidelity(diag, ref)["cosine"].item() == pytest.approx(1 / math.sqrt(2))
    static = dot_video([(4, 4)] * 4)
    assert math.isnan(motion_fidelity(right, static)["cosine"].item())
    with pytest.raises(ValueError, match="frames"):
        motion_fidelity(right, right[:3])


def test_motion_fidelity_on_moving_digits():
    ref = make_reference_video(0, digit_index=1)
    same_dir = make_reference_video(0, digit_index=7, speed=1.5)
    opposite = make_reference_video(180, digit_index=2)
    out = motion_fidelity(torch.cat([same_dir.videos, opposite.videos]), ref.videos[0])
    assert out["cosine"][0] > 0.99 and out["cosine"][1] < -0.99
    assert out["endpoint_error"][0].item() == pytest.approx(7 * 0.5, abs=0.15)  # 10.5 px vs 14 px to the right
    assert out["endpoint_error"][1].item() == pytest.approx(28.0, abs=0.3)


# -- tiny model, training, pipeline -----------------------------------------------------------------------------------
def small_unet(seed: int = 0, sample_size: int = 16):
    """~50k parameters; only the mid block has attention and a motion module (fast on one CPU thread)."""
    torch.manual_seed(seed)
    return tiny_video_unet(sample_size=sample_size, block_out_channels=(8, 16), norm_num_groups=4,
                           down_block_types=("DownBlockMotion",) * 2, up_block_types=("UpBlockMotion",) * 2,
                           temporal_layers=(0, 0), cross_attention_dim=8)


def test_tiny_video_unet_and_null_prompt():
    unet = small_unet()
    prompt = null_prompt_embeds(unet, 2, num_frames=4)
    assert prompt.shape == (8, 1, 8) and not prompt.any()
    assert null_prompt_embeds(unet, 3).shape == (3, 1, 8)
    out = unet(torch.randn(2, 1, 4, 16, 16), 10, encoder_hidden_states=prompt).sample
    assert out.shape == (2, 1, 4, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        tiny_video_unet(block_out_channels=(12, 24))  # GroupNorm with 8 groups
    with pytest.raises(ValueError, match="temporal_layers"):
        tiny_video_unet(temporal_layers=(1,))


def test_video_diffusion_loss_falls():
    torch.manual_seed(0)
    data = make_moving_digits(16, num_frames=4, canvas=16, sprite=8, speed=(0.5, 1.5), seed=0).videos
    method = VideoDiffusionTraining(small_unet())
    opt = torch.optim.Adam(method.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        batch = data[torch.randint(0, len(data), (4,))]
        loss = method(batch, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_video_diffusion_loss_target(prediction_type):
    """With a network that outputs zeros the loss is mean(target^2): eps, or v = sqrt(ab) eps - sqrt(1 - ab) x_0."""
    method = VideoDiffusionTraining(small_unet(), prediction_type=prediction_type, logsnr_shift=0.0)
    method.predict_noise = lambda x_t, t: torch.zeros_like(x_t)
    x0 = make_moving_digits(3, num_frames=4, canvas=16, sprite=8, speed=(0.5, 1.5), seed=0).videos
    torch.manual_seed(7)
    loss = method(x0, 0)["loss"]
    torch.manual_seed(7)
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn_like(x0)

    def f(u: float) -> float:  # cosine schedule, Nichol & Dhariwal 2021 eq. 17 (s = 0.008), betas capped at 0.999
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)], dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)[t].float().view(3, 1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert loss.item() == pytest.approx(target.square().mean().item(), rel=1e-5)


def test_video_diffusion_saved_pipeline_round_trip(tmp_path):
    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    from gensample.training.trainer import TrainConfig, Trainer

    data = make_moving_digits(8, num_frames=4, canvas=16, sprite=8, speed=(0.5, 1.5), seed=0).videos
    method = VideoDiffusionTraining(small_unet())
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, checkpoint_every=0,
                      progress=False, ema_rate=0.9)
    trainer = Trainer(method, data, cfg)
    for _ in range(2):  # the generic Trainer loop without its image sample grid
        trainer.model(trainer.sampler.next(), trainer.step)["loss"].backward()
        trainer.optimizers[0].step()
        trainer.optimizers[0].zero_grad()
        trainer.emas["unet"].update(method.unet)
        trainer.step += 1
    pipe = trainer.export_pipeline()
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = MotionGuidedVideoPipeline.from_pretrained(tmp_path / "pipeline")
    ema_state = trainer.emas["unet"].model.state_dict()
    loaded_state = loaded.unet.state_dict()
    assert ema_state.keys() == loaded_state.keys()
    assert all(torch.equal(ema_state[k], loaded_state[k]) for k in ema_state)
    assert not all(torch.equal(ema_state[k], method.unet.state_dict()[k]) for k in ema_state)  # EMA, not raw
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.allclose(loaded.scheduler.alphas_cumprod, method.noise_scheduler.alphas_cumprod)
    videos = _ddim_sample(loaded.unet, loaded.scheduler, 2, 4, num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0))
    assert videos.shape == (2, 4, 1, 16, 16) and videos.abs().max() <= 1


def test_cli_train_video_diffusion(tmp_path):
    from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline

    from gensample.cli import main

    out = tmp_path / "run"
    rc = main(["train", "video-diffusion", "--output", str(out), "--max-steps", "2", "--batch-size", "2",
               "--num-videos", "4", "--block-out-channels", "8", "16", "--temporal-layers", "0", "1",
               "--num-sample-videos", "2", "--sample-steps", "2", "--threads", "1", "--no-progress", "--seed", "3"])
    assert rc == 0
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == "video-diffusion" and config["train"]["extra"]["num_videos"] == 4
    pipe = MotionGuidedVideoPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.block_out_channels == [8, 16] and pipe.vae is None
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert main(["train", "video-diffusion", "--output", str(tmp_path / "bad"), "--speed", "3", "4",
                 "--no-progress"]) == 2  # a clear error, not a traceback


def test_video_scheduler_matches_training_betas(tmp_path):
    sched = video_scheduler(logsnr_shift=0.0)
    assert torch.allclose(sched.betas, DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas)
    method = VideoDiffusionTraining(small_unet())  # defaults: v-prediction, log-SNR shift -2
    assert torch.allclose(video_scheduler().betas, method.noise_scheduler.betas)
    assert video_scheduler().config.prediction_type == method.prediction_type == "v_prediction"
    sched.set_timesteps(10)
    assert int(sched.timesteps[0]) == 999  # trailing spacing: sampling starts at pure noise
    # shifted log-SNR: logit(alpha_bar') = logit(alpha_bar) + shift, saved with the scheduler config
    shifted = video_scheduler(logsnr_shift=-2.0, prediction_type="v_prediction")
    base = sched.alphas_cumprod.double()
    t = torch.tensor([1, 100, 500, 900])
    expect = torch.sigmoid(torch.logit(base[t]) - 2.0)
    assert torch.allclose(shifted.alphas_cumprod.double()[t], expect, rtol=1e-4)
    shifted.save_config(tmp_path)
    back = type(shifted).from_pretrained(tmp_path)
    assert torch.allclose(back.alphas_cumprod, shifted.alphas_cumprod) and back.config.prediction_type == "v_prediction"
    method = VideoDiffusionTraining(small_unet(), logsnr_shift=-2.0)
    assert torch.allclose(method.noise_scheduler.alphas_cumprod, shifted.alphas_cumprod)
