"""The fast sampling mode's CUDA-graph and torch.compile paths, tested as far as they go without CUDA.

gensample.pipelines.fast_sampling splits the CUDA-graph path into parts that need no device (:func:`resolve_options`,
:class:`SamplingPlan`, :class:`CapturePlan`, :meth:`FastSampler.draw_inputs`, :class:`StaticBuffers`) and the loop
over static buffers (:class:`StaticLoop`), which :class:`_CapturedLoop` captures and replays on CUDA. Here:

* argument checks and the documented fallbacks (CUDA-only options on CPU warn and are ignored; torch.compile that
  cannot wrap or fails on its first call falls back to the eager network with a warning);
* the plan and the host's random draws against what the standard pipeline does, step by step, bit for bit;
* the static buffers, the cache key (what invalidates a captured loop), and the loop over static buffers: the same
  samples as the standard pipeline, replays that read their inputs only, no host reads or RNG inside the loop
  (what a capture forbids), every tensor on the sampler's device (checked on the meta device);
* ``FastSampler.__call__``'s CUDA-graph branch, with the capture replaced by the eager :class:`StaticLoop` (no
  graph is pretended: the loop really runs, on CPU);
* torch.compile on CPU with the "eager" / "aot_eager" backends (bit-identical) and with a backend that fails.

What only a GPU can check (benchmarks/run_gpu.sh): the side-stream warm-up, the capture itself, the replay of the
Triton kernels and of the in-kernel Philox noise, inductor code generation, and channels_last / bf16 numerics.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fs():
    from gensample.pipelines import fast_sampling

    return fast_sampling


def _pipe(scheduler=None, device=None, **unet_overrides):
    from gensample.pipelines import ConsistencyPipeline

    from gensample.models import build_unet
    from gensample.schedulers import ConsistencyScheduler

    torch.manual_seed(0)
    if device is not None:
        with torch.device(device):
            unet = build_unet("tiny", sample_size=8, **unet_overrides).eval()
    else:
        unet = build_unet("tiny", sample_size=8, **unet_overrides).eval()
    pipe = ConsistencyPipeline(unet=unet, scheduler=scheduler or ConsistencyScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return _pipe()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def standard(pipe, batch_size=2, seed=0, **call):
    return pipe(batch_size=batch_size, generator=gen(seed), output_type="latent", **call).images


def fast(pipe, batch_size=2, seed=0, **call):
    return pipe.fast_call(batch_size, generator=gen(seed), output_type="latent", **call).images


def fast_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("fast sampling")]


SCHEDULES = [dict(num_inference_steps=1), dict(num_inference_steps=2), dict(num_inference_steps=3),
             dict(sigmas=[80.0, 4.0, 0.6]), dict(timesteps=[0, 22])]


# ---------------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", [dict(compile="yes"), dict(compile=None), dict(cuda_graph=1),
                                    dict(cuda_graph="auto"), dict(channels_last="nhwc"), dict(in_kernel_rng=None),
                                    dict(in_kernel_rng=1)])
def test_flags_must_be_bools(fs, pipe, option):
    kept = pipe.enable_fast_sampling()
    with pytest.raises(ValueError, match=f"`{next(iter(option))}` must be True"):
        pipe.enable_fast_sampling(**option)
    assert pipe._fast_sampler is kept  # a refused call leaves the enabled sampler alone
    with pytest.raises(ValueError, match=f"`{next(iter(option))}`"):
        fs.FastSampler(pipe, **option)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.complex64, "bfloat16", torch.bool])
def test_bad_dtypes(pipe, dtype):
    with pytest.raises(ValueError, match="`dtype` must be None, torch.float32, torch.float16 or torch.bfloat16"):
        pipe.enable_fast_sampling(dtype=dtype)
    assert getattr(pipe, "_fast_sampler", None) is None


@pytest.mark.parametrize("backend", ["cuda", "inductor", None, "Torch"])
def test_bad_kernel_backend_is_refused_at_enable(pipe, backend):
    with pytest.raises(ValueError, match="`backend` must be one of"):
        pipe.enable_fast_sampling(backend=backend)


def test_compile_backend_checks(fs, pipe):
    with pytest.raises(ValueError, match="only with compile=True"):
        pipe.enable_fast_sampling(compile_backend="eager")
    with pytest.raises(ValueError, match="not a torch.compile backend"):
        pipe.enable_fast_sampling(compile=True, compile_backend="indcutor")
    with pytest.raises(ValueError, match="backend name or callable"):
        pipe.enable_fast_sampling(compile=True, compile_backend=42)
    for ok in ("eager", "aot_eager", "inductor", lambda gm, example_inputs: gm):
        assert pipe.enable_fast_sampling(compile=True, compile_backend=ok).compile_backend is ok


def test_backend_triton_without_cuda_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pipe.enable_fast_sampling(backend="triton")
    with pytest.raises(ValueError, match="backend='triton' (but triton is not importable|needs CUDA tensors)"):
        fast(pipe, num_inference_steps=1)


# ---------------------------------------------------------------------------------------------------------------------
# which options apply where (pure logic: the device is only a torch.device object, nothing runs on it)
# ---------------------------------------------------------------------------------------------------------------------
def test_resolve_options_defaults(fs):
    cpu = fs.resolve_options("cpu")
    assert (cpu.cuda_graph, cpu.channels_last, cpu.kernel_rng, cpu.not_applied) == (False, False, False, ())
    cuda = fs.resolve_options(torch.device("cuda", 0), triton=False)
    assert (cuda.cuda_graph, cuda.channels_last, cuda.kernel_rng, cuda.not_applied) == (True, True, False, ())
    off = fs.resolve_options("cuda", cuda_graph=False, channels_last=False)
    assert (off.cuda_graph, off.channels_last) == (False, False)


@pytest.mark.parametrize("option", ["cuda_graph", "channels_last", "in_kernel_rng"])
@pytest.mark.parametrize("device", ["cpu", "mps", "meta"])
def test_resolve_options_cuda_only_options_elsewhere(fs, option, device):
    got = fs.resolve_options(device, **{option: True}, triton=True)
    assert not (got.cuda_graph or got.channels_last or got.kernel_rng)
    assert len(got.not_applied) == 1 and got.not_applied[0].startswith(f"{option}=True")
    assert device in got.not_applied[0]


def test_resolve_options_offload(fs):
    assert fs.resolve_options("cuda", offloaded=True).cuda_graph is False  # default: eager loop, no error
    assert fs.resolve_options("cuda", offloaded=True).not_applied == ()
    with pytest.raises(ValueError, match="CPU offload hooks"):
        fs.resolve_options("cuda", cuda_graph=True, offloaded=True)
    assert fs.resolve_options("cpu", cuda_graph=True, offloaded=True).cuda_graph is False  # not CUDA: not applied


def test_resolve_options_cudagraphs_compile_backend(fs):
    assert fs.resolve_options("cuda", compile=True, compile_backend="cudagraphs").cuda_graph is False
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        fs.resolve_options("cuda", cuda_graph=True, compile=True, compile_backend="cudagraphs")
    assert fs.resolve_options("cuda", cuda_graph=True, compile=True, compile_backend="eager").cuda_graph


@pytest.mark.parametrize("case, expected, reason", [
    (dict(), True, None),
    (dict(net_dtype=torch.bfloat16), True, None),
    (dict(state_dtype=torch.float16), True, None),
    (dict(triton=False), False, "needs triton"),
    (dict(backend="torch"), False, "backend is 'torch'"),
    (dict(state_dtype=torch.float64), False, "float32/float16/bfloat16"),
])
def test_resolve_options_in_kernel_rng_only_where_the_triton_kernel_runs(fs, case, expected, reason):
    """In-kernel noise only where the step runs the Triton kernel: the PyTorch fallback of rng_seed reads the seed
    on the host (.item()), which a CUDA graph cannot capture."""
    kwargs = dict(in_kernel_rng=True, triton=True, state_dtype=torch.float32) | case
    got = fs.resolve_options("cuda", **kwargs)
    assert got.kernel_rng is expected
    if reason is None:
        assert got.not_applied == ()
    else:
        assert len(got.not_applied) == 1 and reason in got.not_applied[0]
        assert "`generator`" in got.not_applied[0]


def test_prepare_on_a_simulated_cuda_device(fs, monkeypatch):
    """The sampler's set-up logic for a CUDA pipeline (no CUDA kernel runs: only _prepare, which converts the UNet's
    layout on the host): channels_last in place and restored, offload hooks, the graph decision."""
    pipe = _pipe(in_channels=3, out_channels=3)  # 3 channels: channels_last differs from contiguous
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(fs, "triton_available", lambda: False)
    conv = pipe.unet.conv_in.weight
    sampler = pipe.enable_fast_sampling()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sampler._prepare()
    assert fast_warnings(record) == []
    assert sampler.options.cuda_graph and sampler.use_channels_last and not sampler._kernel_rng()
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    pipe.disable_fast_sampling()
    assert conv.is_contiguous()  # the UNet's layout is given back

    sampler = pipe.enable_fast_sampling(dtype=torch.bfloat16)
    sampler._prepare()  # a cast copy is converted, not the pipeline's UNet
    assert sampler.net is not pipe.unet and conv.is_contiguous() and not sampler._converted_channels_last
    assert sampler.net.conv_in.weight.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    pipe.disable_fast_sampling()

    pipe.unet._hf_hook = object()  # what accelerate's CPU offload attaches
    try:
        sampler = pipe.enable_fast_sampling(channels_last=False)
        sampler._prepare()
        assert sampler.options.cuda_graph is False  # default: the eager loop
        sampler = pipe.enable_fast_sampling(cuda_graph=True, channels_last=False)
        with pytest.raises(ValueError, match="CPU offload hooks"):
            sampler._prepare()
    finally:
        del pipe.unet._hf_hook
        pipe.disable_fast_sampling()


# ---------------------------------------------------------------------------------------------------------------------
# fallbacks on CPU: CUDA-only options warn and are ignored; the samples stay those of the standard pipeline
# ---------------------------------------------------------------------------------------------------------------------
def test_defaults_on_cpu_do_not_warn(pipe):
    sampler = pipe.enable_fast_sampling()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = fast(pipe, num_inference_steps=2)
    assert fast_warnings(record) == []
    assert torch.equal(got, standard(pipe, num_inference_steps=2))
    assert sampler.cuda_graph is None and not sampler.options.cuda_graph and sampler.graphs_captured == 0


@pytest.mark.parametrize("option", ["cuda_graph", "channels_last", "in_kernel_rng"])
def test_cuda_only_option_on_cpu_warns_once_and_is_ignored(pipe, option):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # in_kernel_rng's notice at enable time (tests/test_kernels.py)
        sampler = pipe.enable_fast_sampling(**{option: True})
    g_std, g_fast = gen(7), gen(7)
    expected = pipe(batch_size=2, num_inference_steps=3, generator=g_std, output_type="latent").images
    with pytest.warns(UserWarning, match=f"fast sampling: {option}=True .*cpu.*Not applied"):
        got = pipe.fast_call(2, num_inference_steps=3, generator=g_fast, output_type="latent").images
    assert torch.equal(got, expected) and torch.equal(g_std.get_state(), g_fast.get_state())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast(pipe, num_inference_steps=3)
    assert fast_warnings(record) == []  # once per device, not per call
    assert sampler.graphs_captured == 0 and not sampler.use_channels_last and sampler.options.kernel_rng is False
    assert pipe.unet.conv_in.weight.is_contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# the plan and the host's draws against the standard pipeline, step by step
# ---------------------------------------------------------------------------------------------------------------------
def record_standard(pipe, monkeypatch, **call):
    """Run the standard pipeline and record each step: the UNet's input, timestep and labels, and the scheduler's
    consistency step (sigma, sigma_next, the model output, the state, the noise it drew, the next state)."""
    from gensample.schedulers import scheduling_consistency

    steps, unet_calls = [], []
    real = scheduling_consistency.consistency_step

    def spy(model_output, sample, sigma, sigma_next, noise, *args, **kwargs):
        out = real(model_output, sample, sigma, sigma_next, noise, *args, **kwargs)
        steps.append(dict(model_output=model_output, sample=sample, sigma=float(sigma), sigma_next=float(sigma_next),
                          noise=noise, next=out[0]))
        return out

    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: unet_calls.append((args, kwargs)),
                                                 with_kwargs=True)
    with monkeypatch.context() as m:
        m.setattr(scheduling_consistency, "consistency_step", spy)
        try:
            out = pipe(output_type="latent", **call).images
        finally:
            handle.remove()
    return out, steps, unet_calls


CONFIGS = [dict(), dict(s_noise=0.7, clip_denoised=False, sigma_data=0.4, sigma_min=0.01)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_plan_reproduces_the_standard_steps(fs, monkeypatch, schedule, config):
    from gensample.kernels import consistency_step_with_coefficients, scale_input_with_coefficient
    from gensample.schedulers import ConsistencyScheduler

    pipe = _pipe(ConsistencyScheduler(**config))
    _, steps, unet_calls = record_standard(pipe, monkeypatch, batch_size=2, generator=gen(1), **schedule)
    plan = pipe.enable_fast_sampling().plan(**schedule)
    assert plan.num_steps == len(steps) == len(unet_calls)
    assert plan.init_noise_sigma == pipe.scheduler.init_noise_sigma and plan.s_noise == pipe.scheduler.config.s_noise
    assert plan.sigmas[-1] == pipe.scheduler.config.sigma_min
    for i, (step, (args, kwargs)) in enumerate(zip(steps, unet_calls)):
        model_input, t = args
        assert (plan.sigmas[i], plan.sigmas[i + 1]) == (step["sigma"], step["sigma_next"])
        assert plan.timesteps[i].dtype == t.dtype and torch.equal(plan.timesteps[i], t)
        assert torch.equal(scale_input_with_coefficient(step["sample"], plan.c_in[i]), model_input)
        assert plan.draws_noise[i] == (step["noise"] is not None)
        nxt, _ = consistency_step_with_coefficients(step["model_output"], step["sample"], plan.steps[i],
                                                    step["noise"], plan.clip_denoised)
        assert torch.equal(nxt, step["next"])
    assert plan.draws_noise[-1] is False  # the last step lands on sigma_min: no draw


@pytest.mark.parametrize("generators", ["one", "per-sample"])
@pytest.mark.parametrize("conditional", [False, True])
def test_draw_inputs_are_the_standard_draws_in_order(fs, monkeypatch, conditional, generators):
    """The noise a graph replays: the host draws latents, class labels, then each re-noising step's noise from the
    caller's generator(s), exactly as the standard pipeline does (values and the generators' final states)."""
    pipe = _pipe(num_class_embeds=5) if conditional else _pipe()

    def make():
        return gen(3) if generators == "one" else [gen(3), gen(4), gen(5)]

    g_std, g_fast = make(), make()
    _, steps, unet_calls = record_standard(pipe, monkeypatch, batch_size=3, num_inference_steps=3, generator=g_std)
    sampler = pipe.enable_fast_sampling()
    plan = sampler.plan(num_inference_steps=3)
    inputs = sampler.draw_inputs(plan, (3, *pipe.latent_shape), g_fast)
    assert torch.equal(inputs.latents * plan.init_noise_sigma, steps[0]["sample"])
    if conditional:
        assert torch.equal(inputs.labels, unet_calls[0][1]["class_labels"])
    else:
        assert inputs.labels is None and unet_calls[0][1]["class_labels"] is None
    assert len(inputs.noises) == plan.num_steps and inputs.seed is None
    for z, step in zip(inputs.noises, steps):
        assert (z is None and step["noise"] is None) or torch.equal(z, step["noise"])
    for a, b in zip(g_std if isinstance(g_std, list) else [g_std], g_fast if isinstance(g_fast, list) else [g_fast]):
        assert torch.equal(a.get_state(), b.get_state())


def test_given_latents_and_labels_draw_nothing_but_the_step_noise(pipe):
    sampler = pipe.enable_fast_sampling()
    plan = sampler.plan(num_inference_steps=2)
    g, ref = gen(0), gen(0)
    latents = torch.randn(2, *pipe.latent_shape, generator=gen(9))
    inputs = sampler.draw_inputs(plan, (2, *pipe.latent_shape), g, latents)
    assert torch.equal(inputs.latents, latents)
    assert torch.equal(inputs.noises[0], torch.randn(2, *pipe.latent_shape, generator=ref) * plan.s_noise)
    assert inputs.noises[1] is None and torch.equal(g.get_state(), ref.get_state())


# ---------------------------------------------------------------------------------------------------------------------
# the capture plan: static buffers, inputs / output, cache key
# ---------------------------------------------------------------------------------------------------------------------
def test_capture_plan_buffers(fs):
    pipe = _pipe(in_channels=3, out_channels=3)
    sampler = pipe.enable_fast_sampling()
    plan = sampler.plan(num_inference_steps=3)
    capture = sampler.capture_plan(plan, 4, with_labels=False)
    assert [s.name for s in capture.inputs] == ["latents", "noise_0", "noise_1"]
    assert capture.noise_steps == (0, 1)
    assert all(s.shape == (4, 3, 8, 8) and s.dtype == torch.float32 and not s.channels_last for s in capture.inputs)
    assert capture.output == fs.BufferSpec("sample", (4, 3, 8, 8), torch.float32, False)
    buffers = capture.allocate()
    assert buffers.labels is None and buffers.seed is None and buffers.noises[2] is None
    assert all(not b.any() for b in [buffers.latents, *buffers.noises[:2]])

    one = sampler.capture_plan(sampler.plan(num_inference_steps=1), 1, with_labels=True)
    assert [(s.name, s.shape, s.dtype) for s in one.inputs] == [("latents", (1, 3, 8, 8), torch.float32),
                                                                ("class_labels", (1,), torch.long)]
    rng = dataclasses.replace(capture, kernel_rng=True, channels_last=True, net_dtype=torch.bfloat16)
    assert [s.name for s in rng.inputs] == ["latents", "rng_seed"] and rng.noise_steps == ()
    buffers = rng.allocate()
    assert buffers.seed.dtype == torch.int64 and buffers.seed.shape == (1,)
    assert buffers.latents.is_contiguous(memory_format=torch.channels_last) and not buffers.latents.is_contiguous()
    assert rng.output.channels_last and rng.output.dtype == torch.float32  # the state's dtype, not the network's


def test_static_buffers_fill_checks(fs, pipe):
    sampler = pipe.enable_fast_sampling()
    plan = sampler.plan(num_inference_steps=2)
    capture = sampler.capture_plan(plan, 2, with_labels=False)
    buffers = capture.allocate()
    inputs = sampler.draw_inputs(plan, (2, *pipe.latent_shape), gen(0))
    with pytest.raises(ValueError, match=r"`noise_0` has shape \(1, 1, 8, 8\)"):  # copy_ would broadcast it
        buffers.fill(dataclasses.replace(inputs, noises=[inputs.noises[0][:1], None]))
    with pytest.raises(ValueError, match="has no `class_labels`"):
        buffers.fill(dataclasses.replace(inputs, labels=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs a `noise_0`"):
        buffers.fill(dataclasses.replace(inputs, noises=[None, None]))
    with pytest.raises(ValueError, match="noise for 3 steps"):
        buffers.fill(dataclasses.replace(inputs, noises=[*inputs.noises, None]))
    assert not buffers.latents.any()  # a refused fill copies nothing
    buffers.fill(inputs)
    assert torch.equal(buffers.latents, inputs.latents) and torch.equal(buffers.noises[0], inputs.noises[0])


def test_capture_key_invalidation(fs):
    """The graph cache key changes with everything the graph bakes in, and only with that."""
    from gensample.schedulers import ConsistencyScheduler

    pipe = _pipe()
    sampler = pipe.enable_fast_sampling()

    def key(batch=2, labels=False, **schedule):
        schedule = schedule or dict(num_inference_steps=2)
        return sampler.capture_plan(sampler.plan(**schedule), batch, labels).key

    base = key()
    sampler._plans.clear()  # a rebuilt plan of the same schedule hits the same graph
    assert key() == base
    assert key(num_inference_steps=2) == key(sigmas=sampler.plan(num_inference_steps=2).sigmas[:-1])
    changed = [key(batch=3), key(labels=True), key(num_inference_steps=3), key(sigmas=[80.0, 1.0]),
               key(timesteps=[0, 22])]
    capture = sampler.capture_plan(sampler.plan(num_inference_steps=2), 2, False)
    changed += [dataclasses.replace(capture, **{f: v}).key for f, v in [
        ("net_dtype", torch.bfloat16), ("state_dtype", torch.float64), ("channels_last", True),
        ("kernel_rng", True), ("device", torch.device("cuda", 0)), ("shape", (2, 3, 8, 8))]]
    # same sigmas, other coefficients: a new graph (sigma_data changes c_in, c_skip, c_out; clip_denoised the step)
    for config in (dict(sigma_data=0.25), dict(clip_denoised=False)):
        pipe.scheduler = ConsistencyScheduler(**config)
        assert sampler.plan(num_inference_steps=2).sigmas == capture.plan.sigmas
        changed.append(key())
    assert len({base, *changed}) == len(changed) + 1
    pipe.scheduler = ConsistencyScheduler(s_noise=0.5)  # scales the noise on the host: the same graph
    assert key() == base


# ---------------------------------------------------------------------------------------------------------------------
# the loop over static buffers (what the graph captures), run eagerly
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_static_loop_gives_the_standard_samples(fs, schedule, conditional):
    pipe = _pipe(num_class_embeds=5) if conditional else _pipe()
    sampler = pipe.enable_fast_sampling()
    plan = sampler.plan(**schedule)
    loop = fs.StaticLoop(sampler, sampler.capture_plan(plan, 2, conditional), warmup=fs._WARMUP_ITERS)
    shape = (2, *pipe.latent_shape)
    for seed in (0, 1):
        out = loop.run(sampler.draw_inputs(plan, shape, gen(seed)))
        assert torch.equal(out, standard(pipe, seed=seed, **schedule))
        before = [b.clone() for b in (loop.buffers.latents, *loop.buffers.noises, loop.buffers.labels)
                  if b is not None]
        assert torch.equal(loop.replay(), out)  # a replay reads only its inputs ...
        after = [b for b in (loop.buffers.latents, *loop.buffers.noises, loop.buffers.labels) if b is not None]
        assert all(torch.equal(a, b) for a, b in zip(before, after))  # ... and never writes them
    spec = loop.capture.output
    assert (tuple(out.shape), out.dtype) == (spec.shape, spec.dtype)


class _OpLog(TorchDispatchMode):
    """Every aten op run inside the mode, with the devices and ranks of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[str, int]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [(t.device.type, t.dim()) for t in flat if isinstance(t, torch.Tensor)]))
        return out


