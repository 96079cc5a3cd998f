"""Fused sampler kernels (gensample.kernels) and the fast sampling path (gensample.pipelines.fast_sampling).

* PyTorch references == gensample.core.sampling.consistency_step / the scheduler, bit for bit.
* CTM gamma-sampling reference: gamma = 1 is CM re-noising, gamma = 0 is a deterministic jump, G(x, t, t) = x.
* Triton kernels == references under the Triton CPU interpreter (TRITON_INTERPRET=1). Skipped without triton
  (optional: ``pip install triton``).
* The fast CPU path == the standard pipeline, bit for bit, with the caller's generator.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from gensample import kernels
from gensample.kernels import (
    ConsistencyStepCoefficients,
    CTMStepCoefficients,
    consistency_step_reference,
    ctm_gamma_step_reference,
    ctm_jump_target,
    scale_input_reference,
)
from gensample.core.sampling import consistency_step, renoise_std
from gensample.core.sigmas import SIGMA_MIN
# collects this file too and should start fast.


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tensors(dtype=torch.float32, shape=(2, 3, 9, 11), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    f = torch.randn(shape, generator=g).to(dtype)
    z = torch.randn(shape, generator=g).to(dtype)
    return x, f, z


# (sigma, sigma_next) pairs: a first step from sigma_max, a middle step, a last step onto sigma_min.
STEPS = [(80.0, 2.2404), (2.2404, 0.3), (0.3, SIGMA_MIN)]


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch references vs gensample.core.sampling / the scheduler
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("clip", [True, False])
def test_consistency_reference_bit_equal_to_sampling(dtype, clip):
    x, f, z = _tensors(dtype)
    for sigma, sigma_next in STEPS:
        noise = z if sigma_next > SIGMA_MIN else None
        expected = consistency_step(f, x, torch.tensor(sigma, dtype=torch.float64),
                                    torch.tensor(sigma_next, dtype=torch.float64), noise, clip_denoised=clip)
        coeffs = ConsistencyStepCoefficients.from_sigmas(sigma, sigma_next)
        got = consistency_step_reference(f, x, coeffs, noise, clip)
        via_dispatch = kernels.consistency_step(f, x, sigma, sigma_next, noise, clip_denoised=clip)
        for e, g, d in zip(expected, got, via_dispatch):
            assert g.dtype == dtype
            assert torch.equal(e, g) and torch.equal(e, d)
    # the clamp is really applied: sigma_max with a large model output leaves [-1, 1] without it
    coeffs = ConsistencyStepCoefficients.from_sigmas(*STEPS[0])
    _, den = consistency_step_reference(f * 10, x, coeffs, z, clip)
    assert (den.abs().max() <= 1) == clip


def test_last_step_adds_no_noise_even_if_given():
    x, f, z = _tensors()
    coeffs = ConsistencyStepCoefficients.from_sigmas(0.3, SIGMA_MIN)
    assert coeffs.std == 0.0
    nxt, den = consistency_step_reference(f, x, coeffs, z)
    assert nxt is den


def test_scale_input_reference_equals_scheduler():
    from gensample.schedulers import ConsistencyScheduler

    sched = ConsistencyScheduler()
    sched.set_timesteps(sigmas=[80.0, 2.0, 0.5])
    x, _, _ = _tensors()
    for i, sigma in enumerate(sched.sigmas[:-1]):
        sched._step_index = i  # scale_model_input reads the sigma of the current step
        expected = sched.scale_model_input(x)
        assert torch.equal(kernels.scale_model_input(x, sigma), expected)
        assert torch.equal(scale_input_reference(x, kernels.input_coefficient(sigma)), expected)
    half = scale_input_reference(x, kernels.input_coefficient(2.0), torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, (x * kernels.input_coefficient(2.0)).half())


# ---------------------------------------------------------------------------------------------------------------------
# CTM gamma-sampling reference
# ---------------------------------------------------------------------------------------------------------------------
def _ctm_direct(f, x, t, s, sigma_next, z, sd=0.5):
    """G(x_t, t, s) + sqrt(sigma_next^2 - s^2) z written out in float64 (CTM eq. for G with EDM scalings)."""
    x64, f64 = x.double(), f.double()
    g = sd**2 / (t**2 + sd**2) * x64 + t * sd / math.sqrt(t**2 + sd**2) * f64
    jumped = s / t * x64 + (1 - s / t) * g
    return jumped + math.sqrt(max(sigma_next**2 - s**2, 0.0)) * z.double(), jumped


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 1.0])
def test_ctm_reference_matches_formula(gamma):
    x, f, z = _tensors()
    t, sigma_next = 2.0, 0.5
    coeffs = CTMStepCoefficients.from_sigmas(t, sigma_next, gamma)
    s = math.sqrt(1 - gamma**2) * (sigma_next - SIGMA_MIN) + SIGMA_MIN
    assert coeffs.s == pytest.approx(s, rel=1e-15)
    assert coeffs.s**2 + coeffs.std**2 == pytest.approx(sigma_next**2, rel=1e-12)  # marginal at sigma_next
    nxt, jumped = ctm_gamma_step_reference(f, x, coeffs, z)
    e_next, e_jumped = _ctm_direct(f, x, t, s, sigma_next, z)
    torch.testing.assert_close(nxt.double(), e_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jumped.double(), e_jumped, rtol=1e-5, atol=1e-5)
    via_dispatch = kernels.ctm_gamma_step(f, x, t, sigma_next, gamma, z)
    assert torch.equal(via_dispatch[0], nxt) and torch.equal(via_dispatch[1], jumped)


def test_ctm_gamma_one_is_cm_renoising():
    for sigma_next in (2.2404, 0.3, SIGMA_MIN):
        coeffs = CTMStepCoefficients.from_sigmas(80.0, sigma_next, 1.0)
        assert coeffs.s == SIGMA_MIN
        assert coeffs.std == float(renoise_std(sigma_next, SIGMA_MIN))
        assert float(ctm_jump_target(sigma_next, 1.0)) == SIGMA_MIN


def test_ctm_gamma_zero_is_deterministic_jump():
    x, f, z = _tensors()
    coeffs = CTMStepCoefficients.from_sigmas(2.0, 0.7, 0.0)
    assert coeffs.s == 0.7 and coeffs.std == 0.0
    nxt, jumped = ctm_gamma_step_reference(f, x, coeffs, z)
    assert nxt is jumped  # the noise is ignored
    assert torch.equal(nxt, ctm_gamma_step_reference(f, x, coeffs, None)[0])


def test_ctm_boundary_condition_G_of_t_t_is_identity():
    x, f, _ = _tensors()
    for t in (80.0, 2.0, 0.0123):
        coeffs = CTMStepCoefficients.from_sigmas(t, t, 0.0)
        assert coeffs.jump_ratio == 1.0 and coeffs.jump_complement == 0.0
        nxt, jumped = ctm_gamma_step_reference(f * 100, x, coeffs, None, clip_denoised=True)
        assert torch.equal(jumped, x) and torch.equal(nxt, x)


def test_ctm_reference_equals_model_level_trajectory_function():
    """The kernel-level G equals gensample.core.parametrization.TrajectoryFunction's G (CTM's model wrapper) bit for bit."""
    ctm = pytest.importorskip("gensample.core.parametrization", reason="gensample.core.parametrization (CTM model wrapper) not available")
    x, f, _ = _tensors()
    G = ctm.TrajectoryFunction(lambda inp, t, s_timestep=None: f)
    for t, sigma_next, gamma in [(80.0, 2.0, 0.3), (2.0, 0.5, 0.9), (0.5, SIGMA_MIN, 0.0)]:
        coeffs = CTMStepCoefficients.from_sigmas(t, sigma_next, gamma)
        _, jumped = ctm_gamma_step_reference(f, x, coeffs, None)
        assert torch.equal(jumped, G(x, t, coeffs.s))


def test_ctm_clip_clamps_g_not_G():
    x, f, _ = _tensors()
    coeffs = CTMStepCoefficients.from_sigmas(2.0, 0.5, 0.5)
    _, jumped = ctm_gamma_step_reference(f * 50, x, coeffs, None, clip_denoised=True)
    g = (jumped - coeffs.jump_ratio * x) / coeffs.jump_complement
    assert g.abs().max() <= 1 + 1e-4
    _, unclipped = ctm_gamma_step_reference(f * 50, x, coeffs, None, clip_denoised=False)
    assert not torch.equal(jumped, unclipped)


# ---------------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_outside_unit_interval_raises(gamma):
    with pytest.raises(ValueError, match="gamma"):
        CTMStepCoefficients.from_sigmas(2.0, 0.5, gamma)
    x, f, _ = _tensors()
    with pytest.raises(ValueError, match="gamma"):
        kernels.ctm_gamma_step(f, x, 2.0, 0.5, gamma)


def test_bad_inputs_raise():
    x, f, z = _tensors()
    coeffs = ConsistencyStepCoefficients.from_sigmas(2.0, 0.5)
    with pytest.raises(ValueError, match="model_output"):
        consistency_step_reference(f[:1], x, coeffs, z)
    with pytest.raises(ValueError, match="noise"):
        consistency_step_reference(f, x, coeffs, z[..., :3])
    with pytest.raises(ValueError, match="model_output"):
        kernels.ctm_gamma_step(f[:, :1], x, 2.0, 0.5, 0.5, z)
    with pytest.raises(ValueError, match="sigma_next"):
        CTMStepCoefficients.from_sigmas(0.5, 2.0, 0.5)
    with pytest.raises(ValueError, match="sigma_next"):
        ctm_jump_target(0.001, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        ConsistencyStepCoefficients.from_sigmas(torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match="backend"):
        kernels.consistency_step(f, x, 2.0, 0.5, z, backend="cuda")
    with pytest.raises(ValueError, match="not both"):
        kernels.consistency_step(f, x, 2.0, 0.5, z, rng_seed=1)
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(ValueError, match="triton"):
            kernels.consistency_step(f, x, 2.0, 0.5, z, backend="triton")


def test_auto_backend_is_torch_on_cpu():
    x, f, z = _tensors()
    assert kernels.resolve_backend("auto", f, z, x) == "torch"
    assert kernels.resolve_backend("torch", f, z, x) == "torch"


def test_reference_rng_seed_is_deterministic():
    x, f, _ = _tensors()
    a = kernels.consistency_step(f, x, 2.0, 0.5, rng_seed=7)
    b = kernels.consistency_step(f, x, 2.0, 0.5, rng_seed=7)
    c = kernels.consistency_step(f, x, 2.0, 0.5, rng_seed=7, rng_offset=x.numel())
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[1], c[1])  # only the noise differs


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------------
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="module")
def tk():
    """gensample.kernels.triton_kernels, run by Triton's CPU interpreter.

    The interpreter must be chosen before ``import triton`` (triton's own @jit helpers such as ``tl.randn`` are
    bound then), so these tests run only in a process started with TRITON_INTERPRET=1.
    :func:`test_triton_kernels_under_interpreter` starts that process for a plain ``pytest`` run.
    """
    pytest.importorskip("triton", reason="triton not installed (optional test extra: pip install triton)")
    if not _INTERPRETING:
        pytest.skip("Triton kernel tests need TRITON_INTERPRET=1 from process start; "
                    "test_triton_kernels_under_interpreter runs them in a subprocess")
    from gensample.kernels import triton_kernels

    return triton_kernels


def test_triton_kernels_under_interpreter():
    """Run this file's Triton tests in a fresh process with TRITON_INTERPRET=1 (so no GPU is needed)."""
    pytest.importorskip("triton", reason="triton not installed (optional test extra: pip install triton)")
    if _INTERPRETING:
        pytest.skip("already running under the Triton interpreter")
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-k", "triton_ and not under"],
        env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _assert_same(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """Bit-equal, except for bfloat16: the interpreter truncates float32 -> bfloat16 where GPUs round to nearest
    even, and each of the kernel's roundings may then be off by one bfloat16 ulp (2^-5 at magnitude 8). Exactness of
    the arithmetic is what the float32/float16 cases check."""
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    if dtype == torch.bfloat16:
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-4, atol=2**-2)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [True, False])
def test_triton_consistency_step_equals_reference(tk, dtype, clip):
    x, f, z = _tensors(dtype, shape=(2, 3, 33, 37))  # 7326 elements: several blocks and a ragged tail
    for sigma, sigma_next in STEPS:
        coeffs = ConsistencyStepCoefficients.from_sigmas(sigma, sigma_next)
        expected = consistency_step_reference(f, x, coeffs, z, clip)
        got = tk.consistency_step_triton(f, x, coeffs, z, clip)
        for e, g in zip(expected, got):
            _assert_same(g, e, dtype)
        assert (got[0] is got[1]) == (coeffs.std == 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_triton_ctm_step_equals_reference(tk, dtype, gamma):
    x, f, z = _tensors(dtype, shape=(2, 3, 33, 37))
    for clip in (False, True):
        coeffs = CTMStepCoefficients.from_sigmas(2.0, 0.5, gamma)
        expected = ctm_gamma_step_reference(f * 3, x, coeffs, z, clip)
        got = tk.ctm_gamma_step_triton(f * 3, x, coeffs, z, clip)
        for e, g in zip(expected, got):
            _assert_same(g, e, dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                                (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_triton_scale_input_equals_reference(tk, in_dtype, out_dtype):
    x, _, _ = _tensors(in_dtype, shape=(3, 3, 17, 17))
    c_in = kernels.input_coefficient(0.7)
    _assert_same(tk.scale_input_triton(x, c_in, out_dtype), scale_input_reference(x, c_in, out_dtype), out_dtype)


def test_triton_mixed_dtype_and_channels_last(tk):
    """bf16 network output into a float32 state; channels_last state with contiguous operands keeps its layout."""
    x, f, z = _tensors(torch.float32, shape=(2, 4, 8, 8))
    coeffs = ConsistencyStepCoefficients.from_sigmas(2.0, 0.5)
    f16 = f.to(torch.bfloat16)
    for e, g in zip(consistency_step_reference(f16, x, coeffs, z), tk.consistency_step_triton(f16, x, coeffs, z)):
        assert torch.equal(e, g)
    xc = x.contiguous(memory_format=torch.channels_last)
    nxt, den = tk.consistency_step_triton(f, xc, coeffs, z)
    assert nxt.is_contiguous(memory_format=torch.channels_last) and not nxt.is_contiguous()
    expected = consistency_step_reference(f, x, coeffs, z)
    assert torch.equal(nxt, expected[0]) and torch.equal(den, expected[1])


def test_triton_in_kernel_rng(tk):
    x, f, _ = _tensors(shape=(2, 3, 32, 32))
    coeffs = ConsistencyStepCoefficients.from_sigmas(2.0, 0.5)
    nxt, den = tk.consistency_step_triton(f, x, coeffs, rng_seed=123)
    assert torch.equal(den, consistency_step_reference(f, x, coeffs, None)[1])
    z = (nxt.double() - den.double()) / coeffs.std
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    again, _ = tk.consistency_step_triton(f, x, coeffs, rng_seed=torch.tensor([123]))
    other_seed, _ = tk.consistency_step_triton(f, x, coeffs, rng_seed=124)
    other_offset, _ = tk.consistency_step_triton(f, x, coeffs, rng_seed=123, rng_offset=x.numel())
    assert torch.equal(nxt, again)
    assert not torch.equal(nxt, other_seed) and not torch.equal(nxt, other_offset)
    ctm = CTMStepCoefficients.from_sigmas(2.0, 0.5, 0.7)
    c_next, c_jump = tk.ctm_gamma_step_triton(f, x, ctm, rng_seed=5)
    zc = (c_next.double() - c_jump.double()) / ctm.std
    assert abs(zc.std() - 1) < 0.05


def test_dispatch_routes_to_triton_when_forced(tk, monkeypatch):
    from gensample.kernels import dispatch

    calls = []

    def fake_module():
        calls.append(1)
        return tk

    monkeypatch.setattr(dispatch, "_triton", fake_module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, f, z = _tensors()
    got = kernels.consistency_step(f, x, 2.0, 0.5, z, backend="triton")
    assert calls and torch.equal(got[0], consistency_step(f, x, 2.0, 0.5, z)[0])
    assert torch.equal(kernels.scale_model_input(x, 2.0, backend="triton"), kernels.scale_model_input(x, 2.0))
    with pytest.raises(ValueError, match="float64"):
        kernels.consistency_step(f.double(), x.double(), 2.0, 0.5, z.double(), backend="triton")


def test_triton_fast_sampling_loop_bit_equal(tk, monkeypatch):
    """The fast loop with every step on the Triton kernels (interpreter) reproduces the standard pipeline."""
    from gensample.kernels import dispatch
    from gensample.pipelines.fast_sampling import FastSampler

    monkeypatch.setattr(dispatch, "_triton", lambda: tk)
    pipe = _pipe()
    expected = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                    output_type="pt").images
    got = FastSampler(pipe, backend="triton")(batch_size=2, num_inference_steps=3,
                                              generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------------
# fast sampling path vs the standard pipeline
# ---------------------------------------------------------------------------------------------------------------------
def _pipe(**unet_overrides):
    from gensample.models import build_unet
    from gensample.pipelines import ConsistencyPipeline
    from gensample.schedulers import ConsistencyScheduler

    torch.manual_seed(0)
    pipe = ConsistencyPipeline(unet=build_unet("tiny", sample_size=8, **unet_overrides).eval(),
                               scheduler=ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fs():
    """gensample.pipelines.fast_sampling (imported lazily, see the top of the file)."""
    from gensample.pipelines import fast_sampling

    return fast_sampling


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


@pytest.mark.parametrize("schedule", [dict(num_inference_steps=1), dict(num_inference_steps=2),
                                      dict(num_inference_steps=3), dict(sigmas=[80.0, 4.0, 0.6]),
                                      dict(timesteps=[0, 22])])
def test_fast_cpu_path_bit_equal_to_pipeline(fs, pipe, schedule):
    fs.enable_fast_sampling(pipe)
    try:
        g_std, g_fast = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        expected = pipe(batch_size=2, generator=g_std, output_type="pt", **schedule).images
        got = fs.fast_call(pipe, 2, generator=g_fast, output_type="pt", **schedule).images
        assert torch.equal(got, expected)
        assert torch.equal(g_std.get_state(), g_fast.get_state())  # the same number of draws
        again = fs.fast_call(pipe, 2, generator=torch.Generator().manual_seed(4), output_type="pt", **schedule)
        assert not torch.equal(again.images, expected)
    finally:
        fs.disable_fast_sampling(pipe)


def test_fast_path_class_conditional_and_numpy_output(fs):
    pipe = _pipe(num_class_embeds=5)
    fs.enable_fast_sampling(pipe)
    expected = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                    output_type="np").images
    got = fs.fast_call(pipe, 3, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
    assert (got.images == expected).all()
    labels = torch.tensor([0, 4, 2])
    expected = pipe(batch_size=3, num_inference_steps=2, class_labels=labels,
                    generator=torch.Generator().manual_seed(1), output_type="pt").images
    got = fs.fast_call(pipe, 3, num_inference_steps=2, class_labels=labels,
                       generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(got, expected)


def test_fast_path_makes_no_scheduler_calls_and_caches_the_plan(fs, pipe, monkeypatch):
    from gensample.schedulers import ConsistencyScheduler

    sampler = fs.enable_fast_sampling(pipe)
    builds = []
    original = fs.SamplingPlan.build
    monkeypatch.setattr(fs.SamplingPlan, "build",
                        classmethod(lambda cls, *a, **k: builds.append(1) or original(*a, **k)))

    def boom(*args, **kwargs):
        raise AssertionError("the fast loop must not call the scheduler per step")

    monkeypatch.setattr(ConsistencyScheduler, "step", boom)
    monkeypatch.setattr(ConsistencyScheduler, "scale_model_input", boom)
    for seed in (0, 1):
        out = sampler(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                      output_type="pt")
        assert out.images.shape == (1, 1, 8, 8)
    assert len(builds) == 1
    fs.disable_fast_sampling(pipe)


def test_fast_path_options_on_cpu(fs, pipe):
    ref = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    with pytest.warns(UserWarning, match="in_kernel_rng"):
        fs.enable_fast_sampling(pipe, in_kernel_rng=True, channels_last=True, cuda_graph=True)
    got = fs.fast_call(pipe, 2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(got.images, ref)  # CUDA-only options do not apply on CPU: still bit-identical
    fs.enable_fast_sampling(pipe, dtype=torch.bfloat16)
    low = fs.fast_call(pipe, 2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert pipe.unet.dtype == torch.float32  # the network copy is cast, not the pipeline's UNet
    assert low.images.dtype == torch.float32 and not torch.equal(low.images, ref)
    torch.testing.assert_close(low.images, ref, rtol=0, atol=0.1)
    fs.disable_fast_sampling(pipe)
    assert pipe._fast_sampler is None


def test_fast_path_errors(fs, pipe):
    from diffusers import CMStochasticIterativeScheduler

    fs.disable_fast_sampling(pipe)
    with pytest.raises(ValueError, match="enable_fast_sampling"):
        fs.fast_call(pipe, 1)
    fs.enable_fast_sampling(pipe)
    with pytest.raises(ValueError, match="batch_size"):
        fs.fast_call(pipe, 0)
    with pytest.raises(ValueError, match="sigmas"):
        fs.fast_call(pipe, 1, sigmas=[0.5, 80.0])
    with pytest.raises(ValueError, match="dtype"):
        fs.enable_fast_sampling(pipe, dtype=torch.int8)
    fs.disable_fast_sampling(pipe)
    other = _pipe()
    other.scheduler = CMStochasticIterativeScheduler()
    with pytest.raises(ValueError, match="ConsistencyScheduler"):
        fs.enable_fast_sampling(other)
