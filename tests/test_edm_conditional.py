"""Class-conditional EDM with classifier-free guidance, labelled batches in the Trainer, and weight snapshots (LCSC).

Checked against direct computations: the guided output against two plain UNet calls combined by the CFG formula
(Ho & Salimans 2022, eq. 6), the label-dropout rate against its probability, snapshot tensors against the model's
own weights at that step (snapshots are the raw weights, not the EMA), and resume-exactness with labels."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gensample.core.parametrization import EDMDenoiser
from gensample.methods.edm import EDMTraining
from gensample.models import build_unet
from gensample.pipelines.pipeline_edm import EDMPipeline
from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler
from gensample.training import snapshots
from gensample.training.trainer import BatchSampler, TrainConfig, Trainer

K = 10


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cond_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet("tiny", sample_size=8, num_class_embeds=K + 1)


def labelled_digits():
    from gensample.data.digits import load_digits

    return load_digits("train", 8, return_labels=True)


def test_guided_pipeline_equals_cfg_formula_on_two_unet_calls():
    unet = cond_unet().eval()
    with torch.no_grad():  # make the class embedding matter
        unet.class_embedding.weight.normal_(0, 1.0)
    pipe = EDMPipeline(unet=unet, scheduler=EDMHeunScheduler(), num_classes=K)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([3, 7])
    w = 2.5
    seen = []

    def capture(p, i, t, kw):
        seen.append(kw["latents"].clone())
        return {}

    out = pipe(batch_size=2, num_inference_steps=2, class_labels=labels, guidance_scale=w, output_type="latent",
               generator=torch.Generator().manual_seed(0), callback_on_step_end=capture).images
    # the same Heun run by hand, each denoiser evaluation D_w = D_null + w (D_c - D_null)
    den = EDMDenoiser(unet)
    sched = EDMHeunScheduler()
    sched.set_timesteps(2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    null = torch.full_like(labels, K)

    def d_w(x, sigma):
        s = torch.full((2,), float(sigma), dtype=torch.float64)
        with torch.no_grad():
            dc, dn = den(x, s, class_labels=labels), den(x, s, class_labels=null)
        return dn + w * (dc - dn)

    sig = sched.sigmas
    for i in range(len(sig) - 1):
        d = (x - d_w(x, sig[i])) / sig[i]
        x_next = x + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] > 0:
            d2 = (x_next - d_w(x_next, sig[i + 1])) / sig[i + 1]
            x_next = x + (sig[i + 1] - sig[i]) * (d + d2) / 2
        x = x_next
    # float32 at sigma = 80, batched (c, null) vs separate calls: agreement to ~1e-3 of values of order 10
    torch.testing.assert_close(out, x.to(out.dtype), rtol=1e-3, atol=5e-3)
    # guidance changes the result far beyond that tolerance (else the test would pass vacuously)
    plain = pipe(batch_size=2, num_inference_steps=2, class_labels=labels, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    assert (plain - out).abs().max() > 0.5, (plain - out).abs().max()


def test_random_labels_never_draw_the_null_label_and_bad_guidance_is_refused():
    pipe = EDMPipeline(unet=cond_unet().eval(), scheduler=EDMHeunScheduler(), num_classes=K)
    labels = pipe.prepare_class_labels(4000, None, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert labels.max() == K - 1 and labels.min() == 0
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(batch_size=1, num_inference_steps=1, guidance_scale=-1.0)
    plain = EDMPipeline(unet=build_unet("tiny", sample_size=8), scheduler=EDMHeunScheduler())
    with pytest.raises(ValueError, match="null label"):
        plain(batch_size=1, num_inference_steps=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_class_embeds=11"):
        EDMPipeline(unet=build_unet("tiny", sample_size=8), scheduler=EDMHeunScheduler(), num_classes=K)


def test_label_dropout_rate_and_null_label():
    method = EDMTraining(cond_unet(), num_classes=K, label_dropout=0.25)
    torch.manual_seed(0)
    labels = torch.randint(0, K, (20000,))
    out = method.training_labels(labels)
    dropped = out == K
    assert abs(dropped.float().mean().item() - 0.25) < 0.015
    assert torch.equal(out[~dropped], labels[~dropped])
    with pytest.raises(ValueError, match="num_class_embeds=11"):
        EDMTraining(build_unet("tiny", sample_size=8), num_classes=K)
    with pytest.raises(ValueError, match="label_dropout"):
        EDMTraining(cond_unet(), num_classes=K, label_dropout=1.0)
    with pytest.raises(ValueError, match="labelled batches"):
        method(torch.zeros(2, 1, 8, 8), 0)


def test_batch_sampler_returns_matching_labels():
    x, y = labelled_digits()
    sampler = BatchSampler(x, 16, seed=0, labels=y)
    for _ in range(3):
        xb, yb = sampler.next()
        # each image's label is the label stored with that image
        idx = [int((x == img).flatten(1).all(1).nonzero()[0]) for img in xb]
        assert torch.equal(yb, y[idx])
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        BatchSampler(x, 16, seed=0, labels=y[:-1])


def _trainer(out, x, y, max_steps, **cfg):
    torch.manual_seed(0)
    method = EDMTraining(cond_unet(), num_classes=K, label_dropout=0.1)
    config = TrainConfig(output_dir=str(out), max_steps=max_steps, batch_size=8, learning_rate=1e-3,
                         checkpoint_every=0, num_sample_images=4, sample_steps=(2,), progress=False, **cfg)
    return Trainer(method, x, config, labels=y)


def test_conditional_training_resumes_exactly_and_snapshots_raw_weights(tmp_path):
    x, y = labelled_digits()
    straight = _trainer(tmp_path / "a", x, y, 6, snapshot_every=2)
    straight.train()
    listed = snapshots.list_snapshots(tmp_path / "a")
    assert [s for s, _ in listed] == [2, 4, 6]
    tensors, meta = snapshots.load_snapshot(listed[-1][1])
    assert meta == {"format": "gensample-snapshot", "step": "6", "method": "edm"}
    raw = straight.method.model.backbone.state_dict()
    assert tensors.keys() == {f"unet.{k}" for k in raw}
    assert all(torch.equal(tensors[f"unet.{k}"], v) for k, v in raw.items())
    ema = straight.emas["unet"].model.state_dict()
    assert any(not torch.equal(tensors[f"unet.{k}"], v) for k, v in ema.items())  # raw weights, not the EMA
    # 3 steps, stop, resume to 6 == 6 straight, with labelled batches
    _trainer(tmp_path / "b", x, y, 3, snapshot_every=2).train()
    _trainer(tmp_path / "b", x, y, 6, snapshot_every=2).train(resume=True)
    a = load_file(tmp_path / "a/checkpoints/checkpoint-00000006/networks.safetensors")
    b = load_file(tmp_path / "b/checkpoints/checkpoint-00000006/networks.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in snapshots.list_snapshots(tmp_path / "b")] == [2, 3, 4, 6]
    record = json.loads((tmp_path / "a/checkpoints/checkpoint-00000006/trainer_state.json").read_text())
    assert "labels" in record["run_definition"]["data"]
    # a fresh run in the same folder moves the old snapshots aside instead of mixing them in
    _trainer(tmp_path / "b", x, y, 2, snapshot_every=2).train()
    assert [s for s, _ in snapshots.list_snapshots(tmp_path / "b")] == [2]
    assert len(list((tmp_path / "b/snapshots").glob("*.superseded-*"))) == 4


def test_foreign_or_corrupt_snapshot_is_named(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "snapshot-00000001.safetensors")
    with pytest.raises(ValueError, match="not a gensample snapshot"):
        snapshots.load_snapshot(tmp_path / "snapshot-00000001.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        snapshots.load_snapshot(tmp_path / "bad.safetensors")
