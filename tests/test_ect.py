"""Easy Consistency Tuning: the r(t) mapping against the reference table, the loss against a hand computation from the
paper's formulas, stages and resume, tuning a trained EDM denoiser on the digits, and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gensample.core.sigmas import ect_pair_gap, ect_stage
from gensample.methods import EasyConsistencyTuning, EDMTraining
from gensample.models import build_unet


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# r(t) of ECT's sigmoid mapping (k = 8, b = 1), computed independently of gensample (reference notes, sec. 7.9)
TIMES = [0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0]
R_TABLE = {
    (2, 0): [0, 0, 0, 0, 0.04638, 4.99818, 40],
    (2, 1): [0, 0, 0, 0.21212, 1.02319, 7.49909, 60],
    (2, 3): [0.00689, 0.07000, 0.37436, 0.80303, 1.75580, 9.37477, 75],
    (2, 7): [0.00981, 0.09812, 0.49215, 0.98769, 1.98474, 9.96092, 79.6875],
    (4, 0): [0, 0, 0, 0.21212, 1.02319, 7.49909, 60],
    (4, 7): [0.01000, 0.09999, 0.49997, 0.99995, 1.99994, 9.99985, 79.99878],
    (256, 3): [0.01, 0.1, 0.5, 1, 2, 10, 80],
}


@pytest.mark.parametrize("q, stage", sorted(R_TABLE))
def test_pair_gap_matches_reference_table(q, stage):
    t = torch.tensor(TIMES, dtype=torch.float64)
    r = t - ect_pair_gap(t, stage, q)
    assert torch.allclose(r, torch.tensor(R_TABLE[(q, stage)], dtype=torch.float64), atol=6e-5, rtol=0)
    assert (r >= 0).all() and (r < t).all()


def test_pair_gap_stays_positive_where_t_minus_r_cancels():
    t = torch.tensor([1e-3, 1.0, 80.0], dtype=torch.float64)
    gap = ect_pair_gap(t, stage=9, q=256)  # 256^-10 ~ 8e-25: t - r in floating point would be 0
    assert (gap > 0).all()
    assert torch.allclose(gap / t, 256.0**-10 * (1 + 8 * torch.sigmoid(-t)), rtol=1e-12)
    with pytest.raises(ValueError, match="q"):
        ect_pair_gap(t, 0, q=1.0)


def test_stages_split_the_run_evenly_and_hold_at_the_end():
    assert [ect_stage(s, 8000) for s in (0, 999, 1000, 4500, 7999, 8000, 20000)] == [0, 0, 1, 4, 7, 7, 7]
    assert ect_stage(5, 10, num_stages=2) == 1 and ect_stage(4, 10, num_stages=2) == 0
    with pytest.raises(ValueError):
        ect_stage(0, 0)


class _SmallNet(nn.Module):
    """F(x, c_noise) = tanh(w x + a c_noise / 1000): deterministic, differentiable, no dropout."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))
        self.a = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, timestep, **kwargs):
        return torch.tanh(self.w * x + self.a * timestep.reshape(-1, 1, 1, 1).to(x.dtype) / 1000)


def _f_by_hand(net, x, s, sigma_data=0.5, sigma_min=0.002):
    """The CM parametrization written out (CM paper, appendix C; c_noise = 1000 * 0.25 ln s)."""
    c_skip = sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)
    c_out = (s - sigma_min) * sigma_data / math.sqrt(s**2 + sigma_data**2)
    c_in = 1 / math.sqrt(s**2 + sigma_data**2)
    out = net(c_in * x, torch.tensor([250 * math.log(s)]))
    return c_skip * x + c_out * out


def test_loss_equals_the_papers_formula_by_hand(monkeypatch, digits):
    net = _SmallNet()
    method = EasyConsistencyTuning(net, total_steps=800)
    x0 = digits[:4]
    t_values = [0.5, 2.0, 30.0, 0.002]
    step = 250  # stage 2
    q_factor = 2.0 ** -(2 + 1)
    gaps = [t * q_factor * (1 + 8 / (1 + math.exp(t))) for t in t_values]
    gaps = [min(g, t) for g, t in zip(gaps, t_values)]
    monkeypatch.setattr(method, "sample_times", lambda b, s: (torch.tensor(t_values, dtype=torch.float64),
                                                              torch.tensor(gaps, dtype=torch.float64)))
    torch.manual_seed(3)
    loss = method(x0, step)["loss"]
    torch.manual_seed(3)
    z = torch.randn_like(x0)
    c = 0.00054 * math.sqrt(64)
    expected = []
    for i, (t, gap) in enumerate(zip(t_values, gaps)):
        r = t - gap
        with torch.no_grad():
            student = _f_by_hand(net, x0[i:i + 1] + t * z[i:i + 1], t)
            x_r = x0[i:i + 1] + r * z[i:i + 1]
            target = x_r if r <= 0.002 else _f_by_hand(net, x_r, r)
        d = math.sqrt(float(((student - target) ** 2).sum()) + c * c) - c
        expected.append(d / gap)
    loss_value = float(loss.detach())
    assert abs(loss_value - sum(expected) / len(expected)) < 1e-5 * max(1.0, abs(loss_value))
    # at t = sigma_min both sides are the boundary value: no signal, and no NaN
    assert math.isfinite(expected[-1])
    loss.backward()
    assert net.w.grad is not None and torch.isfinite(net.w.grad)


