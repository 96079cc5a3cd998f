"""Issue #18, input side: every bad input gives a clear error (a ValueError, or argparse's exit 2 for the CLI) that
names the argument or the file, instead of NaN images, a traceback or minutes of work.

4. non-finite / malformed ``sigmas``, ``timesteps`` and ``latents``, numpy latents, unbounded step counts (pipelines);
5. ``gensample sample`` flags and grid size (streaming and per-image seeds: tests/test_cli.py);
6. FID input: mu/sigma-only statistics, ``--num-images 0``, corrupt statistics files;
7. unreadable images, ``--threads -1``, a fake GIF, a pickled Inception weights file.

``BAD_INPUTS`` counts the bad inputs tried (one per parametrized case below).
"""
from __future__ import annotations

import argparse
import io
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, EDMEulerScheduler
from PIL import Image

from gensample.cli import main
from gensample.metrics.fid import FeatureStats, FIDEvaluator, digits_images, fid, frechet_distance, load_image_files
from gensample.models import build_unet
from gensample.models.ctm_unet import CTMUNet2DModel
from gensample.pipelines import ConsistencyPipeline, CTMPipeline, EDMPipeline, LatentConsistencyPipeline
from gensample.pipelines.input_checks import MAX_INFERENCE_STEPS, check_schedule_source
from gensample.schedulers import ConsistencyScheduler, CTMScheduler, EDMHeunScheduler

pytestmark = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
REPO = Path(__file__).resolve().parents[1]
ICT = REPO / "assets" / "pipelines" / "ict-digits"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet("tiny", sample_size=8).eval()


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# name -> (factory, extra call kwargs, takes sigmas, takes timesteps, step bound)
PIPES = {
    "consistency": (lambda: ConsistencyPipeline(unet=tiny_unet(), scheduler=ConsistencyScheduler()), {}, True, True,
                    40),
    "consistency+CMStochasticIterative": (
        lambda: ConsistencyPipeline(unet=tiny_unet(), scheduler=CMStochasticIterativeScheduler()), {}, False, True, 40),
    "edm_heun": (lambda: EDMPipeline(unet=tiny_unet(), scheduler=EDMHeunScheduler()), {}, True, False,
                 MAX_INFERENCE_STEPS),
    "edm+EDMEuler": (lambda: EDMPipeline(unet=tiny_unet(), scheduler=EDMEulerScheduler()), {}, False, False,
                     MAX_INFERENCE_STEPS),
    "ctm_gamma": (lambda: CTMPipeline(unet=CTMUNet2DModel.from_teacher(tiny_unet()).eval(), scheduler=CTMScheduler()),
                  {"sampler": "gamma"}, True, True, MAX_INFERENCE_STEPS),
    "ctm_heun": (lambda: CTMPipeline(unet=CTMUNet2DModel.from_teacher(tiny_unet()).eval(), scheduler=CTMScheduler()),
                 {"sampler": "heun"}, True, False, MAX_INFERENCE_STEPS),
    "latent_consistency": (lambda: LatentConsistencyPipeline.from_pretrained(REPO / "assets/pipelines/slct-digits"),
                           {}, True, True, 641),
}
_BUILT: dict = {}


def pipe_case(name):
    if name not in _BUILT:
        factory, kwargs, *_ = PIPES[name]
        _BUILT[name] = quiet(factory())
    return _BUILT[name], dict(PIPES[name][1])


def latent_shape(pipe, batch: int = 2) -> tuple[int, ...]:
    return (batch, *pipe.latent_shape)


# -- 4. pipelines: latents, sigmas, timesteps, step bounds -----------------------------------------------------------

BAD_LATENTS = {
    "nan": lambda s: torch.full(s, NAN),
    "+inf": lambda s: torch.full(s, INF),
    "one -inf": lambda s: torch.zeros(s).index_put_((torch.tensor([0]),), torch.tensor(-INF)),
    "numpy nan": lambda s: np.full(s, np.nan, np.float32),
    "python list": lambda s: torch.zeros(s).tolist(),
    "bool tensor": lambda s: torch.zeros(s, dtype=torch.bool),
    "complex tensor": lambda s: torch.zeros(s, dtype=torch.complex64),
    "wrong shape": lambda s: torch.zeros((s[0] + 1, *s[1:])),
}


