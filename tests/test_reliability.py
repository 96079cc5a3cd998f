"""Training reliability (#18): `--seed` reproduces every `train` command bit for bit; checkpoints are never deleted
unless they are ours to prune (corrupt or superseded ones are moved aside, a user's folders are kept); `--resume`
with nothing to resume is an error unless `--resume auto`; a resume of a different run is refused with the list of
differences (harmless changes are noted); symbolic links and name/step mismatches are refused; the final pipeline is
written atomically; and a real training process killed with SIGKILL mid-step and mid-checkpoint resumes to the same
weights as an uninterrupted run.

Style of tests/test_trainer.py: build tiny runs, break them, check what survives.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gensample.cli import main
from gensample.methods import ImprovedConsistencyTraining
from gensample.models import build_unet
from gensample.training import checkpoint as ckpt
from gensample.training.trainer import TEST_PAUSE_ENV, TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------------------------------
def make(out, data, max_steps, *, model="tiny", sample_size=8, in_channels=1, total_steps=None, seed=0, **cfg):
    torch.manual_seed(seed)
    unet = build_unet(model, sample_size=sample_size, in_channels=in_channels)
    method = ImprovedConsistencyTraining(unet, total_steps=total_steps or max_steps)
    config = TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=cfg.pop("batch_size", 4), seed=seed,
                         num_sample_images=cfg.pop("num_sample_images", 1), sample_steps=cfg.pop("sample_steps", (1,)),
                         progress=False, checkpoint_every=cfg.pop("checkpoint_every", 0), **cfg)
    return Trainer(method, data, config)


def tensors_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def reseal(path: Path) -> None:
    """Rewrite a checkpoint's manifest for its current files (a hand edit that still verifies)."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"] = {p.name: ckpt._sha256(p) for p in sorted(path.iterdir()) if p.name != ckpt.MANIFEST}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def corrupt(path: Path) -> None:
    with open(path / "networks.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")


def names(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir())


