"""LCSC (issue #16): the combination against hand-computed values, the EMA and the difference form as special
cases, the evolutionary search on a fitness with a known minimiser, NaN candidates, bit-identical resume, bad input,
and `gensample lcsc` end to end on a tiny iCT run with snapshots."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gensample.lcsc import (
    FIDFitness,
    alpha_to_difference,
    apply_weights,
    check_same_architecture,
    combine,
    component_weights,
    difference_to_alpha,
    ema_coefficients,
    search,
)

REPO = Path(__file__).resolve().parents[1]


def _snaps(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16),
             "count": torch.tensor(10 * (i + 1))} for i in range(n)]


# -- combination ----------------------------------------------------------------------------------------------------

def test_combine_matches_hand_computed_weights():
    snaps = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)},
             {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(2)},
             {"w": torch.tensor([-1.0, 4.0]), "n": torch.tensor(3)}]
    out = combine(snaps, [0.5, 0.25, 0.25])
    # 0.5 [1, 2] + 0.25 [3, 5] + 0.25 [-1, 4] = [0.5 + 0.75 - 0.25, 1 + 1.25 + 1]
    assert out["w"].tolist() == [1.0, 3.25]
    assert out["n"].item() == 3  # integer buffers from the last snapshot
    out = combine(snaps, [2.0, -1.5, 0.5])  # negative and large coefficients are allowed
    assert out["w"].tolist() == [2 - 4.5 - 0.5, 4 - 7.5 + 2]


def test_combine_accumulates_low_precision_tensors_in_float32():
    snaps = _snaps(4)
    alpha = [0.1, -0.3, 0.7, 0.5]
    out = combine(snaps, alpha)
    expected = sum(a * s["b"].float() for a, s in zip(alpha, snaps))
    assert out["b"].dtype == torch.bfloat16 and torch.equal(out["b"], expected.to(torch.bfloat16))


def test_ema_is_the_special_case_alpha_proportional_to_beta_powers():
    snaps, beta = _snaps(5), 0.8
    ema = snaps[0]["w"].clone()  # e_1 = theta_1, e_k = beta e_{k-1} + (1 - beta) theta_k
    for s in snaps[1:]:
        ema = beta * ema + (1 - beta) * s["w"]
    assert torch.allclose(combine(snaps, ema_coefficients(5, beta))["w"], ema, atol=1e-6)
    zero_init = torch.zeros_like(ema)  # Adam-style debiased EMA: zero start, divided by 1 - beta^n
    for s in snaps:
        zero_init = beta * zero_init + (1 - beta) * s["w"]
    alpha = ema_coefficients(5, beta, debiased=True)
    assert torch.allclose(combine(snaps, alpha)["w"], zero_init / (1 - beta ** 5), atol=1e-6)
    assert np.allclose(alpha[:-1] / alpha[1:], beta) and math.isclose(alpha.sum(), 1.0)
    with pytest.raises(ValueError, match="beta"):
        ema_coefficients(5, 1.0)


def test_difference_form_is_a_combination_whose_weights_sum_to_one():
    snaps = _snaps(4)
    a = np.array([0.4, -1.2, 0.3])
    alpha = difference_to_alpha(a)
    assert math.isclose(alpha.sum(), 1.0) and alpha[-1] == pytest.approx(1 - a.sum())
    last = snaps[-1]["w"]
    by_hand = last + sum(float(ai) * (s["w"] - last) for ai, s in zip(a, snaps[:-1]))
    assert torch.allclose(combine(snaps, alpha)["w"], by_hand, atol=1e-6)
    assert np.allclose(alpha_to_difference(alpha), a)
    with pytest.raises(ValueError, match="sum to 1"):
        alpha_to_difference([0.5, 0.6])
    assert torch.equal(combine(snaps, difference_to_alpha(np.zeros(3)))["w"], last)  # a = 0: the last snapshot


# -- bad input ------------------------------------------------------------------------------------------------------

def test_fewer_than_two_snapshots_or_different_architectures_are_refused():
    snaps = _snaps(3)
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        combine(snaps[:1], [1.0])
    wide = dict(snaps[0], w=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="'w'.*\\(3, 3\\)"):
        check_same_architecture([wide, snaps[1], snaps[2]], names=["a.safetensors", "b", "c"])
    missing = {k: v for k, v in snaps[1].items() if k != "b"}
    with pytest.raises(ValueError, match="key 'b' is missing from s1"):
        check_same_architecture([snaps[0], missing, snaps[2]], names=["s0", "s1", "s2"])
    half = dict(snaps[0], w=snaps[0]["w"].half())
    with pytest.raises(ValueError, match="torch.float16"):
        search([half, snaps[1], snaps[2]], lambda w: 0.0, population=2, iterations=0, progress=False)
    with pytest.raises(ValueError, match="one weight per snapshot"):
        combine(snaps, [0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        combine(snaps, [0.5, math.nan, 0.5])


# -- search ---------------------------------------------------------------------------------------------------------

def _coordinate_snapshots(n: int) -> list[dict[str, torch.Tensor]]:
    """theta_i = e_i (i < n), theta_n = 0: then theta_n + sum a_i (theta_i - theta_n) = a, so a fitness of the
    combined weights is a known function of the coefficients."""
    return [{"w": torch.eye(n - 1, dtype=torch.float64)[i]} for i in range(n - 1)] + \
        [{"w": torch.zeros(n - 1, dtype=torch.float64)}]


def _quadratic(a_star):
    """||a - a*||^2 for :func:`_coordinate_snapshots`: minimised at a*."""
    target = torch.as_tensor(a_star, dtype=torch.float64)
    return lambda w: float(((w["w"] - target) ** 2).sum())


def test_search_finds_the_known_minimiser_of_a_quadratic_fitness():
    snaps, a_star = _coordinate_snapshots(5), np.array([0.3, -0.2, 0.5, 0.1])
    result = search(snaps, _quadratic(a_star), population=12, iterations=30, seed=0, progress=False)
    initial = [h for h in result.history if h["generation"] == 0]
    start = min(initial, key=lambda h: h["fitness"])
    assert result.fitness < start["fitness"] / 10
    assert np.linalg.norm(result.coefficients - a_star) < np.linalg.norm(np.asarray(start["a"]) - a_star) / 3
    assert result.fitness == pytest.approx(float(((result.coefficients - a_star) ** 2).sum()))
    assert result.evaluations <= 12 + 30 * 6
    xs, ys = result.best_so_far()
    assert ys == sorted(ys, reverse=True) and ys[-1] == result.fitness


def test_non_finite_candidates_are_skipped_and_never_selected():
    snaps, quadratic = _coordinate_snapshots(4), _quadratic([0.5, 0.5, 0.5])
    fit = lambda w: math.nan if w["w"][0] > 0.2 else quadratic(w)  # noqa: E731  (the optimum lies where it is NaN)
    result = search(snaps, fit, population=8, iterations=5, seed=1, progress=False)
    skipped = [h for h in result.history if h["status"].startswith("skipped")]
    assert skipped and result.skipped == len(skipped) and all(h["fitness"] is None for h in skipped)
    assert all(p["a"][0] <= 0.2 and math.isfinite(p["fitness"]) for p in result.population)
    assert result.coefficients[0] <= 0.2
    with pytest.raises(ValueError, match="non-finite fitness"):
        search(snaps, lambda w: math.inf, population=3, iterations=1, progress=False)


class _Killed(Exception):
    pass


def test_a_killed_search_resumes_bit_identically(tmp_path):
    snaps, fit = _coordinate_snapshots(4), _quadratic([0.2, 0.7, -0.4])
    kwargs = dict(population=6, iterations=4, seed=3, progress=False)
    full = search(snaps, fit, state_path=tmp_path / "full.json", **kwargs)
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    calls = full.evaluations
    # killed inside the first population, at its end, inside a generation, at the last evaluation
    for kill_after in (2, 6, 7, calls - 1):
        path, count = tmp_path / f"killed-{kill_after}.json", [0]

        def dying(w):
            count[0] += 1
            if count[0] > kill_after:
                raise _Killed
            return fit(w)

        with pytest.raises(_Killed):
            search(snaps, dying, state_path=path, **kwargs)
        evaluated = [0]

        def counting(w):
            evaluated[0] += 1
            return fit(w)

        resumed = search(snaps, counting, state_path=path, **kwargs)
        assert evaluated[0] == calls - kill_after  # nothing evaluated twice
        assert strip(resumed.history) == strip(full.history)
        assert np.array_equal(resumed.coefficients, full.coefficients) and resumed.population == full.population
    # a finished search extends to more generations exactly as a longer search runs
    longer = search(snaps, fit, **{**kwargs, "iterations": 6})
    extended = search(snaps, fit, state_path=tmp_path / "full.json", **{**kwargs, "iterations": 6})
    assert strip(extended.history) == strip(longer.history)
    with pytest.raises(ValueError, match="seed: 3 \\(state\\) vs 4"):
        search(snaps, fit, state_path=tmp_path / "full.json", **{**kwargs, "seed": 4})


# -- pipelines ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 'tiny' iCT run of 6 steps with a snapshot every 2 steps (snapshots at 2, 4, 6)."""
    from gensample.cli import main

    out = tmp_path_factory.mktemp("lcsc") / "run"
    assert main(["train", "ict", "--data", "digits", "--model", "tiny", "--max-steps", "6", "--batch-size", "8",
                 "--lr", "1e-2", "--snapshot-every", "2", "--checkpoint-every", "0", "--num-sample-images", "4",
                 "--no-progress", "--output", str(out)]) == 0
    return out