@pytest.mark.parametrize("kind", list(BAD_LATENTS))
@pytest.mark.parametrize("name", list(PIPES))
def test_bad_latents_are_refused(name, kind):
    pipe, kwargs = pipe_case(name)
    latents = BAD_LATENTS[kind](latent_shape(pipe))
    with pytest.raises(ValueError, match="`latents`"):
        pipe(batch_size=2, num_inference_steps=1, latents=latents, output_type="pt", **kwargs)


@pytest.mark.parametrize("name", list(PIPES))
def test_numpy_latents_are_converted_and_give_the_torch_result(name):
    pipe, kwargs = pipe_case(name)
    latents = torch.randn(latent_shape(pipe), generator=torch.Generator().manual_seed(3))
    a, b, c = (pipe(batch_size=2, num_inference_steps=2, latents=x, generator=torch.Generator().manual_seed(5),
                    output_type="pt", **kwargs).images
               for x in (latents, latents.numpy(), latents.double().numpy()))
    assert torch.equal(a, b) and torch.equal(a, c)


BAD_SIGMAS = {
    "[nan]": [NAN], "[80, nan]": [80.0, NAN], "[inf, 1]": [INF, 1.0], "[80, -inf]": [80.0, -INF], "[]": [],
    "['a']": ["a"], "2-d": [[80.0, 1.0]], "too many": np.geomspace(80.0, 0.01, MAX_INFERENCE_STEPS + 1).tolist(),
}


@pytest.mark.parametrize("kind", list(BAD_SIGMAS))
@pytest.mark.parametrize("name", [n for n, case in PIPES.items() if case[2]])
def test_bad_sigmas_are_refused(name, kind):
    pipe, kwargs = pipe_case(name)
    with pytest.raises(ValueError, match="`sigmas`"):
        pipe(batch_size=1, sigmas=BAD_SIGMAS[kind], output_type="pt", **kwargs)


BAD_TIMESTEPS = {"[nan]": [NAN], "[0.5, 3]": [0.5, 3], "[]": [], "['x']": ["x"]}


@pytest.mark.parametrize("kind", list(BAD_TIMESTEPS))
@pytest.mark.parametrize("name", [n for n, case in PIPES.items() if case[3]])
def test_bad_timesteps_are_refused(name, kind):
    pipe, kwargs = pipe_case(name)
    with pytest.raises(ValueError, match="`timesteps`"):
        pipe(batch_size=1, timesteps=BAD_TIMESTEPS[kind], output_type="pt", **kwargs)


@pytest.mark.parametrize("steps", ["bound + 1", 10 ** 6, 0, -3, 2.5])
@pytest.mark.parametrize("name", list(PIPES))
def test_step_counts_beyond_what_the_scheduler_serves_fail_at_once(name, steps):
    pipe, kwargs = pipe_case(name)
    bound = PIPES[name][4]
    steps = bound + 1 if steps == "bound + 1" else steps
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="`num_inference_steps`") as excinfo:
        pipe(batch_size=1, num_inference_steps=steps, output_type="pt", **kwargs)
    assert time.perf_counter() - t0 < 5  # before: 10**6 EDM/CTM steps ran for minutes
    if isinstance(steps, int) and steps > bound:
        assert str(bound) in str(excinfo.value)


@pytest.mark.parametrize("name", list(PIPES))
def test_the_step_bound_itself_is_accepted(name):
    pipe, _ = pipe_case(name)
    assert check_schedule_source(PIPES[name][4], None, None, pipe.scheduler) is None  # the bound itself: no error


def test_edm_sigmas_nan_at_the_cli_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["sample", str(ICT), "--sigmas", "80", "nan"])
    assert excinfo.value.code == 2 and "--sigmas" in capsys.readouterr().err


# -- 5. gensample sample: flags and the grid --------------------------------------------------------------------------

