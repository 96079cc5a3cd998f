"""The `gensample` command as a user runs it: train -> pipeline -> sample, bit-exact grids, clear errors,
and a real 2-process run under `accelerate launch`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gensample.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_train_then_sample_is_reproducible(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "ict", "--data", "digits", "--model", "tiny", "--max-steps", "4", "--batch-size", "16",
                 "--output", str(out), "--num-sample-images", "4", "--no-progress", "--checkpoint-every", "2"]) == 0
    for name in ("pipeline/model_index.json", "samples.png", "loss.png", "checkpoints/checkpoint-00000004"):
        assert (out / name).exists(), name
    grids = []
    for i in range(2):
        g = tmp_path / f"grid{i}.png"
        assert main(["sample", str(out / "pipeline"), "--num-inference-steps", "2", "--num-images", "9", "--seed",
                     "0", "--output", str(g)]) == 0
        grids.append(g.read_bytes())
    assert grids[0] == grids[1]
    g2 = tmp_path / "grid_seed1.png"
    main(["sample", str(out / "pipeline"), "--num-inference-steps", "2", "--num-images", "9", "--seed", "1",
          "--output", str(g2)])
    assert g2.read_bytes() != grids[0]
    # --resume continues from the last checkpoint to a new --max-steps
    assert main(["train", "ict", "--data", "digits", "--model", "tiny", "--max-steps", "6", "--batch-size", "16",
                 "--output", str(out), "--num-sample-images", "4", "--no-progress", "--resume",
                 "--curriculum-steps", "4"]) == 0
    log = (out / "train_log.jsonl").read_text()
    assert "resumed from" in log and (out / "checkpoints/checkpoint-00000006").is_dir()


def test_image_folder_training(tmp_path):
    from PIL import Image
    import numpy as np

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "ict", "--data", str(folder), "--resolution", "8", "--model", "tiny", "--max-steps", "2",
                 "--batch-size", "4", "--output", str(out), "--num-sample-images", "4", "--no-progress"]) == 0
    cfg = json.loads((out / "pipeline/unet/config.json").read_text())
    assert cfg["in_channels"] == 3 and cfg["sample_size"] == 8


@pytest.mark.parametrize("argv, message", [
    (["train", "ict", "--model", "huge", "--output", "X"], "Unknown model preset 'huge'"),
    (["train", "ict", "--data", "/nonexistent/folder", "--output", "X"], "not a folder of images"),
    (["sample", "/nonexistent/pipeline"], "no model_index.json"),
])
def test_bad_input_gives_clear_error(tmp_path, capsys, argv, message):
    argv = [a if a != "X" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_num_inference_steps_below_one_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "somewhere", "--num-inference-steps", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_resume_from_corrupt_explicit_checkpoint_errors(tmp_path, capsys):
    bad = tmp_path / "checkpoint-00000001"
    bad.mkdir()
    (bad / "networks.safetensors").write_bytes(b"not a safetensors file")
    code = main(["train", "ict", "--model", "tiny", "--max-steps", "2", "--output", str(tmp_path / "o"),
                 "--resume", str(bad), "--no-progress"])
    assert code == 2
    assert "MANIFEST" in capsys.readouterr().err


def test_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): both ranks run, write their own RNG state,
    and gradients are synchronised (both ranks end with identical weights, checked through the shared checkpoint)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(REPO / "scripts/train.py"), "ict", "--cpu", "--model", "tiny", "--max-steps", "3", "--batch-size", "8",
           "--output", str(out), "--num-sample-images", "4", "--no-progress", "--checkpoint-every", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if '"start"' in line]
    assert start[-1]["rank_count"] == 2
    ck = out / "checkpoints/checkpoint-00000003"
    r0 = json.loads((ck / "rng-rank0.json").read_text())
    r1 = json.loads((ck / "rng-rank1.json").read_text())
    assert r0["rng"]["torch"] != r1["rng"]["torch"] and r0["sampler"] != r1["sampler"]
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["num_processes"] == 2


# -- gensample sample at scale: per-image seeds, streaming, a capped grid (#18) ------------------------------------

ICT = REPO / "assets" / "pipelines" / "ict-digits"


def _sample(tmp_path, name: str, *flags: str) -> tuple[Path, list[bytes]]:
    """Run `gensample sample` on the shipped iCT model (1 step); returns the grid path and the PNGs' bytes."""
    folder = tmp_path / name
    assert main(["sample", str(ICT), "--num-inference-steps", "1", "--output", str(folder / "grid.png"),
                 "--save-images", str(folder / "images"), "--no-progress", *flags]) == 0
    return folder / "grid.png", [p.read_bytes() for p in sorted((folder / "images").glob("*.png"))]


def test_sample_images_do_not_depend_on_the_batch_size(tmp_path):
    grid_a, a = _sample(tmp_path, "a", "--num-images", "10", "--batch-size", "3")
    grid_b, b = _sample(tmp_path, "b", "--num-images", "10", "--batch-size", "10")
    assert len(a) == 10 and a == b and grid_a.read_bytes() == grid_b.read_bytes()


def test_sample_image_k_is_generated_from_seed_plus_k_as_fid_does(tmp_path):
    import io

    import numpy as np
    import torch
    from PIL import Image

    from gensample.loading import load_pipeline
    from gensample.metrics.fid import generate_images

    _, seed0 = _sample(tmp_path, "s0", "--num-images", "10", "--seed", "0", "--batch-size", "4")
    _, seed5 = _sample(tmp_path, "s5", "--num-images", "5", "--seed", "5", "--batch-size", "4")
    # image k of --seed 5 is image 5 + k of --seed 0 (the seed names the image) ...
    assert seed5 == seed0[5:]
    # ... so runs over disjoint seed ranges share no image (the old per-batch seeding shared whole batches between
    # --seed s and --seed s + batch_size)
    assert not set(seed0[:5]) & set(seed5)
    # and they are the images `gensample fid` evaluates for the same seed
    pipe = load_pipeline(ICT)
    fid_images = torch.cat(list(generate_images(pipe, range(10), seed=0, num_inference_steps=1, batch_size=7,
                                                progress=False)))
    ours = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in seed0])
    assert np.array_equal(ours, fid_images[:, 0].numpy())


def test_sample_streams_pngs_per_batch_and_caps_the_grid(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import gensample.loading

    grid, images = _sample(tmp_path, "capped", "--num-images", "10", "--batch-size", "4", "--grid-images", "6")
    assert len(images) == 10
    with Image.open(grid) as g:  # 6 images of 8 px upscaled to 64: 3 columns x 2 rows, 1 px padding
        assert g.size == (3 * 65 + 1, 2 * 65 + 1)
    assert "first 6 of 10 images" in capsys.readouterr().out

    real_load = gensample.loading.load_pipeline

    class FailsOnThirdBatch:
        def __init__(self, pipe):
            self.pipe, self.calls = pipe, 0

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt  # a run stopped part-way
            return self.pipe(*args, **kwargs)

    monkeypatch.setattr(gensample.loading, "load_pipeline", lambda path: FailsOnThirdBatch(real_load(path)))
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        main(["sample", str(ICT), "--num-images", "12", "--batch-size", "4", "--output", str(out / "grid.png"),
              "--save-images", str(out / "images"), "--no-progress"])
    # the two finished batches are on disk already, and they are the images of the full run
    written = sorted((out / "images").glob("*.png"))
    assert [p.name for p in written] == [f"{k:06d}.png" for k in range(8)]
    assert [p.read_bytes() for p in written] == images[:8]