def test_fid_fitness_of_a_diverged_combination_is_nan(tiny_run):
    from gensample.loading import load_pipeline

    pipe = load_pipeline(tiny_run / "pipeline")
    fitness = FIDFitness(pipe, "digits", "digits", steps=(1,), num_images=8, batch_size=8)
    weights = component_weights(pipe)
    assert math.isfinite(fitness(weights))
    weights["unet.conv_out.bias"] = torch.full_like(weights["unet.conv_out.bias"], math.nan)
    assert math.isnan(fitness(weights))
    with pytest.raises(ValueError, match="another architecture"):
        apply_weights(pipe, {"unet.conv_out.bias": torch.zeros(7)})


def test_lcsc_cli_end_to_end_writes_a_pipeline_of_the_combined_weights(tiny_run, tmp_path, capsys):
    from gensample.cli import main
    from gensample.loading import load_pipeline
    from gensample.pipelines import ConsistencyPipeline
    from gensample.training.snapshots import list_snapshots, load_snapshot

    out = tmp_path / "lcsc"
    flags = ["lcsc", str(tiny_run), "--output", str(out), "--population", "4", "--iterations", "1", "--num-images",
             "16", "--eval-num-images", "16", "--eval-seeds", "100", "200", "--batch-size", "16", "--no-progress"]
    assert main(flags) == 0
    printed = capsys.readouterr().out
    assert "LCSC" in printed and "EMA" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["snapshots"]["steps"] == [2, 4, 6] and report["method"] == "ict"
    alpha = [report["coefficients"]["alpha"][str(s)] for s in (2, 4, 6)]
    assert math.isclose(sum(alpha), 1.0)
    # the search starts from the last snapshot (a = 0): its result is never worse on the search's own samples
    assert report["search"]["best_fitness"] <= report["search"]["fitness_last"]
    on_search = report["search"]["fid_on_search_samples"]["lcsc"]  # the written weights give the fitness found
    assert np.mean([on_search["1"], on_search["2"]]) == pytest.approx(report["search"]["best_fitness"], rel=1e-9)
    assert (out / "fitness.png").stat().st_size > 0 and (out / "search_state.json").is_file()
    for name in ("last", "ema", "lcsc"):
        assert len(report["evaluation"]["fid"][name]["1"]["values"]) == 2

    # the written folder is a normal pipeline of the run's type whose weights are sum_i alpha_i theta_i ...
    snapshots = [load_snapshot(p)[0] for _, p in list_snapshots(tiny_run)]
    combined = combine(snapshots, alpha)
    saved = ConsistencyPipeline.from_pretrained(out / "pipeline")
    assert all(torch.equal(saved.unet.state_dict()[k.partition(".")[2]], v) for k, v in combined.items())
    # ... and samples as the run's pipeline does with the combined weights loaded, bit for bit
    reference = load_pipeline(tiny_run / "pipeline")
    apply_weights(reference, combined)
    for pipe in (saved, reference):
        pipe.set_progress_bar_config(disable=True)
    a, b = (p(batch_size=4, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="pt").images
            for p in (saved, reference))
    assert torch.equal(a, b)

    # --resume of the finished search continues nothing and reports the same coefficients; without it: refused
    assert main(flags + ["--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["coefficients"] == report["coefficients"]
    assert main(flags) == 2
    assert "--resume" in capsys.readouterr().err
    # the final table must use other seeds than the search
    assert main(["lcsc", str(tiny_run), "--output", str(tmp_path / "x"), "--num-images", "16", "--eval-seeds", "10",
                 "--no-progress"]) == 2
    assert "overlaps the search" in capsys.readouterr().err


def test_lcsc_cli_refuses_a_run_with_one_snapshot(tiny_run, tmp_path, capsys):
    import shutil

    from gensample.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for p in sorted((run / "snapshots").iterdir())[:-1]:
        p.unlink()
    assert main(["lcsc", str(run), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "at least 2" in capsys.readouterr().err
    # a file in snapshots/ that is not a gensample snapshot is named, never combined
    save_file({"unet.x": torch.zeros(1)}, str(run / "snapshots" / "snapshot-00000001.safetensors"))
    assert main(["lcsc", str(run), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "snapshot-00000001.safetensors is not a gensample snapshot" in capsys.readouterr().err
    assert not (tmp_path / "out" / "pipeline").exists()


def test_lcsc_module_imports_no_cli_and_no_training():
    sys.path.insert(0, str(REPO / "tests"))
    from test_architecture import import_graph

    targets = import_graph()["gensample.lcsc"]
    assert "gensample.metrics.fid" in targets  # the reader sees its imports
    assert not [t for t in targets if t.startswith(("gensample.cli", "gensample.training"))]


@pytest.mark.slow
def test_two_process_lcsc_search_matches_single_process(tiny_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m gensample.cli lcsc`: each process samples half the fitness images, the
    features are gathered, and the search takes the same path as on one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags = ["lcsc", str(tiny_run), "--population", "4", "--iterations", "1", "--num-images", "17",
             "--eval-num-images", "0", "--batch-size", "5", "--no-progress", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "gensample.cli", *flags, "--output", str(tmp_path / "one")], env=env,
                   check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                    "-m", "gensample.cli", *flags, "--output", str(tmp_path / "two")], env=env, check=True,
                   timeout=600)
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["search"]["processes"] == 2 and one["search"]["processes"] == 1
    assert two["coefficients"] == one["coefficients"]
    # the processes' batches hold other images than the single process' (9 + 8 vs 5 + 5 + 5 + 2): float round-off
    assert two["search"]["best_fitness"] == pytest.approx(one["search"]["best_fitness"], rel=1e-6)


def test_run_info_sums_the_legs_of_a_resumed_run(tmp_path):
    """gensample.training.run_info: the wall time is the sum of every leg's "end" record (a run trained in legs),
    the steps those of the last leg; a torn line (a run killed mid-write) is skipped, not fatal."""
    from gensample.training.run_info import run_info

    (tmp_path / "run_config.json").write_text(json.dumps({"method": "ict", "train": {"ema_rate": 0.999,
                                                                                     "extra": {"data": "digits"}}}))
    (tmp_path / "train_log.jsonl").write_text("\n".join([
        json.dumps({"event": "start", "step": 0}), json.dumps({"event": "end", "steps": 100, "seconds": 12.5}),
        '{"event": "end", "steps": 1', json.dumps({"event": "end", "steps": 250, "seconds": 30.0})]) + "\n")
    info = run_info(tmp_path)
    assert info == {"method": "ict", "data": "digits", "ema_rate": 0.999, "training_seconds": 42.5,
                    "training_steps": 250}
    assert run_info(tmp_path / "missing")["training_seconds"] is None