BAD_SAMPLE_FLAGS = {
    "--num-images 0": (["--num-images", "0"], "--num-images"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size"),
    "--grid-images 0": (["--grid-images", "0"], "--grid-images"),
    "--sigmas inf": (["--sigmas", "inf"], "--sigmas"),
    "--gamma nan": (["--gamma", "nan"], "--gamma"),
    "--num-inference-steps -1": (["--num-inference-steps", "-1"], "--num-inference-steps"),
}


@pytest.mark.parametrize("kind", list(BAD_SAMPLE_FLAGS))
def test_bad_sample_flags_are_argparse_errors(kind, capsys):
    argv, flag = BAD_SAMPLE_FLAGS[kind]
    with pytest.raises(SystemExit) as excinfo:
        main(["sample", str(ICT), *argv])
    assert excinfo.value.code == 2 and flag in capsys.readouterr().err


def test_seed_out_of_generator_range_names_the_flag(tmp_path, capsys):
    assert main(["sample", str(ICT), "--seed", str(2 ** 64 - 2), "--num-images", "4", "--output",
                 str(tmp_path / "g.png"), "--no-progress"]) == 2
    assert "--seed" in capsys.readouterr().err


def test_sample_steps_beyond_the_grid_names_the_argument(tmp_path, capsys):
    assert main(["sample", str(ICT), "--num-inference-steps", "100000", "--output", str(tmp_path / "g.png"),
                 "--no-progress"]) == 2
    assert "num_inference_steps" in capsys.readouterr().err


def test_a_grid_pillow_cannot_reopen_is_refused():
    from gensample.images import image_grid

    with pytest.raises(ValueError, match="--grid-images"):
        image_grid(torch.zeros(50_000, 1, 8, 8))  # 14561 x 14561 px at the digits' 8x upscale
    with pytest.raises(ValueError, match="empty"):
        image_grid(torch.zeros(0, 1, 8, 8))


# -- 6. FID input ------------------------------------------------------------------------------------------------------

def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_mu_sigma_only_statistics_give_the_fid_of_their_statistics(tmp_path):
    from gensample.metrics.fid import compute_metrics

    real, gen = _features(400, 6, 0), _features(300, 6, 1, shift=0.3)
    full = FeatureStats.from_features(real, "digits")
    full.save(tmp_path / "full.npz")
    np.savez(tmp_path / "plain.npz", mu=full.mu, sigma=full.sigma)  # pytorch-fid's --save-stats layout
    plain = FeatureStats.load(tmp_path / "plain.npz")
    assert plain.num_images == 0 and plain.features is None
    got = compute_metrics(torch.from_numpy(gen), plain)
    want = compute_metrics(torch.from_numpy(gen), FeatureStats.load(tmp_path / "full.npz"))
    scipy_fid = frechet_distance(full.mu, full.sigma, gen.mean(0), np.cov(gen, rowvar=False))
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-9) and got["fid"] == pytest.approx(scipy_fid, rel=1e-6)
    assert np.isnan(got["kid_mean"])  # no raw features: KID unavailable, as documented


def test_mu_sigma_only_statistics_through_the_cli(tmp_path, capsys):
    images = digits_images("heldout")
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images[:64, 0].numpy()):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    stats = FIDEvaluator("digits", "digits").reference_stats
    np.savez(tmp_path / "plain.npz", mu=stats.mu, sigma=stats.sigma)
    assert main(["fid", "--images", str(folder), "--reference", str(tmp_path / "plain.npz"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    full = fid(folder, reference="digits", progress=False)
    printed = float(re.search(r"FID-digits (\S+)", out).group(1))
    assert printed == pytest.approx(full.fid, abs=1e-4)


BAD_FID_COUNTS = {
    "--num-images 0": ["--num-images", "0"],
    "--num-images -5": ["--num-images", "-5"],
    "--batch-size 0": ["--batch-size", "0"],
    "--num-inference-steps 0": ["--num-inference-steps", "0"],
}


@pytest.mark.parametrize("kind", list(BAD_FID_COUNTS))
def test_fid_counts_below_one_are_argparse_errors(kind, capsys):
    argv = BAD_FID_COUNTS[kind]
    with pytest.raises(SystemExit) as excinfo:
        main(["fid", str(ICT), *argv])
    assert excinfo.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, -1, True])
def test_fid_num_images_below_one_in_the_library(value):
    with pytest.raises(ValueError, match="`num_images`"):
        fid(digits_images("heldout"), num_images=value, progress=False)
    with pytest.raises(ValueError, match="`num_images`"):
        FIDEvaluator("digits", "digits", num_images=value)


def _zip_truncated() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, mu=np.zeros(4), sigma=np.eye(4))
    return buf.getvalue()[:200]