_HOST_READS = ("_local_scalar_dense", "is_nonzero", "aten.nonzero", "aten.equal", "aten.allclose")
_RNG = ("rand", "normal", "uniform", "bernoulli", "multinomial", "exponential", "random_", "cauchy", "geometric",
        "log_normal", "poisson")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_static_loop_is_capturable(fs, dtype):
    """What a CUDA-graph capture forbids, checked on CPU: no op in the loop reads a tensor on the host (.item(),
    bool(), nonzero: a sync) or draws random numbers (the noise must come in through the static buffers)."""
    pipe = _pipe(num_class_embeds=5)
    sampler = pipe.enable_fast_sampling(dtype=dtype)
    plan = sampler.plan(num_inference_steps=3)
    loop = fs.StaticLoop(sampler, sampler.capture_plan(plan, 2, True), warmup=1)
    loop.buffers.fill(sampler.draw_inputs(plan, (2, *pipe.latent_shape), gen(0)))
    with _OpLog() as log:
        loop.body()
    names = [name for name, _ in log.ops]
    assert any("convolution" in n for n in names)  # the network ran inside the mode
    assert [n for n in names if any(bad in n for bad in _HOST_READS)] == []
    assert [n for n in names if any(r in n.split(".")[1] for r in _RNG)] == []


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_static_loop_on_the_meta_device(fs, monkeypatch, dtype, channels_last):
    """The loop on a device other than the CPU (meta tensors carry shapes, dtypes and strides but no data): every
    tensor it makes lives on that device except 0-dim host scalars (no hidden host tensor, no host read, which a
    meta tensor cannot give), and the output matches the CapturePlan's spec, channels_last included."""
    real = fs.resolve_options
    monkeypatch.setattr(fs, "resolve_options",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), channels_last=channels_last))
    pipe = _pipe(device="meta", num_class_embeds=5, in_channels=3, out_channels=3)
    assert pipe._execution_device.type == "meta"
    sampler = pipe.enable_fast_sampling(dtype=dtype)
    plan = sampler.plan(num_inference_steps=3)
    assert all(t.device.type == "meta" for t in plan.timesteps)
    capture = sampler.capture_plan(plan, 2, True)
    loop = fs.StaticLoop(sampler, capture)
    loop.run(sampler.draw_inputs(plan, (2, *pipe.latent_shape), None))  # the host's draws, moved to the device
    with _OpLog() as log:
        out = loop.body()
    stray = [(name, outs) for name, outs in log.ops if any(dev != "meta" and dim > 0 for dev, dim in outs)]
    assert stray == []
    spec = capture.output
    assert (tuple(out.shape), out.dtype, out.device.type) == (spec.shape, spec.dtype, "meta")
    assert out.is_contiguous(memory_format=torch.channels_last if spec.channels_last else torch.contiguous_format)
    assert sampler.net.conv_in.weight.dtype == (dtype or torch.float32)