def test_first_stage_regresses_small_noise_levels_onto_the_clean_image(digits):
    """At stage 0 with q = 2, r = 0 for t below ~1.5: the target is x0 itself (ECT's diffusion-pretraining limit)."""
    net = _SmallNet()
    method = EasyConsistencyTuning(net, total_steps=800)
    t = torch.tensor([0.01, 0.3, 1.2], dtype=torch.float64)
    assert torch.equal(ect_pair_gap(t, method.stage(0), method.q), t)
    assert (ect_pair_gap(torch.tensor([2.0, 80.0], dtype=torch.float64), 0, 2.0) < torch.tensor([2.0, 80.0])).all()


def test_bad_arguments_are_named():
    net = _SmallNet()
    for kwargs, match in [({"q": 1.0}, "q"), ({"num_stages": 0}, "num_stages"), ({"p_std": 0.0}, "p_std"),
                          ({"grid_size": 1}, "grid_size")]:
        with pytest.raises(ValueError, match=match):
            EasyConsistencyTuning(net, total_steps=10, **kwargs)


def _trained_edm(tmp_path, digits, steps=150):
    from gensample.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    method = EDMTraining(build_unet("tiny", sample_size=8))
    config = TrainConfig(output_dir=str(tmp_path / "edm"), max_steps=steps, batch_size=64, learning_rate=2e-3,
                         lr_schedule="cosine", progress=False, checkpoint_every=0, num_sample_images=4,
                         sample_steps=(2,), seed=0)
    return Trainer(method, digits, config).train()["pipeline"]


def _one_step(pipe, n=256):
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    return pipe(batch_size=n, num_inference_steps=1, generator=generators, output_type="pt").images


def test_tuning_an_edm_denoiser_turns_its_blurry_one_step_output_into_digits(tmp_path, digits):
    """A denoiser called once at sigma_max returns about the data mean (the same blur for every noise); ECT must turn
    it into a one-step generator whose samples differ from each other and sit near real digits."""
    from diffusers import UNet2DModel

    from gensample.metrics.fid import fid
    from gensample.pipelines import ConsistencyPipeline
    from gensample.training.trainer import TrainConfig, Trainer

    edm_dir = _trained_edm(tmp_path, digits)
    unet = UNet2DModel.from_pretrained(f"{edm_dir}/unet")
    method = EasyConsistencyTuning(unet, total_steps=200)
    init = method.build_pipeline({"unet": unet})
    init.set_progress_bar_config(disable=True)
    before = _one_step(init)
    config = TrainConfig(output_dir=str(tmp_path / "ect"), max_steps=200, batch_size=64, learning_rate=1e-3,
                         lr_schedule="cosine", progress=False, checkpoint_every=0, num_sample_images=4,
                         sample_steps=(1,), seed=0)
    summary = Trainer(method, digits, config).train()
    pipe = ConsistencyPipeline.from_pretrained(summary["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    after = _one_step(pipe)
    real = (digits[:1000].flatten(1) + 1) / 2

    def spread(images):  # mean per-pixel std across samples
        return float(images.flatten(1).std(0).mean())

    def score(images):
        return fid(images, "digits", progress=False).fid

    assert spread(after) > 1.5 * spread(before), (spread(before), spread(after), spread(real))
    assert score(after) < 0.6 * score(before), (score(before), score(after))
    run = json.loads((tmp_path / "ect" / "run_config.json").read_text())
    assert run["method"] == "ect" and run["method_config"]["q"] == 2.0
    # the saved pipeline reproduces the trained samples bit for bit
    assert torch.equal(_one_step(pipe, 16), _one_step(pipe, 16))


def test_resume_restores_the_stage_and_is_exact(tmp_path, digits):
    from gensample.training.trainer import TrainConfig, Trainer

    def trainer(out, max_steps):
        torch.manual_seed(0)
        method = EasyConsistencyTuning(build_unet("tiny", sample_size=8, dropout=0.1), total_steps=8, num_stages=4)
        config = TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=16, seed=0, progress=False,
                             checkpoint_every=3, num_sample_images=2, sample_steps=(1,))
        return Trainer(method, digits, config)

    straight = trainer(tmp_path / "a", 8)
    straight.train()
    first = trainer(tmp_path / "b", 5)
    first.train()
    resumed = trainer(tmp_path / "b", 8)
    resumed.train(resume=True)
    for p, q in zip(straight.method.parameters(), resumed.method.parameters()):
        assert torch.equal(p, q)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    stages = {int(e["step"]): e["stage"] for e in log if "stage" in e}
    assert stages and all(stage == ect_stage(step - 1, 8, 4) for step, stage in stages.items())


def test_cli_needs_an_initialisation_and_takes_an_edm_pipeline(tmp_path, digits):
    from gensample.cli import main
    from gensample.pipelines import ConsistencyPipeline

    out = tmp_path / "ect"
    assert main(["train", "ect", "--model", "tiny", "--output", str(out), "--max-steps", "2"]) == 2
    edm_dir = _trained_edm(tmp_path, digits, steps=2)
    assert main(["train", "ect", "--init-from", str(edm_dir), "--dropout", "0.1", "--output", str(out),
                 "--max-steps", "3", "--batch-size", "16", "--checkpoint-every", "0", "--num-sample-images", "4",
                 "--no-progress", "--q", "4"]) == 0
    pipe = ConsistencyPipeline.from_pretrained(out / "pipeline")
    assert pipe.unet.config.dropout == 0.1
    run = json.loads((out / "run_config.json").read_text())
    assert run["method"] == "ect" and run["method_config"]["q"] == 4.0 and run["train"]["extra"]["init_from"]