def _zip_bad_member() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("mu.npy", b"not an npy array")
        zf.writestr("sigma.npy", b"neither")
    return buf.getvalue()


CORRUPT_STATS = {
    "garbage bytes": lambda p: p.write_bytes(b"this is not a zip file at all"),
    "empty file": lambda p: p.write_bytes(b""),
    "truncated zip": lambda p: p.write_bytes(_zip_truncated()),
    "damaged members": lambda p: p.write_bytes(_zip_bad_member()),
    "a single .npy array": lambda p: p.write_bytes(_npy_bytes(np.zeros(3))),
    "object arrays": lambda p: np.savez(p, mu=np.array([object()], dtype=object), sigma=np.eye(1)),
    "no mu/sigma": lambda p: np.savez(p, features=np.zeros((4, 2))),
    "mu with NaN": lambda p: np.savez(p, mu=np.array([0.0, NAN]), sigma=np.eye(2)),
    "sigma of the wrong shape": lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(2)),
    "2-d mu": lambda p: np.savez(p, mu=np.zeros((2, 2)), sigma=np.eye(2)),
}


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("kind", list(CORRUPT_STATS))
def test_corrupt_statistics_files_name_the_file(kind, tmp_path, capsys):
    path = tmp_path / "stats.npz"
    CORRUPT_STATS[kind](path)
    with pytest.raises(ValueError) as excinfo:
        FeatureStats.load(path)
    assert str(path) in str(excinfo.value)
    # and at the CLI: one error line, exit code 2
    assert main(["fid", "--images", str(tmp_path), "--reference", str(path), "--no-progress"]) == 2
    assert str(path) in capsys.readouterr().err


# -- 7. unreadable files, --threads -----------------------------------------------------------------------------------

FAKE_IMAGES = {
    "text named .png": b"hello, I am not an image",
    "empty .png": b"",
    "truncated png": None,  # filled in below: the first 40 bytes of a real PNG
}


def _write_fake(path: Path, kind: str) -> None:
    data = FAKE_IMAGES[kind]
    if data is None:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()[:40]
    path.write_bytes(data)