def log_records(out: Path, key: str) -> list[str]:
    lines = (Path(out) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


@pytest.fixture(scope="module")
def data():
    from gensample.data import load_digits

    return load_digits("train")[:64]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data):
    """A finished 4-step run with checkpoints 2 and 4 (copied by the tests that break it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    make(out, data, 4, checkpoint_every=2).train()
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    return out


CKPT = "checkpoints/checkpoint-{:08d}"


# -- 1. --seed reproduces every train command ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _weights(out: Path) -> list[Path]:
    """The weight files a run saved: its checkpoints' networks/EMA and every safetensors file of pipeline/ (or of the
    VAE folder that `train vae` writes)."""
    files = sorted(out.glob("checkpoints/checkpoint-*/*.safetensors")) + sorted(out.glob("pipeline/**/*.safetensors"))
    return files or sorted(out.glob("*.safetensors"))


def _train_twice(tmp_path, argv_of) -> int:
    """Run a train command twice into two folders; assert every saved weight file is bit-identical; return the
    number of files compared."""
    outs = [tmp_path / "a", tmp_path / "b"]
    threads = torch.get_num_threads()
    try:
        for out in outs:
            torch.manual_seed(len(str(out)) * 7919 + time.time_ns() % 1000)  # whatever state a caller left behind
            assert main(argv_of(out)) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = (_weights(out) for out in outs)
    assert a and [p.relative_to(outs[0]) for p in a] == [p.relative_to(outs[1]) for p in b]
    for pa, pb in zip(a, b):
        assert tensors_equal(pa, pb), pa.relative_to(outs[0])
    return len(a)


RUN = ["--max-steps", "2", "--batch-size", "2", "--num-sample-images", "1", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("method", ["ict", "edm"])
def test_seed_reproduces_pixel_training(tmp_path, method):
    extra = ["--sample-steps", "1"] if method == "edm" else []
    compared = _train_twice(tmp_path, lambda out: ["train", method, "--model", "tiny", *RUN, *extra,
                                                   "--checkpoint-every", "1", "--output", str(out)])
    assert compared >= 2  # the checkpoint weights and the exported pipeline


@pytest.fixture(scope="module")
def teacher_and_vae(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("deps")
    assert main(["train", "edm", "--model", "tiny", *RUN, "--max-steps", "1", "--sample-steps", "1",
                 "--output", str(root / "edm")]) == 0
    assert main(["train", "vae", "--data", str(image_folder), "--channels", "1", "--resolution", "16",
                 "--block-out-channels", "8", "8", "--norm-num-groups", "4", "--max-steps", "1", "--batch-size", "2",
                 "--scaling-factor", "1", "--no-progress", "--output", str(root / "vae")]) == 0
    return root / "edm" / "pipeline", root / "vae"


@pytest.mark.parametrize("method", ["ctm", "lct", "vae", "video-diffusion"])
def test_seed_reproduces_every_other_train_command(tmp_path, method, teacher_and_vae, image_folder):
    teacher, vae = teacher_and_vae
    argv = {
        "ctm": ["train", "ctm", "--teacher", str(teacher), *RUN, "--num-sigmas", "4", "--sample-steps", "1"],
        "lct": ["train", "lct", "--vae", str(vae), "--data", str(image_folder), "--channels", "1", "--resolution",
                "16", "--model", "tiny", *RUN, "--sample-steps", "1"],
        "vae": ["train", "vae", "--data", str(image_folder), "--channels", "1", "--resolution", "16",
                "--block-out-channels", "8", "8", "--norm-num-groups", "4", "--max-steps", "2", "--batch-size", "2",
                "--no-progress", "--threads", "1"],
        "video-diffusion": ["train", "video-diffusion", "--max-steps", "2", "--batch-size", "2", "--num-videos", "4",
                            "--num-frames", "4", "--block-out-channels", "8", "16", "--temporal-layers", "0", "1",
                            "--num-sample-videos", "1", "--sample-steps", "1", "--threads", "1", "--no-progress"],
    }[method]
    assert _train_twice(tmp_path, lambda out: [*argv, "--output", str(out)]) >= 1


# -- 2. checkpoints are moved aside, never deleted ----------------------------------------------------------------------
def test_resume_past_a_corrupt_checkpoint_moves_it_aside(run, data):
    corrupt(run / CKPT.format(4))
    before = (run / CKPT.format(4) / "networks.safetensors").read_bytes()
    t = make(run, data, 4, checkpoint_every=2)
    t.train(resume=True)  # resumes at 2 and writes a new checkpoint-4
    moved = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-00000004.corrupt-")]
    assert len(moved) == 1 and (moved[0] / "networks.safetensors").read_bytes() == before
    ckpt.verify(run / CKPT.format(4))
    assert any("moved aside" in w for w in log_records(run, "warning"))


def test_explicit_older_resume_keeps_the_newer_checkpoints(run, data):
    make(run, data, 3).train(resume=run / CKPT.format(2))
    superseded = [p for p in (run / "checkpoints").iterdir() if ".superseded-" in p.name]
    assert [p.name.split(".")[0] for p in superseded] == ["checkpoint-00000004"]
    ckpt.verify(superseded[0])  # intact, and no longer a resume candidate
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 3]
    assert ckpt.latest_valid_checkpoint(run / "checkpoints") == run / CKPT.format(3)


def test_fresh_run_over_an_existing_run_moves_its_checkpoints_aside(run, data):
    make(run, data, 2).train()
    assert sorted(p.name.split(".")[0] for p in (run / "checkpoints").iterdir() if ".superseded-" in p.name) == [
        "checkpoint-00000002", "checkpoint-00000004"]
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2]


def test_prune_deletes_only_what_is_ours(tmp_path, run):
    root = run / "checkpoints"
    mine = root / ".tmp-checkpoint-mine"  # a user's folder with our prefix
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    foreign = root / ".tmp-checkpoint-00000007"  # our name, foreign content
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me too")
    crashed = root / ".tmp-checkpoint-00000009"  # a crashed write of ours
    crashed.mkdir()
    (crashed / "networks.safetensors").write_bytes(b"partial")
    aside = ckpt.move_aside(root / CKPT.format(2).split("/")[1], "superseded")
    shutil.copytree(aside, root / "checkpoint-00000002")
    target = tmp_path / "elsewhere"
    shutil.copytree(root / "checkpoint-00000004", target)
    (root / "checkpoint-00000001").symlink_to(target, target_is_directory=True)
    ckpt.prune(root, keep=1)
    left = names(root)
    assert ".tmp-checkpoint-mine" in left and ".tmp-checkpoint-00000007" in left and aside.name in left
    assert ".tmp-checkpoint-00000009" not in left and "checkpoint-00000002" not in left
    assert "checkpoint-00000004" in left and (root / "checkpoint-00000001").is_symlink() and target.is_dir()


def test_resume_with_nothing_to_resume_is_an_error_unless_auto(tmp_path, run, data, capsys):
    # a mistyped --output: an error, exit code 2, nothing trained
    common = ["train", "ict", "--model", "tiny", "--max-steps", "1", "--batch-size", "2", "--no-progress",
              "--num-sample-images", "1"]
    assert main([*common, "--output", str(tmp_path / "typo"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not (tmp_path / "typo" / "pipeline").exists()
    # every checkpoint corrupt: an error, and both are still there
    for step in (2, 4):
        corrupt(run / CKPT.format(step))
    with pytest.raises(ckpt.CheckpointError, match="nothing to resume: no checkpoint .* verifies"):
        make(run, data, 4).train(resume=True)
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4]
    # --resume auto: starts from step 0, the corrupt ones moved aside
    t = make(run, data, 1)
    t.train(resume="auto")
    assert t.step == 1 and sum(".corrupt-" in n for n in names(run / "checkpoints")) == 2
    assert main([*common, "--output", str(tmp_path / "fresh"), "--resume", "auto"]) == 0


# -- 3. a resume of a different run is refused --------------------------------------------------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"batch_size": 8}, "batch_size: 4 in the checkpoint, 8 now"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: 1 in the checkpoint, 2 now"),
    ({"ema_rate": 0.99}, "ema_rate: 0.999 in the checkpoint, 0.99 now"),
    ({"resolution": 16}, "model config model.backbone.sample_size: 8 in the checkpoint, 16 now"),
    ({"other_data": True}, "data content"),
    ({"model": "digits-small"}, "model: another architecture"),
])
def test_resume_of_a_different_run_is_refused(run, data, change, expected):
    change = dict(change)
    d = data
    kwargs = {}
    if change.pop("resolution", None):
        d = F.interpolate(data, size=16, mode="bilinear", align_corners=False)
        kwargs["sample_size"] = 16
    if change.pop("other_data", None):
        d = data.flip(-1)
    t = make(run, d, 6, **kwargs, **change)
    before = {k: v.clone() for k, v in t.method.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError, match="belongs to a different run") as e:
        t.train(resume=True)
    assert expected in str(e.value)
    if "resolution" in expected or "sample_size" in expected:
        assert "data shape" in str(e.value)
    assert t.step == 0 and all(torch.equal(v, t.method.state_dict()[k]) for k, v in before.items())
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4]  # nothing moved


def test_cli_resume_with_other_data_or_model_is_a_clear_error(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    common = ["train", "ict", "--max-steps", "2", "--batch-size", "2", "--no-progress", "--num-sample-images", "1",
              "--output", str(out), "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main([*common, "--model", "tiny"]) == 0
        capsys.readouterr()
        assert main([*common, "--model", "digits-small", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "different run" in err and "model: another architecture" in err and "Traceback" not in err
        assert main([*common, "--model", "tiny", "--data", str(image_folder), "--resolution", "8", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "data shape" in err and "'digits' in the checkpoint" not in err
    finally:
        torch.set_num_threads(threads)


def test_harmless_changes_resume_with_a_note(run, data):
    make(run, data, 6, total_steps=4, checkpoint_every=3, seed=9, log_every=1).train(resume=True)
    assert not log_records(run, "warning")
    notes = [m for m in log_records(run, "message") if "leave the run as it is" in m]
    assert notes and all(s in notes[-1] for s in ("max_steps 4 -> 6", "checkpoint_every 2 -> 3", "seed 0 -> 9"))


def test_hand_made_manifest_without_files_is_skipped_like_a_corrupt_one(run, data):
    path = run / CKPT.format(4)
    (path / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "step": 4}))
    with pytest.raises(ckpt.CheckpointError, match="no valid 'files' table"):
        ckpt.verify(path)
    t = make(run, data, 6)
    assert t.load_checkpoint() == run / CKPT.format(2) and t.step == 2


def test_checkpoint_without_run_record_resumes_with_a_warning(run, data):
    """Checkpoints written before the run record (no `run_definition`) still resume; what cannot be compared is
    said. (Checked against a real checkpoint of the previous commit as well: benchmarks/RESULTS.md.)"""
    path = run / CKPT.format(4)
    state = json.loads((path / "trainer_state.json").read_text())
    del state["run_definition"]
    (path / "trainer_state.json").write_text(json.dumps(state))
    reseal(path)
    t = make(run, data, 6)
    t.load_checkpoint()
    assert t.step == 4 and any("predates run records" in w for w in log_records(run, "warning"))
    # the recorded training settings are still compared
    with pytest.raises(ckpt.CheckpointError, match="batch_size"):
        make(run, data, 6, batch_size=2).load_checkpoint()


# -- 7. flags and files that used to slip through -----------------------------------------------------------------------
def test_negative_checkpoint_every_is_an_argparse_error(capsys):
    for flag in ("--checkpoint-every", "--checkpoints-total-limit", "--sample-every", "--fid-every"):
        with pytest.raises(SystemExit):
            main(["train", "ict", "--output", "x", flag, "-1"])
        assert "must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "video-diffusion", "--output", "x", "--checkpoint-every", "-1"])
    with pytest.raises(ValueError, match="checkpoint_every"):
        make("x", torch.zeros(4, 1, 8, 8), 2, checkpoint_every=-1)


def test_rejected_pickle_in_optimizers_is_named(run, data):
    path = run / CKPT.format(4)
    state = torch.load(path / "optimizers.pt", weights_only=True)
    state["extra"] = argparse.Namespace(x=1)  # not allowed by weights_only=True
    torch.save(state, path / "optimizers.pt")
    reseal(path)
    t = make(run, data, 6)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizers\.pt cannot be loaded with torch\.load\(weights_only"):
        t.load_checkpoint(path)
    assert t.step == 0


# -- 8. symbolic links, name/step mismatches, atomic pipeline export ----------------------------------------------------
def test_symlinked_checkpoints_are_refused(run, data, tmp_path):
    root = run / "checkpoints"
    (root / "checkpoint-00000999").symlink_to(root / "checkpoint-00000002", target_is_directory=True)
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        make(run, data, 6).train(resume=True)
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        make(run, data, 6).train()  # a fresh run would have to move or prune it: refused as well
    ckpt.prune(root, keep=2)  # the link is neither counted nor deleted
    assert (root / "checkpoint-00000999").is_symlink() and (root / "checkpoint-00000002").is_dir()
    # outside the checkpoint folder: the step comes from the checkpoint, and a name that disagrees is refused
    link = tmp_path / "checkpoint-00000999"
    link.symlink_to(root / "checkpoint-00000002", target_is_directory=True)
    with pytest.raises(ckpt.CheckpointError, match="holds the state of step 2"):
        make(tmp_path / "other", data, 6).load_checkpoint(link)
    renamed = tmp_path / "copies" / "checkpoint-00000100"
    shutil.copytree(root / "checkpoint-00000002", renamed)
    with pytest.raises(ckpt.CheckpointError, match="name and recorded step disagree"):
        make(tmp_path / "other", data, 6).load_checkpoint(renamed)
    best = tmp_path / "best"  # a link whose name claims no step: followed, and the step is the recorded one
    best.symlink_to(root / "checkpoint-00000004", target_is_directory=True)
    t = make(tmp_path / "other", data, 6)
    assert t.load_checkpoint(best) == best and t.step == 4


def test_pipeline_export_is_atomic(run, data, monkeypatch):
    """A failure while the pipeline is written leaves the previous pipeline/ as it was and no partial folder."""
    index = (run / "pipeline" / "model_index.json").read_bytes()
    weights = (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    real = Trainer.save_pipeline

    def crash(self, folder, pipe=None, **kw):
        real(self, folder, pipe, **kw)
        (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Trainer, "save_pipeline", crash)
    with pytest.raises(OSError, match="disk full"):
        make(run, data, 5).train(resume=True)
    assert (run / "pipeline" / "model_index.json").read_bytes() == index
    assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert not [n for n in names(run) if n.startswith(".tmp-pipeline") or ".replaced-" in n]
    monkeypatch.setattr(Trainer, "save_pipeline", real)
    make(run, data, 5).train(resume=True)  # resumes at 5: no new checkpoint, only the export
    assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != weights
    card = (run / "pipeline" / "README.md").read_text()
    assert ".tmp-pipeline" not in card
    assert not [n for n in names(run) if n.startswith(".tmp-pipeline") or ".replaced-" in n]
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4, 5]


# -- crash safety: SIGKILL a real training process ----------------------------------------------------------------------
CRASH_ARGS = ["train", "ict", "--model", "tiny", "--max-steps", "6", "--batch-size", "4", "--checkpoint-every", "2",
              "--num-sample-images", "1", "--no-progress", "--threads", "1"]


def _kill_at(out: Path, point: str, extra=()) -> None:
    """Start `gensample train ict` in a subprocess, wait until it sits at ``point`` (TEST_PAUSE_ENV), SIGKILL it."""
    env = {**os.environ, TEST_PAUSE_ENV: point, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    marker = out / ".test-paused"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"stderr-{point.replace(':', '-')}.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gensample.cli", *CRASH_ARGS, "--output", str(out), *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.time() + 600
            while not marker.exists():
                if proc.poll() is not None:
                    err.seek(0)
                    pytest.fail(f"the training process exited ({proc.returncode}) before {point}: "
                                f"{err.read()[-2000:]}")
                assert time.time() < deadline, f"no pause at {point}"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _finish_in_process(out: Path, extra=()) -> None:
    threads = torch.get_num_threads()
    try:
        assert main([*CRASH_ARGS, "--output", str(out), *extra]) == 0
    finally:
        torch.set_num_threads(threads)


def _assert_same_final_weights(ref: Path, out: Path) -> None:
    for rel in ("checkpoints/checkpoint-00000006/networks.safetensors", "checkpoints/checkpoint-00000006/ema.safetensors",
                "pipeline/unet/diffusion_pytorch_model.safetensors"):
        assert tensors_equal(ref / rel, out / rel), rel


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = tmp_path_factory.mktemp("crash") / "ref"
    _finish_in_process(ref)
    return ref


def test_sigkill_mid_step_and_mid_checkpoint_resumes_bit_identical(tmp_path, uninterrupted):
    out = tmp_path / "run"
    _kill_at(out, "step:3")  # inside the optimizer step 3 -> 4, after checkpoint-2
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    ckpt.verify(out / CKPT.format(2))
    _kill_at(out, "checkpoint-write:4", ["--resume"])  # resumed at 2, killed while writing checkpoint-4
    staging = out / "checkpoints" / ".tmp-checkpoint-00000004"
    assert names(staging) == ["networks.safetensors", "rng-rank0.json"]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    _finish_in_process(out, ["--resume"])
    assert not staging.exists() and [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4, 6]
    _assert_same_final_weights(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.parametrize("point, latest", [("step:1", None), ("checkpoint-write:2", None),
                                           ("checkpoint-renamed:4", 4), ("pipeline-write:6", 6)])
def test_sigkill_at_the_other_points_resumes_bit_identical(tmp_path, uninterrupted, point, latest):
    """Before the first checkpoint (`--resume auto` starts over: the same weights, since the seed fixes everything),
    inside the first checkpoint write, after a rename but before pruning, and with the final pipeline written but
    not renamed into place."""
    out = tmp_path / "run"
    _kill_at(out, point, ["--checkpoints-total-limit", "1"])
    found = ckpt.latest_valid_checkpoint(out / "checkpoints")
    assert found == (None if latest is None else out / CKPT.format(latest))
    if point.startswith("pipeline"):
        assert not (out / "pipeline").exists() and [n for n in names(out) if n.startswith(".tmp-pipeline-")]
    _finish_in_process(out, ["--resume", "auto", "--checkpoints-total-limit", "1"])
    assert not [n for n in names(out) if n.startswith(".tmp-pipeline-")]
    assert names(out / "checkpoints") == ["checkpoint-00000006"]
    _assert_same_final_weights(uninterrupted, out)
