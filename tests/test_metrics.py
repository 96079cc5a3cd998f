"""gensample.metrics: Fréchet distance, statistics files, extractors, fid(...), the evaluator hook and the CLI."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from gensample.assets import asset_path
from gensample.cli import fid as fid_cli
from gensample.data import load_digits
from gensample.metrics.features import DigitsFeatureExtractor, load_digits_classifier, to_uint8
from gensample.metrics.fid import (
    FeatureStats,
    FIDEvaluator,
    PrecomputedFeatures,
    compute_metrics,
    digits_images,
    feature_statistics,
    fid,
    file_sha256,
    frechet_distance,
    gaussian_pixel_samples,
)
from gensample.metrics.inception import FID_WEIGHTS_NAME, FIDInceptionV3, load_fid_inception

pytestmark = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
REPO = Path(__file__).resolve().parents[1]


def direct_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID from the formula, via the symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2) = Tr((S1 S2)^1/2)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = scipy.linalg.sqrtm(s1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real))


def shift_images(x: torch.Tensor, k: int) -> torch.Tensor:
    """Translate right by k pixels, filling with background (0)."""
    if k == 0:
        return x.clone()
    out = torch.zeros_like(x)
    out[..., k:] = x[..., :-k]
    return out


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: these small ops are latency-bound, and with 2 threads on a busy 2-core machine OpenMP
    waits dominate (measured: 83 s vs 12 s for this file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractor() -> DigitsFeatureExtractor:
    return DigitsFeatureExtractor()


@pytest.fixture(scope="module")
def digits_evaluator(extractor) -> FIDEvaluator:
    ev = FIDEvaluator("digits", extractor, num_images=64, steps=(1, 2), batch_size=32, kid_subsets=20)
    _ = ev.reference_stats
    return ev


@pytest.fixture(scope="module")
def floor(digits_evaluator) -> float:
    return digits_evaluator.evaluate(digits_images("heldout")).fid


@pytest.fixture(scope="module")
def tiny_pipeline():
    from diffusers import UNet2DModel
    from gensample.pipelines import ConsistencyPipeline

    from gensample.schedulers import ConsistencyScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    pipe = ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- Fréchet distance ---------------------------------------------------------------------------------------------


def test_frechet_distance_matches_formula_and_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 12, generator=g, dtype=torch.float64)
    b = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    b = b * 0.5 + 0.3
    expected = direct_fid(a.numpy(), b.numpy())
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(expected, rel=1e-4)

    tm = FrechetInceptionDistance(feature=PrecomputedFeatures(12))
    tm.update(a, real=True)
    tm.update(b, real=False)
    assert float(tm.compute()) == pytest.approx(expected, rel=1e-4)
    # our pipeline into torchmetrics: the real state is rebuilt from (mu, sigma) of a stats object
    m = compute_metrics(b, FeatureStats.from_features(a, "test"), kid_subsets=5, kid_subset_size=100)
    assert m["fid"] == pytest.approx(expected, rel=1e-4)
    assert m["fid_scipy"] == pytest.approx(expected, rel=1e-4)
    assert m["kid_mean"] > 0


def test_fid_of_set_with_itself_is_zero_and_mean_shift_adds_its_norm():
    f = torch.randn(300, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = FeatureStats.from_features(f, "test")
    assert abs(compute_metrics(f, stats, kid_subsets=5)["fid"]) < 1e-6
    previous = 0.0
    for size in (0.5, 1.0, 2.0):
        delta = torch.full((8,), size, dtype=torch.float64)
        value = compute_metrics(f + delta, stats, kid_subsets=5)["fid"]
        assert value == pytest.approx(float(delta @ delta), rel=1e-6)  # FID = ||delta||^2 for a pure shift
        assert value > previous
        previous = value


def test_fid_digits_grows_with_image_shift(digits_evaluator):
    real = digits_images("heldout")
    ev = FIDEvaluator(real, digits_evaluator.extractor, kid_subsets=5)
    values = [ev.evaluate(shift_images(real, k)).fid for k in range(4)]
    assert abs(values[0]) < 1e-3
    assert all(b > a for a, b in itertools.pairwise(values)), values


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- statistics files -----------------------------------------------------------------------------------------


def test_stats_file_round_trip(tmp_path):
    f = torch.randn(50, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    stats = FeatureStats.from_features(f, "digits", "unit test")
    digest = stats.save(tmp_path / "a.npz")
    assert digest == file_sha256(tmp_path / "a.npz") == stats.sha256()
    assert stats.save(tmp_path / "b.npz") == digest  # deterministic bytes
    loaded = FeatureStats.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, f.numpy().astype(np.float32))
    assert (loaded.num_images, loaded.dims, loaded.extractor, loaded.source) == (50, 6, "digits", "unit test")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:  # readable by pytorch-fid / EDM style loaders
        np.testing.assert_allclose(data["mu"], f.numpy().mean(0), rtol=1e-12)
        np.testing.assert_allclose(data["sigma"], np.cov(f.numpy(), rowvar=False), rtol=1e-12)
    np.savez(tmp_path / "plain.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid --save-stats layout
    plain = FeatureStats.load(tmp_path / "plain.npz")
    assert plain.extractor == "unknown" and plain.features is None and plain.dims == 6


def test_mismatched_dimensions_and_bad_ranges_raise(tmp_path, digits_evaluator):
    FeatureStats.from_features(torch.randn(40, 32), "other").save(tmp_path / "s32.npz")
    with pytest.raises(ValueError, match="32-d features.*fid-stats"):
        fid(digits_images("heldout"), reference=tmp_path / "s32.npz", progress=False)
    FeatureStats.from_features(torch.randn(40, 64), "inception").save(tmp_path / "s64.npz")
    with pytest.raises(ValueError, match="'inception' extractor"):
        fid(digits_images("heldout"), reference=tmp_path / "s64.npz", progress=False)
    x = load_digits("heldout")  # model space [-1, 1]
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\(x \+ 1\) / 2"):
        digits_evaluator.evaluate(x)
    with pytest.raises(ValueError, match="divide by 255"):
        digits_evaluator.evaluate(digits_images("heldout").float())
    with pytest.raises(ValueError, match="feature must be one of"):
        fid(digits_images("heldout"), feature="vgg")


# --- extractors -------------------------------------------------------------------------------------------------


def test_shipped_digits_classifier_heldout_accuracy():
    meta = json.loads(asset_path("digits_classifier.json").read_text())
    model = load_digits_classifier()
    x, y = load_digits("heldout", return_labels=True)
    x = to_uint8((x + 1) / 2).float() / 127.5 - 1  # the 8-bit inputs the extractor sees
    acc = (model(x).argmax(1) == y).double().mean().item()
    assert acc >= 0.97
    assert abs(acc - meta["heldout_accuracy"]) <= 1 / len(y) + 1e-12
    assert meta["seed"] == 0 and "train_digits_classifier.py" in meta["command"]
    # RGB and other resolutions are converted inside the module
    assert torch.allclose(model(x.repeat(1, 3, 1, 1)), model(x), atol=1e-5)
    x16, _ = load_digits("heldout", resolution=16, return_labels=True)
    assert (model(x16).argmax(1) == y).double().mean().item() >= 0.95


def test_digits_extractor_works_as_torchmetrics_feature(extractor, digits_evaluator):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = digits_images("train")[:400], digits_images("heldout")
    tm = FrechetInceptionDistance(feature=extractor)  # num_features attribute: no probing
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours = FIDEvaluator(real, extractor, kid_subsets=5).evaluate(fake).fid
    assert float(tm.compute()) == pytest.approx(ours, rel=1e-5)
    # float [0, 1] input is rounded to the same uint8 grid
    assert torch.equal(extractor(fake.float() / 255), extractor(fake))


def test_inception_state_dict_names_strict_load_and_output(tmp_path, monkeypatch):
    model = FIDInceptionV3()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    public = {  # names and shapes of pt_inception-2015-12-05-6726825d.pth
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3), "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.bn.running_var": (192,),
        "fc.weight": (1008, 2048), "fc.bias": (1008,),
    }
    for key, shape in public.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("AuxLogits") for k in shapes)
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and the 1000-way fc,
    # plus the 1008-way fc: 23,850,960
    assert sum(p.numel() for p in model.parameters()) == 23_850_960

    torch.manual_seed(3)
    for module in model.modules():  # variance-preserving init, so that features depend on the input
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.01)
        elif name.endswith("running_var"):
            buf.uniform_(0.9, 1.1)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / FID_WEIGHTS_NAME
    torch.save(state, path)
    with pytest.warns(UserWarning, match="not comparable"):  # not the public file's sha256
        loaded = load_fid_inception(path)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # lookup order: env var, then the torch hub cache; a clear error when absent
    monkeypatch.setenv("GENSAMPLE_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="never downloads") as excinfo:
        load_fid_inception()
    message = str(excinfo.value)
    for needed in (FID_WEIGHTS_NAME, "GENSAMPLE_INCEPTION_WEIGHTS", "--inception-weights", "pytorch-fid"):
        assert needed in message
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.replace(path, tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_NAME)
    with pytest.warns(UserWarning):
        assert torch.equal(load_fid_inception().fc.weight, state["fc.weight"])
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_fid_inception(tmp_path / "extra.pth")

    # the FID patches: TF-style average pool (padding not counted) in A/C/E_1, max pool in Mixed_7c
    ones = torch.ones(1, 192, 5, 5)
    assert torch.equal(loaded.Mixed_5b.pool(ones), ones)
    assert torch.equal(loaded.Mixed_6b.pool(ones[:, :1].expand(1, 768, 5, 5)), torch.ones(1, 768, 5, 5))
    z = torch.randn(1, 2048, 4, 4)
    assert torch.equal(loaded.Mixed_7c.pool(z), torch.nn.functional.max_pool2d(z, 3, 1, 1))
    assert torch.allclose(loaded.Mixed_7b.pool(z[:, :1280]),
                          torch.nn.functional.avg_pool2d(z[:, :1280], 3, 1, 1, count_include_pad=False))

    # preprocessing: [0, 1] floats are rounded to uint8 first; output pool3 (N, 2048)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    x = (u8.float() - 0.3).clamp(min=0) / 255  # rounds (not truncates) back to u8
    assert torch.equal(FIDInceptionV3.preprocess(x), FIDInceptionV3.preprocess(u8))
    same = torch.rand(1, 3, 299, 299).mul(255).round().div(255)
    assert torch.allclose(FIDInceptionV3.preprocess(same), same * 2 - 1, atol=1e-6)  # 299 in: no resampling
    gray = u8[:, :1]
    assert torch.equal(FIDInceptionV3.preprocess(gray), FIDInceptionV3.preprocess(gray.expand(-1, 3, -1, -1)))
    feats = loaded(u8)  # 2 images: the full network is slow on a CPU
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    assert (feats[0] - feats[1]).norm() > 0.01 * feats[0].norm()  # the features see the image


# --- fid(...) on pipelines, the evaluator hook, baselines ---------------------------------------------------------


def test_fid_of_tiny_pipeline(tiny_pipeline, digits_evaluator, floor):
    r1 = fid(tiny_pipeline, "digits", num_images=64, num_inference_steps=1, batch_size=32, seed=0, progress=False)
    r2 = fid(tiny_pipeline, "digits", num_images=64, num_inference_steps=1, batch_size=32, seed=0, progress=False)
    assert np.isfinite([r1.fid, r1.kid_mean, r1.kid_std]).all()
    assert (r1.fid, r1.kid_mean, r1.kid_std) == (r2.fid, r2.kid_mean, r2.kid_std)
    assert r1.fid > floor > 0
    assert r1.fid == pytest.approx(r1.protocol["fid_scipy"], rel=1e-4)
    p = r1.protocol
    assert (p["extractor"], p["n_real"], p["n_gen"], p["num_inference_steps"]) == ("digits", 1500, 64, 1)
    assert p["reference"] == "digits:train" and p["seeds"].startswith("0..63")
    # per-image seeds: the batch size does not matter, the seed does
    ev = digits_evaluator
    assert ev.evaluate(tiny_pipeline, 64, 1).fid == r1.fid
    ev.batch_size = 16
    try:
        assert ev.evaluate(tiny_pipeline, 64, 1).fid == r1.fid
    finally:
        ev.batch_size = 32
    r3 = fid(tiny_pipeline, "digits", num_images=64, seed=1, batch_size=32, progress=False)
    assert r3.fid != r1.fid


def test_evaluator_hook_matches_fid_and_restores_pipeline(tiny_pipeline, digits_evaluator):
    tiny_pipeline.unet.train()
    logs = digits_evaluator(tiny_pipeline)
    assert set(logs) == {"fid_1step", "kid_1step", "fid_2step", "kid_2step"}
    assert tiny_pipeline.unet.training and tiny_pipeline._progress_bar_config == {"disable": True}
    tiny_pipeline.unet.eval()
    assert logs["fid_2step"] == digits_evaluator.evaluate(tiny_pipeline, 64, 2).fid
    assert logs["fid_1step"] != logs["fid_2step"]
    assert digits_evaluator.reference_stats is digits_evaluator.reference_stats  # cached


def test_gaussian_baseline_is_worse_than_floor(digits_evaluator, floor):
    samples = gaussian_pixel_samples(297, seed=0)
    assert samples.min() >= 0 and samples.max() <= 1
    train = load_digits("train").reshape(-1, 64)
    assert torch.allclose(samples.reshape(-1, 64).mean(0) * 2 - 1, train.mean(0), atol=0.15)
    assert digits_evaluator.evaluate(samples).fid > 5 * floor


# --- CLI ----------------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gensample")
    fid_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_fid_stats_then_fid_on_folder_and_pipeline(tmp_path, capsys, tiny_pipeline, extractor):
    assert _cli(["fid-stats", "--data", "digits:heldout", "--output", str(tmp_path / "h.npz"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert file_sha256(tmp_path / "h.npz") in out and "297 images" in out

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(digits_images("heldout")[:, 0].numpy()):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    assert _cli(["fid", "--images", str(folder), "--reference", str(tmp_path / "h.npz"), "--no-progress",
                 "--output-json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())[0]
    assert abs(result["fid"]) < 1e-3  # the same images, losslessly through PNG
    assert result["protocol"]["stats_sha256"] == file_sha256(tmp_path / "h.npz")
    assert "FID-digits" in out and file_sha256(tmp_path / "h.npz") in out

    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    assert _cli(["fid", str(tmp_path / "pipe"), "--data", "digits", "--num-images", "32", "--num-inference-steps",
                 "1", "2", "--batch-size", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1-step FID-digits" in out and "2-step FID-digits" in out and "n_gen: 32" in out
    assert _cli(["fid-stats", "--data", "digits", "--output", str(tmp_path / "t.npz"), "--no-progress"]) == 0
    assert f"stats_sha256: {file_sha256(tmp_path / 't.npz')}" in out  # printed hash = the file fid-stats writes
    # fid-stats marked its copy of the cached digits statistics with the file, not the cache
    assert FIDEvaluator("digits", extractor).evaluate(digits_images("heldout")).protocol["stats_file"] is None
    with pytest.raises(SystemExit):
        _cli(["fid", str(tmp_path / "pipe"), "--images", str(folder)])


@pytest.mark.slow
def test_two_process_evaluation_matches_single_process(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    base = [str(REPO / "scripts" / "evaluate_fid.py"), str(tmp_path / "pipe"), "--num-images", "101",
            "--batch-size", "16", "--no-progress"]
    subprocess.run([sys.executable, *base, "--output-json", str(tmp_path / "one.json")], check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *base,
                    "--output-json", str(tmp_path / "two.json")], check=True)
    one, two = (json.loads((tmp_path / f).read_text())[0] for f in ("one.json", "two.json"))
    assert two["protocol"]["processes"] == 2
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-9) and two["kid_mean"] == pytest.approx(one["kid_mean"])


def test_digits_reference_at_another_resolution_goes_through_the_same_resize():
    from gensample.data.digits import load_digits
    from gensample.metrics.fid import fid, parse_digits_reference

    assert parse_digits_reference("digits") == ("train", 8)
    assert parse_digits_reference("digits:heldout@32") == ("heldout", 32)
    with pytest.raises(ValueError, match="resolution"):
        parse_digits_reference("digits@big")
    train32 = (load_digits("train", resolution=32) + 1) / 2
    assert abs(fid(train32, "digits@32", progress=False).fid) < 1e-6
    # against the 8-px reference the same real digits look far off: the resampling blur, not the data
    assert fid(train32, "digits", progress=False).fid > 100


def test_fid_seeds_specs_and_reference_follow_the_images():
    """scripts/fid_seeds.py: ':name=value' pipeline arguments reach the pipeline, and 32-px images are scored against
    digits@32 (real 32-px digits score ~0 there, > 100 against the 8-px reference)."""
    import importlib.util
    from types import SimpleNamespace

    from gensample.data.digits import load_digits

    spec = importlib.util.spec_from_file_location("fid_seeds", REPO / "scripts" / "fid_seeds.py")
    fid_seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid_seeds)
    assert fid_seeds.parse_spec("2") == {"num_inference_steps": 2}
    assert fid_seeds.parse_spec("80,1.2:gamma=0.5") == {"sigmas": [80.0, 1.2], "gamma": 0.5}
    for bad in ("2:gamma", "2:gamma=high", "0"):
        with pytest.raises(SystemExit):
            fid_seeds.parse_spec(bad)

    train32 = (load_digits("train", resolution=32) + 1) / 2
    calls = []

    def pipe(batch_size, generator, output_type, **kwargs):
        calls.append(kwargs)
        first = generator[0].initial_seed()  # image i comes from seed first_seed + i
        return SimpleNamespace(images=train32[first:first + batch_size])

    assert fid_seeds.score(pipe, "1:gamma=0.25", 0, len(train32), batch_size=500) < 1e-6
    assert calls and all(c == {"num_inference_steps": 1, "gamma": 0.25} for c in calls)
    assert fid_seeds.score(pipe, "1", 0, len(train32), reference="digits") > 100