def _image_folder(tmp_path: Path, fake_kind: str) -> tuple[Path, Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(digits_images("heldout")[:4, 0].numpy()):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    bad = folder / "0002b.png"
    _write_fake(bad, fake_kind)
    return folder, bad


@pytest.mark.parametrize("kind", list(FAKE_IMAGES))
def test_unreadable_image_in_fid_images_names_the_file(kind, tmp_path, capsys):
    folder, bad = _image_folder(tmp_path, kind)
    with pytest.raises(ValueError, match=str(bad)):
        load_image_files(folder, progress=False)
    assert main(["fid", "--images", str(folder), "--no-progress"]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("kind", list(FAKE_IMAGES))
def test_unreadable_image_in_a_training_folder_names_the_file(kind, tmp_path, capsys):
    from gensample.data.images import load_image_folder

    folder, bad = _image_folder(tmp_path, kind)
    with pytest.raises(ValueError, match=str(bad)):
        load_image_folder(folder, 8, progress=False)
    assert main(["train", "ict", "--data", str(folder), "--resolution", "8", "--model", "tiny", "--max-steps", "1",
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert str(bad) in capsys.readouterr().err


THREADS_COMMANDS = {
    "train ict": ["train", "ict", "--output", "OUT"],
    "train edm": ["train", "edm", "--output", "OUT"],
    "train ctm": ["train", "ctm", "--teacher", "T", "--output", "OUT"],
    "train lct": ["train", "lct", "--vae", "V", "--output", "OUT"],
}


@pytest.mark.parametrize("value", ["-1", "0"])
@pytest.mark.parametrize("command", list(THREADS_COMMANDS))
def test_threads_below_one_is_an_argparse_error(command, value, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in THREADS_COMMANDS[command]]
    with pytest.raises(SystemExit) as excinfo:
        main([*argv, "--threads", value])
    assert excinfo.value.code == 2 and "--threads" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "vae", "--output", "OUT"], ["train", "video-diffusion", "--output", "OUT"]])
def test_threads_below_one_in_commands_that_declare_it_themselves(argv, tmp_path, capsys):
    """`train vae` and `train video-diffusion` declare --threads as a plain int; set_cpu_threads refuses it first."""
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main([*argv, "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


FAKE_GIFS = {
    "text named .gif": b"GIF? no, plain text",
    "GIF header only": b"GIF89a\x08\x00\x08\x00",
    "empty .gif": b"",
}


@pytest.mark.parametrize("kind", list(FAKE_GIFS))
def test_a_fake_gif_names_the_file(kind, tmp_path):
    from gensample.video.io import load_video

    path = tmp_path / "clip.gif"
    path.write_bytes(FAKE_GIFS[kind])
    with pytest.raises(ValueError, match=str(path)):
        load_video(path)


LONG_VIDEOS = {
    "tensor reference, 40 frames": ("tensor", 40, "reference_video"),
    "GIF reference, 33 frames": ("gif", 33, "reference_video"),
    "num_frames=48, no reference": (None, 48, "num_frames"),
}


@pytest.mark.parametrize("kind", list(LONG_VIDEOS))
def test_videos_longer_than_the_models_frame_capacity_are_refused(kind, tmp_path):
    """The shipped UNetMotionModel's temporal position table holds 32 frames; before, a longer reference failed deep
    inside diffusers' positional embedding with a size-mismatch RuntimeError."""
    from gensample.pipelines import MotionGuidedVideoPipeline
    from gensample.video.io import save_gif

    pipe = quiet(MotionGuidedVideoPipeline.from_pretrained(REPO / "assets/pipelines/video-digits"))
    source, frames, name = LONG_VIDEOS[kind]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    video = torch.rand(frames, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kwargs = {"num_frames": frames} if source is None else {"reference_video": video}
    if source == "gif":
        kwargs["reference_video"] = save_gif(video, tmp_path / "long.gif")
    with pytest.raises(ValueError, match=name) as excinfo:
        pipe(num_inference_steps=2, output_type="pt", **kwargs)
    assert "32 frames" in str(excinfo.value)


class _NotATensor:  # a class the weights-only unpickler refuses
    pass


def _pickled_model(path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2), "extra": _NotATensor()}, path)


INCEPTION_FILES = {
    "pickled object": _pickled_model,
    "garbage": lambda p: p.write_bytes(b"definitely not a torch file"),
    "a list, not a state dict": lambda p: torch.save([torch.zeros(1)], p),
}


@pytest.mark.parametrize("kind", list(INCEPTION_FILES))
def test_inception_weights_that_are_not_a_state_dict_name_the_file(kind, tmp_path):
    from gensample.metrics.inception import FID_WEIGHTS_NAME, load_fid_inception

    path = tmp_path / "weights.pth"
    INCEPTION_FILES[kind](path)
    with pytest.raises(ValueError) as excinfo:
        load_fid_inception(path)
    message = str(excinfo.value)
    assert str(path) in message and FID_WEIGHTS_NAME in message and "original" in message
    assert "weights_only=False" not in message  # never advise unpickling an untrusted file


def test_bad_safetensors_inception_weights_name_the_file(tmp_path):
    from gensample.metrics.inception import load_fid_inception

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=str(path)):
        load_fid_inception(path)


# -- the count -------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "4 latents": len(BAD_LATENTS) * len(PIPES),
    "4 sigmas": len(BAD_SIGMAS) * sum(case[2] for case in PIPES.values()) + 1,  # + the CLI's --sigmas nan
    "4 timesteps": len(BAD_TIMESTEPS) * sum(case[3] for case in PIPES.values()),
    "4 num_inference_steps": 5 * len(PIPES),
    "5 sample flags, seed, steps, grid": len(BAD_SAMPLE_FLAGS) + 2 + 2,
    "6 fid counts": len(BAD_FID_COUNTS) + 3,
    "6 statistics files": len(CORRUPT_STATS),
    "7 image files (fid, training)": 2 * len(FAKE_IMAGES),
    "7 --threads": 2 * len(THREADS_COMMANDS) + 2,
    "7 GIFs": len(FAKE_GIFS),
    "7 videos beyond the frame capacity": len(LONG_VIDEOS),
    "7 Inception weights": len(INCEPTION_FILES) + 1,
}


def test_count_of_bad_inputs(capsys):
    total = sum(BAD_INPUTS.values())
    with capsys.disabled():
        print(f"\nbad inputs tried: {total} ({', '.join(f'{k}: {v}' for k, v in BAD_INPUTS.items())})")
    assert total >= 150