def test_channels_last_loop_on_cpu(fs, monkeypatch):
    """The channels_last path (CUDA only in use) forced on CPU, where channels_last convolutions exist too: the
    state stays channels_last through the steps, the UNet is converted in place and given back, and the samples
    match the standard pipeline (bit-identical is not promised: other convolution kernels)."""
    pipe = _pipe(in_channels=3, out_channels=3)
    real = fs.resolve_options
    monkeypatch.setattr(fs, "resolve_options", lambda *a, **k: dataclasses.replace(real(*a, **k), channels_last=True))
    expected = standard(pipe, num_inference_steps=3)
    sampler = pipe.enable_fast_sampling()
    plan = sampler.plan(num_inference_steps=3)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loop = fs.StaticLoop(sampler, sampler.capture_plan(plan, 2, False), warmup=1)
    out = loop.run(sampler.draw_inputs(plan, (2, *pipe.latent_shape), gen(0)))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast(pipe, num_inference_steps=3), expected, rtol=0, atol=1e-5)
    pipe.disable_fast_sampling()
    assert pipe.unet.conv_in.weight.is_contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# FastSampler.__call__'s CUDA-graph branch, with the capture replaced by the eager StaticLoop
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def eager_capture(fs, monkeypatch):
    """The graph branch of ``__call__`` on CPU: the options say cuda_graph, and "capturing" builds a StaticLoop
    (warmed up like a capture), which really runs the loop on each call. Returns the CapturePlans captured."""
    real = fs.resolve_options
    monkeypatch.setattr(fs, "resolve_options", lambda *a, **k: dataclasses.replace(real(*a, **k), cuda_graph=True))
    captured = []

    def capture(self, plan):
        captured.append(plan)
        return fs.StaticLoop(self, plan, warmup=fs._WARMUP_ITERS)

    monkeypatch.setattr(fs.FastSampler, "_capture", capture)
    return captured


