"""ConsistencyPipeline end to end with a tiny random UNet: outputs, determinism, save/load, load_pipeline, callbacks,
generators, input validation and class conditioning."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ImagePipelineOutput, UNet2DModel

import gensample
from gensample.models import build_unet
from gensample.pipelines import ConsistencyPipeline
from gensample.schedulers import ConsistencyScheduler


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: one intra-op thread is faster and immune to CPU contention from other jobs; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return build_unet("tiny", sample_size=8, **overrides).eval()


def make_pipe(seed: int = 0, **unet_overrides) -> ConsistencyPipeline:
    pipe = ConsistencyPipeline(unet=tiny_unet(seed, **unet_overrides), scheduler=ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe() -> ConsistencyPipeline:
    return make_pipe()


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# output types
# --------------------------------------------------------------------------------------------------------------------
def test_output_types_agree(pipe):
    pt = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pt")
    assert isinstance(pt, ImagePipelineOutput)
    pt = pt.images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1, 8, 8) and pt.dtype == torch.float32
    assert pt.min() >= 0 and pt.max() <= 1
    assert pt.std() > 0.01  # not a constant image

    npy = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="np").images
    assert isinstance(npy, np.ndarray) and npy.shape == (2, 8, 8, 1) and npy.dtype == np.float32
    assert npy.min() >= 0 and npy.max() <= 1
    np.testing.assert_array_equal(npy, pt.permute(0, 2, 3, 1).numpy())  # NHWC view of the same images

    pil = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pil").images
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) and im.mode == "L" for im in pil)
    expected = (npy[..., 0] * 255).round().astype(np.uint8)
    for im, ref in zip(pil, expected):
        np.testing.assert_array_equal(np.asarray(im), ref)


def test_rgb_pil_mode():
    pipe = make_pipe(in_channels=3)
    ims = pipe(batch_size=1, generator=gen(0)).images
    assert ims[0].mode == "RGB" and ims[0].size == (8, 8)


def test_bad_output_type(pipe):
    with pytest.raises(ValueError, match="`output_type` must be 'pil', 'np', 'pt' or 'latent', got 'jpg'"):
        pipe(output_type="jpg")


def test_return_dict_false(pipe):
    out = pipe(batch_size=2, num_inference_steps=2, generator=gen(3), output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    ref = pipe(batch_size=2, num_inference_steps=2, generator=gen(3), output_type="pt").images
    assert torch.equal(out[0], ref)


def test_pipeline_matches_hand_written_algorithm_1(pipe):
    """One-step output = (clamp(c_skip(80) 80 z + c_out(80) F(c_in(80) 80 z, 250 ln 80)) + 1) / 2."""
    z = torch.randn(2, 1, 8, 8, generator=gen(4))
    out = pipe(batch_size=2, latents=z, output_type="pt").images
    with torch.no_grad():
        x = 80.0 * z
        F = pipe.unet(0.012500 * x, torch.full((2,), 1095.5067)).sample
        ref = ((0.000039 * x + 0.499978 * F).clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
    # c_skip(80) = 3.9e-5 is rounded in the table (6 decimals): 80 * |z| * 5e-7 < 1e-4
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_same_seed_identical_different_seed_different(pipe, steps):
    a = pipe(batch_size=2, num_inference_steps=steps, generator=gen(10), output_type="pt").images
    b = pipe(batch_size=2, num_inference_steps=steps, generator=gen(10), output_type="pt").images
    c = pipe(batch_size=2, num_inference_steps=steps, generator=gen(11), output_type="pt").images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    # and the two images of the batch differ from each other
    assert not torch.allclose(a[0], a[1], atol=1e-3)


def test_steps_timesteps_sigmas_are_consistent(pipe):
    """timesteps=[0, 20] and sigmas=[80, sigma(20/39)] are the schedule num_inference_steps=2 picks; [0, 22] is not."""
    z = torch.randn(2, 1, 8, 8, generator=gen(0))
    a = pipe(batch_size=2, num_inference_steps=2, latents=z, generator=gen(1), output_type="pt").images
    b = pipe(batch_size=2, timesteps=[20, 0], latents=z, generator=gen(1), output_type="pt").images
    # sigma(20/39) = 2.2404 (ctm-scott-nct-lcsc-video.md §6.1)
    c = pipe(batch_size=2, sigmas=[80.0, 2.2404], latents=z, generator=gen(1), output_type="pt").images
    d = pipe(batch_size=2, timesteps=[0, 22], latents=z, generator=gen(1), output_type="pt").images
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-3)
    assert (a - d).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2])
def test_save_load_reproduces_bit_for_bit(pipe, saved_pipe, monkeypatch, steps):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ConsistencyPipeline.from_pretrained(saved_pipe)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, ConsistencyScheduler)
    assert isinstance(loaded.unet, UNet2DModel)
    a = pipe(batch_size=3, num_inference_steps=steps, generator=gen(21), output_type="pt").images
    b = loaded(batch_size=3, num_inference_steps=steps, generator=gen(21), output_type="pt").images
    assert torch.equal(a, b)
    # a differently initialised UNet does not reproduce them (the weights were really saved and loaded)
    other = make_pipe(seed=1)(batch_size=3, num_inference_steps=steps, generator=gen(21), output_type="pt").images
    assert not torch.allclose(a, other, atol=1e-3)


def test_saved_model_index_records_gensample_classes(saved_pipe):
    index = json.loads((saved_pipe / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyPipeline"
    assert index["scheduler"][1] == "ConsistencyScheduler"
    assert index["unet"] == ["diffusers", "UNet2DModel"]


def test_load_pipeline_returns_consistency_pipeline(pipe, saved_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = gensample.load_pipeline(saved_pipe)
    assert type(loaded) is ConsistencyPipeline
    loaded.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_inference_steps=2, generator=gen(2), output_type="pt").images
    b = loaded(batch_size=2, num_inference_steps=2, generator=gen(2), output_type="pt").images
    assert torch.equal(a, b)
    assert type(gensample.load_pipeline(str(saved_pipe))) is ConsistencyPipeline  # str paths too


def test_load_pipeline_errors(tmp_path, saved_pipe):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a saved pipeline \(no model_index.json\)"):
        gensample.load_pipeline(empty)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        gensample.load_pipeline(tmp_path / "does-not-exist")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_index.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match="corrupt or not a diffusers model index"):
        gensample.load_pipeline(corrupt)
    no_class = tmp_path / "no_class"
    no_class.mkdir()
    (no_class / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ValueError, match="corrupt or not a diffusers model index"):
        gensample.load_pipeline(no_class)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    index = json.loads((saved_pipe / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"holds a 'StableDiffusionPipeline', not a gensample pipeline.*"
                                         r"ConsistencyPipeline"):
        gensample.load_pipeline(foreign)


def test_from_pretrained_in_fresh_process(pipe, saved_pipe):
    """A new interpreter (nothing imported or registered yet) loads the folder offline and samples the same pixels."""
    expected = pipe(batch_size=2, num_inference_steps=2, generator=gen(5), output_type="np").images.astype(
        np.float64).sum()
    code = (
        "import sys, torch, numpy as np\n"
        "torch.set_num_threads(1)\n"
        "from gensample.pipelines import ConsistencyPipeline\n"
        "p = ConsistencyPipeline.from_pretrained(sys.argv[1])\n"
        "p.set_progress_bar_config(disable=True)\n"
        "im = p(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type='np')\n"
        "print('SUM=%.10f' % im.images.astype(np.float64).sum())\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code, str(saved_pipe)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("SUM=")]
    assert line, res.stdout
    assert float(line[-1][4:]) == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------------------------------
def test_callback_called_once_per_step_with_latents(pipe):
    calls = []

    def cb(p, i, t, kwargs):
        assert p is pipe
        calls.append((i, float(t), kwargs["latents"].clone(), kwargs["denoised"].clone()))
        return {}

    out = pipe(batch_size=2, num_inference_steps=3, generator=gen(0), output_type="pt", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    assert [c[0] for c in calls] == [0, 1, 2]
    torch.testing.assert_close(torch.tensor([c[1] for c in calls]), pipe.scheduler.timesteps)
    assert all(c[2].shape == (2, 1, 8, 8) for c in calls)
    # after the last step the latents are the final clean estimate, which is what the pipeline decodes
    assert torch.equal(calls[-1][2], calls[-1][3])
    assert torch.equal(out, (calls[-1][2] / 2 + 0.5).clamp(0, 1))
    # intermediate latents are re-noised (larger spread than the clean estimate)
    assert calls[0][2].std() > 2 * calls[0][3].std()


def test_callback_can_replace_latents(pipe):
    def zero_after_first(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 0 else {}

    plain = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pt").images
    a = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="pt",
             callback_on_step_end=zero_after_first).images
    b = pipe(batch_size=2, num_inference_steps=2, generator=gen(99), output_type="pt",
             callback_on_step_end=zero_after_first).images
    assert (a - plain).abs().max() > 1e-3
    # after zeroing, the second step sees x = 0 and draws no noise: the result no longer depends on the seed
    assert torch.equal(a, b)
    with torch.no_grad():
        sigma1 = pipe.scheduler.sigmas[1].item()
        F = pipe.unet(torch.zeros(2, 1, 8, 8), pipe.scheduler.timesteps[1]).sample
        c_out = (sigma1 - 0.002) * 0.5 / (sigma1**2 + 0.25) ** 0.5
        ref = ((c_out * F).clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-5)


def test_callback_bad_tensor_inputs(pipe):
    with pytest.raises(ValueError, match=r"\['noise'\] not in"):
        pipe(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])


# --------------------------------------------------------------------------------------------------------------------
# generators, latents and argument validation
# --------------------------------------------------------------------------------------------------------------------
def test_generator_list_gives_per_image_reproducibility(pipe):
    batch = pipe(batch_size=2, num_inference_steps=2, generator=[gen(1), gen(2)], output_type="pt").images
    one = pipe(batch_size=1, num_inference_steps=2, generator=gen(1), output_type="pt").images
    two = pipe(batch_size=1, num_inference_steps=2, generator=gen(2), output_type="pt").images
    torch.testing.assert_close(batch[:1], one, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1:], two, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_generator_list_length_mismatch(pipe):
    with pytest.raises(ValueError, match="list of 3 generators for batch_size 2"):
        pipe(batch_size=2, generator=[gen(0), gen(1), gen(2)])


def test_latents_are_used(pipe):
    z = torch.randn(2, 1, 8, 8, generator=gen(7))
    a = pipe(batch_size=2, latents=z, output_type="pt").images
    b = pipe(batch_size=2, latents=z.clone(), output_type="pt").images
    c = pipe(batch_size=2, latents=-z, output_type="pt").images
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # drawing the latents from a generator equals passing that draw
    d = pipe(batch_size=2, generator=gen(7), output_type="pt").images
    assert torch.equal(a, d)


def test_wrong_latents_shape_names_expected_shape(pipe):
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\) but this model expects \(2, 1, 8, 8\)"):
        pipe(batch_size=2, latents=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expects \(1, 1, 8, 8\)"):
        pipe(batch_size=1, latents=torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize("steps", [0, -1])
def test_num_inference_steps_must_be_positive(pipe, steps):
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an integer >= 1"):
        pipe(num_inference_steps=steps)


def test_other_argument_errors(pipe):
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="either `timesteps` or `sigmas`, not both"):
        pipe(timesteps=[0, 22], sigmas=[80.0, 1.0])
    with pytest.raises(ValueError, match="index 39 is sigma_min"):
        pipe(timesteps=[0, 22, 39])
    with pytest.raises(ValueError, match="strictly descending"):
        pipe(sigmas=[1.0, 80.0])


# --------------------------------------------------------------------------------------------------------------------
# class conditioning
# --------------------------------------------------------------------------------------------------------------------
def test_class_conditional_unet():
    pipe = make_pipe(num_class_embeds=10)
    kw = dict(batch_size=2, num_inference_steps=2, output_type="pt")
    a = pipe(class_labels=[3, 7], generator=gen(0), **kw).images
    a2 = pipe(class_labels=torch.tensor([3, 7]), generator=gen(0), **kw).images
    b = pipe(class_labels=[4, 7], generator=gen(0), **kw).images
    assert a.shape == (2, 1, 8, 8)
    assert torch.equal(a, a2)
    # the label changes image 0 only
    assert (a[0] - b[0]).abs().max() > 1e-4
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)
    # one int label is broadcast to the batch
    c = pipe(class_labels=7, generator=gen(0), **kw).images
    d = pipe(class_labels=[7, 7], generator=gen(0), **kw).images
    assert torch.equal(c, d)
    # omitted labels are drawn from the generator: reproducible
    e1 = pipe(generator=gen(5), **kw).images
    e2 = pipe(generator=gen(5), **kw).images
    assert torch.equal(e1, e2)


def test_class_labels_on_unconditional_unet_error(pipe):
    with pytest.raises(ValueError, match="`class_labels` given but this UNet is unconditional"):
        pipe(batch_size=2, class_labels=[1, 2])
