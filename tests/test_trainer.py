"""Trainer + iCT end to end: loss falls, exact resume, atomic checkpoints, corrupt/foreign checkpoints, bad input."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from gensample.methods import ImprovedConsistencyTraining
from gensample.models import build_unet
from gensample.training import checkpoint as ckpt
from gensample.training.trainer import BatchSampler, TrainConfig, Trainer, resolve_optimizer_settings


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


# ------------------------------------------------------------------------------------------------------------------
# two optimizer groups: EMA gating, per-group optimizer settings, exact resume
# ------------------------------------------------------------------------------------------------------------------
class ICTWithCritic(ImprovedConsistencyTraining):
    """iCT plus a second optimizer group, a linear "critic" on the images stepped on odd steps only, with its own
    optimizer settings: a stand-in for a GAN discriminator (its loss draws noise, so resume must restore the RNG)."""

    method_name = "ict-critic"

    def __init__(self, unet, critic_settings=None, **kwargs):
        super().__init__(unet, **kwargs)
        self.critic = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
        self.critic_settings = {"lr": 5e-3, "betas": (0.5, 0.9)} if critic_settings is None else critic_settings
        self.probe = None

    def trainable_groups(self):
        return {"model": self.model, "critic": self.critic}

    def groups_for_step(self, step):
        return ["critic"] if step % 2 else ["model"]

    def optimizer_settings(self):
        return {"critic": self.critic_settings}

    def forward(self, batch, step, group="model"):
        if group == "critic":
            fake = batch + torch.randn_like(batch)
            return {"loss": F.softplus(-self.critic(batch)).mean() + F.softplus(self.critic(fake)).mean()}
        return super().forward(batch, step, group)

    def after_optimizer_step(self, step):
        super().after_optimizer_step(step)
        if self.probe is not None:
            self.probe(step)


def make_critic_trainer(out, data, max_steps, total_steps=None, seed=0, critic_settings=None, **cfg):
    torch.manual_seed(seed)
    method = ICTWithCritic(build_unet("tiny", sample_size=8), critic_settings=critic_settings,
                           total_steps=total_steps or max_steps)
    config = TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=cfg.pop("batch_size", 16), seed=seed,
                         num_sample_images=2, sample_steps=(1,), progress=False,
                         checkpoint_every=cfg.pop("checkpoint_every", 0), **cfg)
    return Trainer(method, data, config)


def _flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_ema_moves_only_after_steps_of_the_groups_that_own_it(tmp_path, digits):
    trainer = make_critic_trainer(tmp_path, digits, max_steps=4)
    method, ema = trainer.method, trainer.emas["unet"]
    assert trainer.ema_groups == {"unet": ["model"]}
    assert make_trainer(tmp_path / "ict", digits, max_steps=1).ema_groups == {"unet": ["model"]}
    records = []
    method.probe = lambda step: records.append((step, ema.num_updates, _flat(ema.model), _flat(method.critic)))
    previous = (_flat(ema.model), _flat(method.critic))
    trainer.train()
    assert [(s, n) for s, n, _, _ in records] == [(0, 1), (1, 1), (2, 2), (3, 2)]
    for step, _, ema_params, critic in records:
        critic_step = step % 2 == 1
        assert torch.equal(ema_params, previous[0]) == critic_step, step  # critic-only steps leave the EMA alone
        assert torch.equal(critic, previous[1]) != critic_step, step
        previous = (ema_params, critic)
    state = json.loads((tmp_path / "checkpoints/checkpoint-00000004/trainer_state.json").read_text())
    assert state["ema_updates"] == {"unet": 2}


def test_per_group_optimizer_settings_reach_the_optimizers(tmp_path, digits):
    trainer = make_critic_trainer(tmp_path, digits, max_steps=2, learning_rate=1e-3, weight_decay=0.0,
                                  group_optimizer_settings={"critic": {"weight_decay": 0.01}})
    opts = {name: o.optimizer.param_groups[0] for name, o in zip(trainer.group_names, trainer.optimizers)}
    assert (opts["model"]["lr"], opts["model"]["betas"], opts["model"]["weight_decay"]) == (1e-3, (0.9, 0.999), 0.0)
    assert (opts["critic"]["lr"], opts["critic"]["betas"], opts["critic"]["weight_decay"]) == (5e-3, (0.5, 0.9), 0.01)
    assert trainer._run_config()["optimizers"] == {
        "model": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0},
        "critic": {"lr": 5e-3, "betas": [0.5, 0.9], "weight_decay": 0.01}}
    # the config overrides the method key by key; the warm-up scales each group's own lr
    trainer = make_critic_trainer(tmp_path, digits, max_steps=2, learning_rate=1e-3, lr_warmup_steps=4,
                                  group_optimizer_settings={"critic": {"lr": 2e-4}})
    opts = {name: o.optimizer.param_groups[0] for name, o in zip(trainer.group_names, trainer.optimizers)}
    assert opts["critic"]["initial_lr"] == 2e-4 and opts["critic"]["betas"] == (0.5, 0.9)
    assert opts["critic"]["lr"] == pytest.approx(2e-4 / 4) and opts["model"]["lr"] == pytest.approx(1e-3 / 4)
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if "critic/lr" in r][-1]
    assert last["critic/lr"] == pytest.approx(2e-4 * 2 / 4) and last["lr"] == pytest.approx(1e-3 * 2 / 4)
    # bad settings
    method = ICTWithCritic(build_unet("tiny", sample_size=8), total_steps=2)
    for bad, match in [({"discriminator": {"lr": 1e-3}}, "group 'discriminator'"),
                       ({"critic": {"momentum": 0.9}}, "unknown keys"), ({"critic": {"betas": (1.0, 0.9)}}, "betas"),
                       ({"critic": {"lr": 0.0}}, "lr > 0")]:
        with pytest.raises(ValueError, match=match):
            resolve_optimizer_settings(method, TrainConfig(output_dir=str(tmp_path), group_optimizer_settings=bad))
    with pytest.raises(ValueError, match="optimizer_settings"):
        make_critic_trainer(tmp_path, digits, max_steps=1, critic_settings={"eps": 1e-8})


def test_resume_is_exact_with_two_groups(tmp_path, digits):
    """Alternating groups with their own settings: 6 steps straight == 3, stop, resume 3 (weights, EMA and its
    update count, both optimizers' states)."""
    n = 6
    make_critic_trainer(tmp_path / "a", digits, max_steps=n, checkpoint_every=n // 2).train()
    make_critic_trainer(tmp_path / "b", digits, max_steps=n // 2, total_steps=n).train()
    make_critic_trainer(tmp_path / "b", digits, max_steps=n, seed=7).train(resume=True)
    a, b = (tmp_path / f"{r}/checkpoints/checkpoint-{n:08d}" for r in "ab")
    for name in ("networks.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert not any("warning" in json.loads(line) for line in (tmp_path / "b/train_log.jsonl").read_text().splitlines())
    sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    assert sa["ema_updates"] == sb["ema_updates"] == {"unet": 3}
    oa, ob = (torch.load(p / "optimizers.pt", weights_only=True)["optimizers"] for p in (a, b))
    for ga, gb in zip(oa, ob):
        assert ga["param_groups"] == gb["param_groups"]
        for k in ga["state"]:
            assert all(torch.equal(ga["state"][k][s], gb["state"][k][s]) for s in ga["state"][k])
    assert oa[1]["param_groups"][0]["betas"] == (0.5, 0.9) and oa[1]["param_groups"][0]["lr"] == 5e-3
    mid = load_file(tmp_path / f"a/checkpoints/checkpoint-{n // 2:08d}/networks.safetensors")
    final = load_file(a / "networks.safetensors")
    assert not all(torch.equal(mid[k], final[k]) for k in final)


# -- learning-rate schedules ------------------------------------------------------------------------------------------

def test_lr_multiplier_matches_formulas():
    import math

    from gensample.training.lr_schedule import lr_multiplier

    # cosine from 1 to 0 over 100 steps: 1 at 0, cos^2-shaped, 0.5 at the half, 0 at the end and after it
    assert lr_multiplier(0, "cosine", 0, 100) == 1.0
    assert lr_multiplier(25, "cosine", 0, 100) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert lr_multiplier(50, "cosine", 0, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, "cosine", 0, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(150, "cosine", 0, 100) == pytest.approx(0.0, abs=1e-12)
    # warm-up first, then linear decay to a floor of 10%
    assert [lr_multiplier(s, "linear", 10, 110, 0.1) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_multiplier(60, "linear", 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(110, "linear", 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(10_000, "constant", 10, 110) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr_schedule="step"), "lr_schedule='step'"),
    (dict(lr_schedule="cosine", lr_warmup_steps=8), "lr_warmup_steps=8"),
    (dict(lr_schedule="cosine", lr_final_fraction=1.5), "lr_final_fraction"),
])
def test_bad_lr_schedule_is_named(tmp_path, digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, digits, max_steps=8, **kwargs)


def test_cosine_schedule_reaches_optimizer_and_resumes_exactly(tmp_path, digits):
    """The optimizer's rate follows base * (1 + cos(pi k / K)) / 2, and a run trained in two legs with
    lr_decay_steps = K gives the same weights as one straight run."""
    import math

    n, base = 8, 1e-3
    straight = make_trainer(tmp_path / "a", digits, max_steps=n, learning_rate=base, lr_schedule="cosine")
    straight.train()
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "a/train_log.jsonl").read_text().splitlines()]
    assert straight.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    logged = [lr for lr in lrs if lr is not None]
    assert logged and all(any(lr == pytest.approx(base * (1 + math.cos(math.pi * k / n)) / 2) for k in range(n + 1))
                          for lr in logged)
    make_trainer(tmp_path / "b", digits, max_steps=n // 2, total_steps=n, learning_rate=base, lr_schedule="cosine",
                 lr_decay_steps=n).train()
    assert make_trainer(tmp_path / "c", digits, max_steps=n // 2, total_steps=n, learning_rate=base,
                        lr_schedule="cosine", lr_decay_steps=n).optimizers[0].param_groups[0]["lr"] == base
    make_trainer(tmp_path / "b", digits, max_steps=n, learning_rate=base, lr_schedule="cosine").train(resume=True)
    a = load_file(tmp_path / f"a/checkpoints/checkpoint-{n:08d}/networks.safetensors")
    b = load_file(tmp_path / f"b/checkpoints/checkpoint-{n:08d}/networks.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_warns_when_the_decay_horizon_changes(tmp_path, digits):
    make_trainer(tmp_path, digits, max_steps=4, lr_schedule="cosine").train()
    make_trainer(tmp_path, digits, max_steps=6, lr_schedule="cosine").train(resume=True)
    warnings = [json.loads(line)["warning"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
                if "warning" in json.loads(line)]
    assert any("LR schedule changes" in w and "--lr-decay-steps 4" in w for w in warnings), warnings
    # same horizon given explicitly: no warning
    make_trainer(tmp_path / "b", digits, max_steps=4, lr_schedule="cosine", lr_decay_steps=8).train()
    make_trainer(tmp_path / "b", digits, max_steps=8, lr_schedule="cosine").train(resume=True)
    assert "LR schedule changes" not in (tmp_path / "b/train_log.jsonl").read_text()