def test_graph_branch_caches_and_invalidates(fs, eager_capture):
    from gensample.schedulers import ConsistencyScheduler

    pipe = _pipe()
    sampler = pipe.enable_fast_sampling()
    calls = [  # (call, new capture?)
        (dict(num_inference_steps=2), True),
        (dict(num_inference_steps=2, seed=5), False),  # new noise, same graph
        (dict(num_inference_steps=2, batch_size=3), True),
        (dict(num_inference_steps=3), True),
        (dict(sigmas=[80.0, 4.0, 0.6]), True),
        (dict(timesteps=[0, 22]), True),
        (dict(num_inference_steps=2, latents=torch.randn(2, 1, 8, 8, generator=gen(8))), False),
    ]
    for call, new in calls:
        n = len(eager_capture)
        assert torch.equal(fast(pipe, **call), standard(pipe, **call)), call
        assert len(eager_capture) == n + new, call
    assert sampler.graphs_captured == len(eager_capture)

    n = len(eager_capture)
    pipe.scheduler = ConsistencyScheduler(sigma_data=0.3)  # same sigmas, other coefficients: a stale graph
    assert torch.equal(fast(pipe, num_inference_steps=2), standard(pipe, num_inference_steps=2))  # would differ
    assert len(eager_capture) == n + 1
    pipe.scheduler = ConsistencyScheduler(s_noise=0.5)  # noise scaled on the host: the first graph again
    assert torch.equal(fast(pipe, num_inference_steps=2), standard(pipe, num_inference_steps=2))
    assert len(eager_capture) == n + 1

    pipe.unet.to(torch.float64)  # another network: every graph is dropped, the state is float64
    assert torch.equal(fast(pipe, num_inference_steps=2), standard(pipe, num_inference_steps=2))
    assert sampler.graphs_captured == 1 and eager_capture[-1].state_dtype == torch.float64
    pipe.unet.to(torch.float32)


