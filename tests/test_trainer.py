"""Trainer + iCT end to end: loss falls, exact resume, atomic checkpoints, corrupt/foreign checkpoints, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gensample.methods import ImprovedConsistencyTraining
from gensample.models import build_unet
from gensample.training import checkpoint as ckpt
from gensample.training.trainer import BatchSampler, TrainConfig, Trainer


def make_trainer(out, data, max_steps, total_steps=None, seed=0, s0=10, s1=1280, dropout=0.0, **cfg):
    torch.manual_seed(seed)
    unet = build_unet("tiny", sample_size=8, dropout=dropout)
    method = ImprovedConsistencyTraining(unet, total_steps=total_steps or max_steps, s0=s0, s1=s1)
    config = TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=cfg.pop("batch_size", 32), seed=seed,
                         num_sample_images=cfg.pop("num_sample_images", 4), progress=False,
                         checkpoint_every=cfg.pop("checkpoint_every", 0), **cfg)
    return Trainer(method, data, config)


def test_batch_sampler_covers_epoch_and_resumes(digits):
    s = BatchSampler(digits[:10], 4, seed=1)
    first = [s.next() for _ in range(5)]  # 20 rows = 2 epochs of 10
    epoch = torch.cat(first)[:10]
    assert sorted(epoch.flatten(1).sum(1).tolist()) == sorted(digits[:10].flatten(1).sum(1).tolist())
    state = s.state_dict()
    a = [s.next() for _ in range(3)]
    s2 = BatchSampler(digits[:10], 4, seed=999)
    s2.load_state_dict(json.loads(json.dumps(state)))
    b = [s2.next() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_ict_loss_falls_and_run_writes_outputs(tmp_path, digits):
    # Fixed discretization (s0 = s1) and a fixed evaluation batch (same data, noise and indices) so the loss is
    # comparable before and after training.
    trainer = make_trainer(tmp_path, digits, max_steps=60, s0=10, s1=10, learning_rate=1e-3, batch_size=64,
                           checkpoint_every=30)

    def eval_loss():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return float(trainer.method(digits[:512], 0)["loss"].detach())

    def one_step_nn_distance():
        # mean distance of 1-step samples (fixed noise) to their nearest training digit
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            z = torch.randn(128, 1, 8, 8) * 80.0
            x = trainer.method.model(z, torch.full((128,), 80.0, dtype=torch.float64)).clamp(-1, 1)
        return float(torch.cdist(x.flatten(1), digits.flatten(1)).min(1).values.mean())

    before, nn_before = eval_loss(), one_step_nn_distance()
    summary = trainer.train()
    after, nn_after = eval_loss(), one_step_nn_distance()
    assert after < 0.85 * before, (before, after)
    assert nn_after < 0.8 * nn_before, (nn_before, nn_after)
    for name in ("pipeline/model_index.json", "pipeline/unet/diffusion_pytorch_model.safetensors",
                 "pipeline/scheduler/scheduler_config.json", "samples.png", "loss.png", "train_log.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [
        "checkpoint-00000030", "checkpoint-00000060"]
    assert summary["steps"] == 60


def test_resume_is_exact(tmp_path, digits):
    """N steps straight == N/2 steps, stop, resume N/2 (weights, EMA and optimizer state equal), with dropout on."""
    n = 12
    straight = make_trainer(tmp_path / "a", digits, max_steps=n, dropout=0.1, checkpoint_every=n // 2)
    straight.train()
    first = make_trainer(tmp_path / "b", digits, max_steps=n // 2, total_steps=n, dropout=0.1)
    first.train()
    second = make_trainer(tmp_path / "b", digits, max_steps=n, dropout=0.1, seed=123)  # seed must not matter
    second.train(resume=True)
    a = load_file(tmp_path / f"a/checkpoints/checkpoint-{n:08d}/networks.safetensors")
    b = load_file(tmp_path / f"b/checkpoints/checkpoint-{n:08d}/networks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(tmp_path / f"a/checkpoints/checkpoint-{n:08d}/ema.safetensors")
    eb = load_file(tmp_path / f"b/checkpoints/checkpoint-{n:08d}/ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # and the run really continued: not a copy of the step-n/2 weights
    mid = load_file(tmp_path / f"a/checkpoints/checkpoint-{n // 2:08d}/networks.safetensors")
    assert not all(torch.equal(mid[k], a[k]) for k in a)


def test_resume_without_replaying_rng_would_differ(tmp_path, digits):
    """Guards the test above: a resume that forgets the RNG/sampler state does give different weights."""
    n = 8
    make_trainer(tmp_path / "a", digits, max_steps=n).train()
    make_trainer(tmp_path / "b", digits, max_steps=n // 2, total_steps=n).train()
    for f in (tmp_path / "b/checkpoints").glob("checkpoint-*/rng-rank0.json"):
        f.unlink()
        manifest = json.loads((f.parent / "MANIFEST.json").read_text())
        del manifest["files"]["rng-rank0.json"]
        (f.parent / "MANIFEST.json").write_text(json.dumps(manifest))
    make_trainer(tmp_path / "b", digits, max_steps=n, seed=5).train(resume=True)
    a = load_file(tmp_path / f"a/checkpoints/checkpoint-{n:08d}/networks.safetensors")
    b = load_file(tmp_path / f"b/checkpoints/checkpoint-{n:08d}/networks.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, digits, capsys):
    make_trainer(tmp_path, digits, max_steps=6, checkpoint_every=2, checkpoints_total_limit=2).train()
    ckpts = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 6]
    latest = ckpts[-1][1]
    with open(latest / "networks.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.verify(latest)
    t = make_trainer(tmp_path, digits, max_steps=8)
    loaded = t.load_checkpoint()
    assert loaded == ckpts[0][1] and t.step == 4
    assert "skipping checkpoint-00000006" in capsys.readouterr().out
    # An interrupted write (staging folder without manifest) is never picked up and never costs a valid checkpoint.
    staging = tmp_path / "checkpoints" / ".tmp-checkpoint-00000010"
    staging.mkdir()
    (staging / "networks.safetensors").write_bytes(b"partial")
    ckpt.prune(tmp_path / "checkpoints", keep=1)
    assert ckpts[0][1].is_dir() and latest.is_dir() and not staging.exists()


def test_explicit_bad_checkpoints_raise_clear_errors(tmp_path, digits):
    t = make_trainer(tmp_path / "run", digits, max_steps=2)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        t.load_checkpoint(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ckpt.CheckpointError, match="MANIFEST"):
        t.load_checkpoint(foreign)
    # a checkpoint of another method
    t.train()
    path = ckpt.list_checkpoints(tmp_path / "run/checkpoints")[-1][1]
    state = json.loads((path / "trainer_state.json").read_text())
    state["method"] = "ctm"
    (path / "trainer_state.json").write_text(json.dumps(state))
    staging = path.parent / ".tmp-x"
    shutil.copytree(path, staging)
    (staging / "MANIFEST.json").unlink()
    forged = ckpt.finalize(staging, path.parent, 99)
    with pytest.raises(ckpt.CheckpointError, match="method 'ctm'"):
        make_trainer(tmp_path / "run2", digits, max_steps=2).load_checkpoint(forged)


def test_non_finite_loss_is_reported(tmp_path, digits):
    bad = digits.clone()
    bad[:] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        make_trainer(tmp_path, bad, max_steps=2).train()


def test_dropout_mask_shared_between_student_and_teacher(digits):
    """With identical inputs for both passes the iCT distance must be exactly 0 only if dropout masks are shared."""
    torch.manual_seed(0)
    method = ImprovedConsistencyTraining(build_unet("tiny", sample_size=8, dropout=0.5), total_steps=10)
    method.train()
    x = digits[:8]
    grid = torch.tensor([0.5, 0.5 + 1e-30], dtype=torch.float64)  # sigma_i == sigma_{i+1} in float32
    method.noise_grid = lambda step: (grid.clone(), torch.tensor([1.0], dtype=torch.float64),
                                      torch.tensor([1.0], dtype=torch.float64))
    method.distance = lambda a, b, c: (a - b).flatten(1).abs().amax(1)
    out = method(x, 0)
    assert float(out["distance"]) == 0.0
    # the same two passes without replaying the RNG differ, so the check above is meaningful
    y1 = method.model(x, torch.full((8,), 0.5))
    y2 = method.model(x, torch.full((8,), 0.5))
    assert not torch.equal(y1, y2)