def test_graph_branch_class_labels_and_outputs(fs, eager_capture):
    pipe = _pipe(num_class_embeds=5)
    sampler = pipe.enable_fast_sampling()
    for labels in (None, torch.tensor([0, 4]), 3, [1, 2]):
        got = pipe.fast_call(2, num_inference_steps=3, class_labels=labels, generator=gen(2), output_type="np")
        ref = pipe(batch_size=2, num_inference_steps=3, class_labels=labels, generator=gen(2), output_type="np")
        assert (got.images == ref.images).all()
    assert sampler.graphs_captured == 1 and eager_capture[0].with_labels  # drawn or given: one graph
    assert pipe.num_timesteps == 3


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------------
class _RecordingCompile:
    """Stands in for torch.compile: records its arguments and returns ``make(net)``."""

    def __init__(self, make):
        self.make, self.calls = make, []

    def __call__(self, net, **kwargs):
        self.calls.append(kwargs)
        return self.make(net)


class _FailsOnCall(torch.nn.Module):
    """A compiled network whose first call fails the way inductor does without a C++ compiler."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")


def test_compile_defaults_unchanged(pipe, monkeypatch):
    spy = _RecordingCompile(lambda net: net)
    monkeypatch.setattr(torch, "compile", spy)
    pipe.enable_fast_sampling(compile=True)._prepare()
    pipe.enable_fast_sampling(compile=True, compile_backend="eager")._prepare()
    assert spy.calls == [dict(backend="inductor", dynamic=False), dict(backend="eager", dynamic=False)]


def test_compile_unavailable_falls_back_with_a_warning(pipe, monkeypatch):
    def unavailable(net, **kwargs):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", unavailable)
    sampler = pipe.enable_fast_sampling(compile=True)
    with pytest.warns(UserWarning, match="torch.compile.*'inductor'.*failed.*not supported on this platform"):
        got = fast(pipe, num_inference_steps=2)
    assert torch.equal(got, standard(pipe, num_inference_steps=2))
    assert not sampler.compiled and sampler.net is pipe.unet and "not supported" in sampler.compile_error


def test_compile_failing_on_first_call_falls_back_with_a_warning(pipe, monkeypatch):
    failing = _FailsOnCall()
    monkeypatch.setattr(torch, "compile", _RecordingCompile(lambda net: failing))
    sampler = pipe.enable_fast_sampling(compile=True)
    sampler._prepare()
    assert sampler.compiled and sampler.net is failing and sampler.compile_error is None
    with pytest.warns(UserWarning, match="failed, using the eager network.*InvalidCxxCompiler"):
        got = fast(pipe, num_inference_steps=3)
    assert torch.equal(got, standard(pipe, num_inference_steps=3))
    assert not sampler.compiled and sampler.net is pipe.unet and "InvalidCxxCompiler" in sampler.compile_error
    fast(pipe, num_inference_steps=3)
    assert failing.calls == 1  # given up once, not retried per step or per call
    pipe.unet.to(torch.float64)  # a new network is compiled again
    sampler._prepare()
    assert sampler.compiled and sampler.compile_error is None
    pipe.unet.to(torch.float32)


def test_network_errors_are_not_hidden_by_the_compile_fallback(pipe, monkeypatch):
    monkeypatch.setattr(torch, "compile", _RecordingCompile(lambda net: _FailsOnCall()))
    sampler = pipe.enable_fast_sampling(compile=True)
    sampler._prepare()

    def broken(*args, **kwargs):
        raise ValueError("the network itself is broken")

    sampler._eager_net = broken
    with pytest.raises(ValueError, match="network itself is broken") as info:
        fast(pipe, num_inference_steps=1)
    assert isinstance(info.value.__cause__, RuntimeError)  # the compile error is chained, not lost
    assert sampler.compile_error is None  # nothing was given up


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_on_cpu_is_bit_identical(fs, backend, monkeypatch):
    """A real torch.compile (dynamo traces the UNet; the eager / aot_eager backends run the traced graph without
    generating code), on the plain path and on the graph branch (the compile happens in the warm-up)."""
    pipe = _pipe(num_class_embeds=5)
    expected = standard(pipe, num_inference_steps=2)
    sampler = pipe.enable_fast_sampling(compile=True, compile_backend=backend)
    assert torch.equal(fast(pipe, num_inference_steps=2), expected)
    assert sampler.compiled and sampler.compile_error is None and len(sampler._compiled_ok) == 1

    real = fs.resolve_options
    monkeypatch.setattr(fs, "resolve_options", lambda *a, **k: dataclasses.replace(real(*a, **k), cuda_graph=True))
    monkeypatch.setattr(fs.FastSampler, "_capture",
                        lambda self, plan: fs.StaticLoop(self, plan, warmup=fs._WARMUP_ITERS))
    sampler = pipe.enable_fast_sampling(compile=True, compile_backend=backend)
    assert torch.equal(fast(pipe, num_inference_steps=2), expected)
    assert sampler.compiled and sampler.graphs_captured == 1
    torch._dynamo.reset()


def test_real_compile_failure_falls_back_before_capture(fs, pipe, eager_capture):
    """A backend that fails (as inductor does without a compiler): dynamo raises on the first compiled call, which
    is in the capture's warm-up; the loop that is then captured runs the eager network."""
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no working C++ compiler")

    sampler = pipe.enable_fast_sampling(compile=True, compile_backend=no_compiler)
    with pytest.warns(UserWarning, match="'no_compiler'.*failed.*no working C\\+\\+ compiler"):
        got = fast(pipe, num_inference_steps=2)
    assert torch.equal(got, standard(pipe, num_inference_steps=2))
    assert not sampler.compiled and "BackendCompilerFailed" in sampler.compile_error
    assert sampler.graphs_captured == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU; run them with -k test_cuda_graph_): what the CPU cannot show
# ---------------------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_graph_replay_matches_the_eager_loop():
    """Capture, warm-up on the side stream, replay in another order than the captures (shared memory pool), and
    new noise on every replay: the graph gives the eager fast loop's samples (same kernels)."""
    pipe = _pipe(in_channels=3, out_channels=3).to("cuda")
    eager = pipe.enable_fast_sampling(cuda_graph=False, channels_last=False)
    calls = [(n, b, s) for n in (1, 2, 3) for b in (1, 4) for s in (0, 1)]
    ref = {c: fast(pipe, batch_size=c[1], seed=c[2], num_inference_steps=c[0]) for c in calls}
    assert eager.graphs_captured == 0
    graph = pipe.enable_fast_sampling(cuda_graph=True, channels_last=False)
    for c in calls + calls[::-1]:
        got = fast(pipe, batch_size=c[1], seed=c[2], num_inference_steps=c[0])
        torch.testing.assert_close(got, ref[c], rtol=0, atol=1e-5)
    assert graph.graphs_captured == 6
    torch.testing.assert_close(fast(pipe, num_inference_steps=2), standard(pipe, num_inference_steps=2),
                               rtol=0, atol=1e-5)


@needs_cuda
def test_cuda_graph_in_kernel_noise_changes_per_replay():
    pytest.importorskip("triton")
    pipe = _pipe(in_channels=3, out_channels=3).to("cuda")
    with pytest.warns(UserWarning, match="in_kernel_rng"):
        sampler = pipe.enable_fast_sampling(in_kernel_rng=True)
    a, b, a2 = (fast(pipe, num_inference_steps=3, seed=s) for s in (0, 1, 0))
    assert sampler.options.kernel_rng and sampler.graphs_captured == 1
    assert torch.equal(a, a2) and not torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("options", [dict(channels_last=True, dtype=torch.bfloat16), dict(compile=True)])
def test_cuda_graph_with_channels_last_bf16_and_inductor(options):
    pipe = _pipe(in_channels=3, out_channels=3).to("cuda")
    expected = standard(pipe, num_inference_steps=2)
    sampler = pipe.enable_fast_sampling(**options)
    got = fast(pipe, num_inference_steps=2)
    assert sampler.options.cuda_graph and sampler.graphs_captured == 1 and sampler.compile_error is None
    assert sampler.compiled == options.get("compile", False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1 if "dtype" in options else 1e-3)
    torch.testing.assert_close(fast(pipe, num_inference_steps=2), got, rtol=0, atol=0)  # replay reproduces
