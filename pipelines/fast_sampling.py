"""Fast sampling mode for :class:`~gensample.pipelines.ConsistencyPipeline` (CM paper, Algorithm 1).

``enable_fast_sampling(pipe)`` attaches a :class:`FastSampler` to the pipeline, and ``fast_call(pipe, ...)`` (or
``pipe._fast_sampler(...)``) runs it. It takes the arguments of ``pipe(...)`` and returns the same outputs, but:

* **Precomputed plan.** All per-step scalars (c_in, c_skip, c_out, the re-noise std and the c_noise timesteps) are
  computed once per schedule in float64 by the same functions the scheduler uses, and cached
  (:class:`SamplingPlan`). The loop makes no scheduler calls.
* **Fused steps.** Each step is two fused kernels (:mod:`gensample.kernels`): c_in x with the cast to the network
  dtype, and the consistency step. They run in Triton on CUDA and as the PyTorch reference elsewhere.
* **CUDA graphs** (CUDA only, on by default there): the whole few-step loop (network and step kernels) is captured
  once per :attr:`CapturePlan.key` (batch shape, schedule and its coefficients, dtypes, layout, class-conditioning,
  noise source, device) with static input buffers and then replayed. The noise is drawn from the caller's generator
  *before* the replay, in the order of the standard pipeline (latents, class labels, then one draw per step that
  re-noises; :meth:`FastSampler.draw_inputs`), and copied into the graph's buffers. The samples are therefore those
  of the standard pipeline for the same generator.
* **Optional extras on CUDA**: ``channels_last`` weights and activations, ``torch.compile`` of the UNet
  (``compile=True``, backend ``compile_backend``, default inductor), a float16/bfloat16 network copy (``dtype=``)
  while the sampler state and step math stay in the UNet's original dtype, and in-kernel Philox noise
  (``in_kernel_rng=True``; this is the fastest path, but its noise is *not* bit-compatible with ``torch.randn`` and
  ignores the generator after drawing a seed from it).

What needs CUDA and what does not. :func:`resolve_options` decides, without touching a device, which options apply
on the pipeline's device; :class:`CapturePlan` describes what a CUDA graph captures (static buffers, inputs, output,
the noise it replays, the cache key), and :class:`StaticLoop` runs that loop over static buffers eagerly on any
device. Only :class:`_CapturedLoop` (the side-stream warm-up, the capture and the replay) needs CUDA.

Fallbacks (documented, each with a ``UserWarning``; nothing falls back silently):

* On a non-CUDA device the mode runs the eager precomputed loop. ``cuda_graph``, ``channels_last`` and
  ``in_kernel_rng`` do not apply there: left at their defaults (None / False) they are simply off; asked for
  explicitly (True) they warn once per device and are ignored. ``in_kernel_rng`` also needs Triton, ``backend`` other
  than "torch", and float32/float16/bfloat16 state and network dtypes (otherwise the noise comes from ``generator``).
* With accelerate's CPU offload on the UNet, the default ``cuda_graph=None`` runs the eager loop; an explicit
  ``cuda_graph=True`` raises a ValueError.
* ``compile=True``: if ``torch.compile`` cannot wrap the network, or the first compiled call of an input signature
  fails (e.g. no C++ compiler / no Triton for inductor), the sampler warns, keeps the eager network and records the
  reason in :attr:`FastSampler.compile_error`. A failure of the network itself is raised as usual.

With ``dtype=None`` and ``compile=False`` (or ``compile_backend="eager"``) the CPU outputs are **bit-identical** to
``pipe(...)`` for the same generator (tests/test_kernels.py, tests/test_fast_sampling_cpu.py check this). On CUDA,
cuDNN may choose other convolution algorithms for channels_last / compiled / reduced-precision networks, so the
results there are close but not bit-identical.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from gensample.kernels import (
    Backend,
    ConsistencyStepCoefficients,
    consistency_step_with_coefficients,
    input_coefficient,
    scale_input_with_coefficient,
    triton_available,
)
from gensample.schedulers import ConsistencyScheduler

# The pipeline arguments below are ConsistencyPipeline instances (this module is imported by pipeline_consistency and
# does not import it back); the sampler uses their check_inputs / prepare_latents / prepare_class_labels / postprocess.
__all__ = ["SamplingPlan", "FastSampler", "FastSamplingMixin", "enable_fast_sampling", "disable_fast_sampling",
           "fast_call", "check_fast_sampling_options", "resolve_options", "ResolvedOptions", "CapturePlan",
           "BufferSpec", "LoopInputs", "StaticBuffers", "StaticLoop"]

_WARMUP_ITERS = 2  # eager runs before capture: compile Triton / torch.compile, settle cuDNN and the allocator
_NET_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the `dtype=` choices and the Triton kernels' dtypes
_KERNEL_BACKENDS = ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------------------------------------------
# options: argument checks and what applies on a device (no device needed)
# ---------------------------------------------------------------------------------------------------------------------
def _check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None (automatic)" if allow_none else "True or False"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _known_compile_backends() -> set[str] | None:
    """Names torch.compile accepts (None when torch._dynamo cannot be imported: compile is then unavailable)."""
    try:
        import torch._dynamo
    except Exception:  # an environment without dynamo: enable falls back to eager with a warning
        return None
    return set(torch._dynamo.list_backends(exclude_tags=()))


def check_fast_sampling_options(compile: Any = False, cuda_graph: Any = None, channels_last: Any = None,
                                dtype: Any = None, in_kernel_rng: Any = False, backend: Any = "auto",
                                compile_backend: Any = None) -> None:
    """Raise a ValueError naming the argument for any option :func:`enable_fast_sampling` cannot take. The checks
    need no device: what applies where is :func:`resolve_options`'s job."""
    _check_flag("compile", compile)
    _check_flag("cuda_graph", cuda_graph, allow_none=True)
    _check_flag("channels_last", channels_last, allow_none=True)
    _check_flag("in_kernel_rng", in_kernel_rng)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in _NET_DTYPES):
        raise ValueError(f"`dtype` must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}.")
    if not isinstance(backend, str) or backend not in _KERNEL_BACKENDS:
        raise ValueError(f"`backend` must be one of {_KERNEL_BACKENDS} (the fused step kernels), got {backend!r}; "
                         "the torch.compile backend is `compile_backend`.")
    if compile_backend is not None:
        if not compile:
            raise ValueError(f"`compile_backend={compile_backend!r}` is used only with compile=True.")
        if isinstance(compile_backend, str):
            known = _known_compile_backends()
            if known is not None and compile_backend not in known:
                raise ValueError(f"`compile_backend` {compile_backend!r} is not a torch.compile backend; e.g. "
                                 "'inductor' (the default), 'eager' or 'aot_eager' (see "
                                 "torch._dynamo.list_backends(exclude_tags=())).")
        elif not callable(compile_backend):
            raise ValueError(f"`compile_backend` must be a torch.compile backend name or callable, got "
                             f"{compile_backend!r}.")


@dataclass(frozen=True)
class ResolvedOptions:
    """The options that apply on ``device`` (:func:`resolve_options`). ``not_applied`` lists the options asked for
    explicitly that do not apply there, each with the reason (the sampler warns with them)."""

    device: torch.device
    cuda_graph: bool
    channels_last: bool
    kernel_rng: bool
    not_applied: tuple[str, ...] = ()


def resolve_options(device: torch.device | str, *, cuda_graph: bool | None = None, channels_last: bool | None = None,
                    in_kernel_rng: bool = False, backend: Backend = "auto", state_dtype: torch.dtype = torch.float32,
                    net_dtype: torch.dtype | None = None, offloaded: bool = False, compile: bool = False,
                    compile_backend: Any = None, triton: bool | None = None) -> ResolvedOptions:
    """Which fast-sampling options apply for a UNet on ``device`` (pure logic; nothing runs on the device).

    * ``cuda_graph``: None (default) = on CUDA unless the UNet has CPU-offload hooks (``offloaded``); True on CUDA
      with offload hooks raises a ValueError, True elsewhere is not applied; with ``compile_backend="cudagraphs"``
      (which captures graphs itself) True raises and None turns capture off.
    * ``channels_last``: None (default) = on CUDA; True elsewhere is not applied.
    * ``in_kernel_rng``: only on CUDA with Triton (``triton``: None asks :func:`triton_available`), a kernel
      ``backend`` other than "torch" and float32/float16/bfloat16 state and network dtypes, i.e. exactly where the
      step runs the Triton kernel (the PyTorch fallback's seeded noise reads the seed on the host, which a CUDA
      graph cannot capture).
    """
    device = torch.device(device)
    net_dtype = net_dtype or state_dtype
    on_cuda = device.type == "cuda"
    not_applied: list[str] = []
    graph_compiler = compile and compile_backend == "cudagraphs"

    if cuda_graph is None:
        use_graph = on_cuda and not offloaded and not graph_compiler
    elif cuda_graph and not on_cuda:
        use_graph = False
        not_applied.append(f"cuda_graph=True (needs a CUDA device; the UNet runs on {device.type})")
    elif cuda_graph and offloaded:
        raise ValueError("CUDA-graph capture cannot be combined with CPU offload hooks on the UNet; call "
                         "enable_fast_sampling(pipe, cuda_graph=False) or remove the offloading.")
    elif cuda_graph and graph_compiler:
        raise ValueError("compile_backend='cudagraphs' captures CUDA graphs itself and cannot be captured again; "
                         "pass cuda_graph=False (or another compile_backend).")
    else:
        use_graph = bool(cuda_graph)

    if channels_last is None:
        use_cl = on_cuda
    elif channels_last and not on_cuda:
        use_cl = False
        not_applied.append(f"channels_last=True (CUDA only; the UNet runs on {device.type})")
    else:
        use_cl = bool(channels_last)

    kernel_rng = False
    if in_kernel_rng:
        reasons = []
        if not on_cuda:
            reasons.append(f"needs a CUDA device; the UNet runs on {device.type}")
        elif not (triton_available() if triton is None else triton):
            reasons.append("needs triton (pip install triton)")
        elif backend == "torch":
            reasons.append("the kernel backend is 'torch'")
        elif state_dtype not in _NET_DTYPES or net_dtype not in _NET_DTYPES:
            reasons.append(f"the Triton kernels take float32/float16/bfloat16, the state is {state_dtype} and the "
                           f"network {net_dtype}")
        if reasons:
            not_applied.append(f"in_kernel_rng=True ({reasons[0]}; the step noise comes from `generator`)")
        else:
            kernel_rng = True
    return ResolvedOptions(device=device, cuda_graph=use_graph, channels_last=use_cl, kernel_rng=kernel_rng,
                           not_applied=tuple(not_applied))


# ---------------------------------------------------------------------------------------------------------------------
# the schedule and what a CUDA graph of the loop captures (no device needed)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingPlan:
    """Everything the loop needs about one schedule, computed once on the host (float64 -> Python floats).

    ``sigmas`` holds the n sampling levels and a final sigma_min. ``timesteps[i]`` is the scheduler's c_noise value
    (float32, 0-dim, on the device). ``draws_noise[i]`` says whether step i re-noises (sigma_{i+1} > sigma_min),
    i.e. whether the standard scheduler draws from the generator at that step.
    """

    sigmas: tuple[float, ...]
    timesteps: tuple[torch.Tensor, ...]
    c_in: tuple[float, ...]
    steps: tuple[ConsistencyStepCoefficients, ...]
    draws_noise: tuple[bool, ...]
    init_noise_sigma: float
    s_noise: float
    clip_denoised: bool

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def signature(self) -> tuple:
        """Every number the loop bakes in (hashable, no tensors): two plans with equal signatures run the same
        loop. (The timesteps are c_noise(sigmas); s_noise scales the noise before it reaches the loop.)"""
        return (self.sigmas, self.c_in, self.steps, self.draws_noise, self.init_noise_sigma, self.clip_denoised)

    @classmethod
    def build(cls, scheduler: ConsistencyScheduler, device: torch.device, num_inference_steps: int | None = None,
              timesteps: Sequence[int] | None = None, sigmas: Sequence[float] | None = None) -> "SamplingPlan":
        """Run ``scheduler.set_timesteps`` once (on a private copy, so the argument checks are the scheduler's
        own) and collect the per-step coefficients of CM Algorithm 1."""
        sched = ConsistencyScheduler.from_config(scheduler.config)
        if timesteps is not None:
            sched.set_timesteps(timesteps=timesteps, device=device)
        elif sigmas is not None:
            sched.set_timesteps(sigmas=sigmas, device=device)
        else:
            sched.set_timesteps(num_inference_steps, device=device)
        cfg = sched.config
        all_sigmas = sched.sigmas  # float64, n + 1 entries ending in sigma_min
        n = sched.num_inference_steps
        return cls(
            sigmas=tuple(float(s) for s in all_sigmas),
            timesteps=tuple(sched.timesteps[i] for i in range(n)),
            c_in=tuple(input_coefficient(all_sigmas[i], cfg.sigma_data) for i in range(n)),
            steps=tuple(ConsistencyStepCoefficients.from_sigmas(all_sigmas[i], all_sigmas[i + 1], cfg.sigma_data,
                                                                cfg.sigma_min) for i in range(n)),
            draws_noise=tuple(bool(all_sigmas[i + 1] > cfg.sigma_min) for i in range(n)),
            init_noise_sigma=float(sched.init_noise_sigma),
            s_noise=float(cfg.s_noise),
            clip_denoised=bool(cfg.clip_denoised),
        )


@dataclass(frozen=True)
class BufferSpec:
    """One static tensor of a captured loop."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False

    def empty(self, device: torch.device) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.zeros(self.shape, dtype=self.dtype, device=device).contiguous(memory_format=fmt)


@dataclass
class LoopInputs:
    """What the host draws before the loop, in the standard pipeline's order (:meth:`FastSampler.draw_inputs`):
    unit ``latents``, ``labels`` (None: unconditional UNet), one noise per step that re-noises (already times
    s_noise; None where the step draws nothing or with in-kernel noise), and the in-kernel noise ``seed``."""

    latents: torch.Tensor
    labels: torch.Tensor | None
    noises: list[torch.Tensor | None]
    seed: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class CapturePlan:
    """What one CUDA graph of the loop captures, computed without CUDA.

    The graph reads only its static :attr:`inputs` (copied in before each replay) and writes :attr:`output`. The
    scalars of :attr:`plan` are baked into the graph, so :attr:`key` (the graph cache key) holds all of them;
    anything that changes the network (the UNet, its device or dtype) drops all graphs instead
    (``FastSampler._prepare``).
    """

    plan: SamplingPlan
    shape: tuple[int, ...]
    state_dtype: torch.dtype
    net_dtype: torch.dtype
    channels_last: bool
    with_labels: bool
    kernel_rng: bool
    device: torch.device

    @property
    def key(self) -> tuple:
        return (tuple(self.shape), self.plan.signature, self.state_dtype, self.net_dtype, self.channels_last,
                self.with_labels, self.kernel_rng, str(self.device))

    @property
    def noise_steps(self) -> tuple[int, ...]:
        """Steps with a static noise buffer: those that re-noise, unless the noise is drawn in-kernel."""
        if self.kernel_rng:
            return ()
        return tuple(i for i, draw in enumerate(self.plan.draws_noise) if draw)

    @property
    def inputs(self) -> tuple[BufferSpec, ...]:
        """The static input buffers, in the order they are filled (the order the host draws them)."""
        specs = [BufferSpec("latents", tuple(self.shape), self.state_dtype, self.channels_last)]
        if self.with_labels:
            specs.append(BufferSpec("class_labels", (self.shape[0],), torch.long))
        specs += [BufferSpec(f"noise_{i}", tuple(self.shape), self.state_dtype, self.channels_last)
                  for i in self.noise_steps]
        if self.kernel_rng:
            specs.append(BufferSpec("rng_seed", (1,), torch.int64))
        return tuple(specs)

    @property
    def output(self) -> BufferSpec:
        """The loop's result: the last clean estimate, in the state dtype and layout."""
        return BufferSpec("sample", tuple(self.shape), self.state_dtype, self.channels_last)

    def allocate(self) -> "StaticBuffers":
        """Zero-filled static input buffers on :attr:`device`."""
        by_name = {spec.name: spec.empty(self.device) for spec in self.inputs}
        return StaticBuffers(
            latents=by_name["latents"],
            noises=[by_name.get(f"noise_{i}") for i in range(self.plan.num_steps)],
            labels=by_name.get("class_labels"),
            seed=by_name.get("rng_seed"),
        )


@dataclass
class StaticBuffers:
    """The static inputs of a captured loop (:meth:`CapturePlan.allocate`); :meth:`fill` copies a call's inputs in."""

    latents: torch.Tensor
    noises: list[torch.Tensor | None]
    labels: torch.Tensor | None
    seed: torch.Tensor | None

    def fill(self, inputs: LoopInputs) -> None:
        """Copy ``inputs`` into the buffers. Shapes must match exactly (``copy_`` would broadcast a wrong shape)."""
        pairs = [("latents", self.latents, inputs.latents), ("class_labels", self.labels, inputs.labels),
                 ("rng_seed", self.seed, inputs.seed)]
        if len(inputs.noises) != len(self.noises):
            raise ValueError(f"got noise for {len(inputs.noises)} steps, the captured loop has {len(self.noises)}.")
        pairs += [(f"noise_{i}", buf, z) for i, (buf, z) in enumerate(zip(self.noises, inputs.noises))]
        for name, buf, value in pairs:
            if (buf is None) != (value is None):
                raise ValueError(f"the captured loop {'has no' if buf is None else 'needs a'} `{name}` input.")
            if buf is not None and tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"`{name}` has shape {tuple(value.shape)}, the captured loop's buffer "
                                 f"{tuple(buf.shape)}.")
        for _, buf, value in pairs:
            if buf is not None:
                buf.copy_(value)


class StaticLoop:
    """The sampling loop over static buffers: exactly what :class:`_CapturedLoop` captures, run eagerly (any
    device). ``run`` fills the buffers and runs the loop; the loop reads only the buffers and never writes them."""

    def __init__(self, sampler: "FastSampler", capture: CapturePlan, warmup: int = 0) -> None:
        self.sampler = sampler
        self.capture = capture
        self.buffers = capture.allocate()
        for _ in range(warmup):  # on zero inputs, as before a capture
            self.body()

    @torch.no_grad()
    def body(self) -> torch.Tensor:
        b = self.buffers
        return self.sampler._loop(self.capture.plan, b.latents, list(b.noises), b.labels, b.seed)

    def replay(self) -> torch.Tensor:
        return self.body()

    def run(self, inputs: LoopInputs) -> torch.Tensor:
        self.buffers.fill(inputs)
        return self.replay()


class _CapturedLoop(StaticLoop):
    """One CUDA graph of the whole sampling loop for one :attr:`CapturePlan.key` (CUDA only)."""

    def __init__(self, sampler: "FastSampler", capture: CapturePlan, pool) -> None:
        super().__init__(sampler, capture, warmup=0)
        device = capture.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):
                self.body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = self.body()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output.clone()


# ---------------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------------
class FastSampler:
    """Fast few-step sampling for a :class:`ConsistencyPipeline` (see the module docstring). Create it with
    :func:`enable_fast_sampling`. Calling it takes the arguments of ``ConsistencyPipeline.__call__``, except the
    step callbacks."""

    def __init__(self, pipe: DiffusionPipeline, compile: bool = False, cuda_graph: bool | None = None,
                 channels_last: bool | None = None, dtype: torch.dtype | None = None, in_kernel_rng: bool = False,
                 backend: Backend = "auto", compile_backend: str | Callable | None = None) -> None:
        if not isinstance(pipe.scheduler, ConsistencyScheduler):
            raise ValueError(f"fast sampling needs a ConsistencyScheduler, got {type(pipe.scheduler).__name__}; set "
                             "pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config).")
        check_fast_sampling_options(compile=compile, cuda_graph=cuda_graph, channels_last=channels_last, dtype=dtype,
                                    in_kernel_rng=in_kernel_rng, backend=backend, compile_backend=compile_backend)
        self.pipe = pipe
        self.compile = compile
        self.compile_backend = compile_backend
        self.cuda_graph = cuda_graph  # as asked: None = automatic; what applies is self.options (after _prepare)
        self.channels_last = channels_last
        self.dtype = dtype
        self.in_kernel_rng = in_kernel_rng
        self.backend: Backend = backend
        #: why torch.compile was given up for the eager network (None: not tried, or it works)
        self.compile_error: str | None = None
        self._plans: dict[tuple, SamplingPlan] = {}
        self._graphs: dict[tuple, StaticLoop] = {}
        self._graph_pool = None
        self._prepared_for: tuple | None = None
        self._converted_channels_last = False
        self._eager_net = None  # the network behind a compiled self.net
        self._compiled_ok: set[tuple] = set()  # input signatures the compiled network ran
        self.net = None
        self.device = torch.device("cpu")
        self.state_dtype = pipe.unet.dtype
        self.net_dtype = pipe.unet.dtype
        self.options: ResolvedOptions | None = None
        self.use_channels_last = False

    # -- setup ---------------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Build the network for the pipeline's current device and dtype (again if the pipeline was moved)."""
        unet = self.pipe.unet
        # cheap key (pipe._execution_device and unet.dtype walk all modules): where the first weight lives
        weight = next(unet.parameters())
        key = (id(unet), weight.device, weight.dtype, hasattr(unet, "_hf_hook"))
        if self._prepared_for == key:
            return
        self._release()
        self.device = torch.device(self.pipe._execution_device)
        self.state_dtype = unet.dtype
        self.net_dtype = self.dtype or unet.dtype
        self.options = resolve_options(
            self.device, cuda_graph=self.cuda_graph, channels_last=self.channels_last,
            in_kernel_rng=self.in_kernel_rng, backend=self.backend, state_dtype=self.state_dtype,
            net_dtype=self.net_dtype, offloaded=hasattr(unet, "_hf_hook"), compile=self.compile,
            compile_backend=self.compile_backend)
        if self.options.not_applied:
            warnings.warn(f"fast sampling: {'; '.join(self.options.not_applied)}. Not applied: running the eager "
                          "precomputed loop.", UserWarning, stacklevel=5)
        net = unet if self.net_dtype == unet.dtype else copy.deepcopy(unet).to(dtype=self.net_dtype)
        self.use_channels_last = self.options.channels_last
        if self.use_channels_last:
            net.to(memory_format=torch.channels_last)
            self._converted_channels_last = net is unet
        self.compile_error = None
        self.net = self._compile(net) if self.compile else net
        self._prepared_for = key

    def _compile(self, net: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile(net)`` with the chosen backend; the eager ``net`` (and a warning) if that fails."""
        try:
            compiled = torch.compile(net, backend=self.compile_backend or "inductor", dynamic=False)
        except Exception as exc:  # e.g. torch.compile unsupported on this platform / Python
            self._give_up_compile(exc)
            return net
        self._eager_net = net
        return compiled

    def _give_up_compile(self, exc: BaseException) -> None:
        self.compile_error = f"{type(exc).__name__}: {exc}"
        backend = self.compile_backend or "inductor"
        name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
        warnings.warn(f"fast sampling: torch.compile(backend={name!r}) failed, using the eager network instead "
                      f"({' '.join(self.compile_error.split())[:400]}).", UserWarning, stacklevel=2)

    @property
    def compiled(self) -> bool:
        """True while the loop runs a ``torch.compile``\\ d network."""
        return self._eager_net is not None and self.net is not self._eager_net

    def _release(self) -> None:
        """Drop graphs, compiled and cast copies; give the UNet back its contiguous layout."""
        self._graphs.clear()
        self._plans.clear()
        self._graph_pool = None
        if self._converted_channels_last:
            self.pipe.unet.to(memory_format=torch.contiguous_format)
            self._converted_channels_last = False
        self.net = None
        self._eager_net = None
        self._compiled_ok.clear()
        self._prepared_for = None

    @property
    def graphs_captured(self) -> int:
        """How many (batch, schedule, dtype) loops are captured as CUDA graphs."""
        return len(self._graphs)

    def plan(self, num_inference_steps: int | None = 1, timesteps: Sequence[int] | None = None,
             sigmas: Sequence[float] | None = None) -> SamplingPlan:
        """The cached :class:`SamplingPlan` for a schedule (same precedence as the pipeline: timesteps, then
        sigmas, then num_inference_steps)."""
        self._prepare()
        cfg = self.pipe.scheduler.config
        if timesteps is not None:
            sched_key: tuple = ("timesteps", tuple(int(t) for t in timesteps))
            num_inference_steps = sigmas = None
        elif sigmas is not None:
            sched_key = ("sigmas", tuple(float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()))
            num_inference_steps = None
        else:
            sched_key = ("steps", num_inference_steps)
        key = (sched_key, str(self.device), tuple(sorted((k, repr(v)) for k, v in cfg.items())))
        if key not in self._plans:
            self._plans[key] = SamplingPlan.build(self.pipe.scheduler, self.device, num_inference_steps, timesteps,
                                                  sigmas)
        return self._plans[key]

    def capture_plan(self, plan: SamplingPlan, batch_size: int, with_labels: bool) -> CapturePlan:
        """The :class:`CapturePlan` of a call (after :meth:`plan`, which prepares the sampler)."""
        return CapturePlan(plan=plan, shape=(batch_size, *self.pipe.latent_shape), state_dtype=self.state_dtype,
                           net_dtype=self.net_dtype, channels_last=self.use_channels_last, with_labels=with_labels,
                           kernel_rng=self._kernel_rng(), device=self.device)

    def _kernel_rng(self) -> bool:
        """In-kernel noise only where the Triton kernel runs (see :func:`resolve_options`); elsewhere the
        generator's noise."""
        return self.options is not None and self.options.kernel_rng

    def draw_inputs(self, plan: SamplingPlan, shape: tuple[int, ...], generator: Any = None,
                    latents: torch.Tensor | None = None, class_labels: Any = None) -> LoopInputs:
        """The host's random draws for one call, in the order of the standard pipeline: unit latents (unless
        given), class labels (drawn only for a class-conditional UNet without ``class_labels``), then one
        ``randn`` of the state's shape per step that re-noises, times s_noise; with in-kernel noise, one int64
        seed instead of the step noise."""
        pipe, device, dtype = self.pipe, self.device, self.state_dtype
        latents = pipe.prepare_latents(shape, dtype, device, generator, latents)
        labels = pipe.prepare_class_labels(shape[0], class_labels, generator, device)
        noises: list[torch.Tensor | None] = [None] * plan.num_steps
        seed = None
        if self._kernel_rng():
            gen = generator[0] if isinstance(generator, list) else generator
            gen_device = gen.device if gen is not None else torch.device("cpu")
            seed = torch.randint(0, 2**62, (1,), generator=gen, device=gen_device).to(device)
        else:
            for i, draw in enumerate(plan.draws_noise):
                if draw:
                    noises[i] = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * plan.s_noise
        return LoopInputs(latents=latents, labels=labels, noises=noises, seed=seed)

    # -- the loop ------------------------------------------------------------------------------------------------
    def _forward(self, model_input: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The network output. A compiled network's first call per input signature compiles it; if that fails
        the sampler keeps the eager network (:attr:`compile_error`); a failure of the eager network is raised."""
        net = self.net
        if not self.compiled:
            return net(model_input, t, class_labels=labels, return_dict=False)[0]
        signature = (tuple(model_input.shape), model_input.dtype, str(model_input.device), labels is not None,
                     model_input.is_contiguous(memory_format=torch.channels_last))
        if signature in self._compiled_ok:
            return net(model_input, t, class_labels=labels, return_dict=False)[0]
        try:
            out = net(model_input, t, class_labels=labels, return_dict=False)[0]
        except Exception as exc:
            try:
                out = self._eager_net(model_input, t, class_labels=labels, return_dict=False)[0]
            except Exception as eager_exc:  # the network itself fails: that is the error to report
                raise eager_exc from exc
            self._give_up_compile(exc)
            self.net = self._eager_net
            return out
        self._compiled_ok.add(signature)
        return out

    def _loop(self, plan: SamplingPlan, latents: torch.Tensor, noises: list[torch.Tensor | None],
              labels: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
        """CM Algorithm 1 with precomputed coefficients: x = sigma_max z; for each step x0 = f(x, sigma_i),
        x = x0 + std_i z_i. ``latents`` is unit noise. Returns the final sample (the last clean estimate)."""
        x = latents * plan.init_noise_sigma
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i in range(plan.num_steps):
            model_input = scale_input_with_coefficient(x, plan.c_in[i], self.net_dtype, backend=self.backend)
            model_output = self._forward(model_input, plan.timesteps[i], labels)
            draws = plan.draws_noise[i]
            x, _ = consistency_step_with_coefficients(
                model_output, x, plan.steps[i], noises[i] if draws else None, plan.clip_denoised,
                rng_seed=seed if (draws and seed is not None) else None, rng_offset=i * x.numel(),
                backend=self.backend,
            )
        return x

    def _capture(self, capture: CapturePlan) -> StaticLoop:
        """Capture the loop of ``capture`` as a CUDA graph (CUDA only)."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return _CapturedLoop(self, capture, self._graph_pool)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | int | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images like ``ConsistencyPipeline.__call__`` (same arguments without the step callbacks, same
        random draws from ``generator``, same outputs)."""
        pipe = self.pipe
        pipe.check_inputs(batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type, None,
                          class_labels)
        plan = self.plan(num_inference_steps, timesteps, sigmas)
        shape = (batch_size, *pipe.latent_shape)

        # Random draws in the order of the standard pipeline: latents, class labels, then per-step noise. The loop
        # scales the unit latents by sigma_max itself.
        inputs = self.draw_inputs(plan, shape, generator, latents, class_labels)
        pipe._num_timesteps = plan.num_steps

        if self.options.cuda_graph:
            capture = self.capture_plan(plan, batch_size, inputs.labels is not None)
            runner = self._graphs.get(capture.key)
            if runner is None:
                runner = self._graphs[capture.key] = self._capture(capture)
            sample = runner.run(inputs)
        else:
            noises = inputs.noises
            if self.use_channels_last:
                noises = [z if z is None else z.contiguous(memory_format=torch.channels_last) for z in noises]
            sample = self._loop(plan, inputs.latents, noises, inputs.labels, inputs.seed)

        image = pipe.postprocess(sample.contiguous(), output_type)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def enable_fast_sampling(pipe: DiffusionPipeline, compile: bool = False, cuda_graph: bool | None = None,
                         channels_last: bool | None = None, dtype: torch.dtype | None = None,
                         in_kernel_rng: bool = False, backend: Backend = "auto",
                         compile_backend: str | Callable | None = None) -> FastSampler:
    """Switch ``pipe`` to fast sampling and return the :class:`FastSampler` (also kept as ``pipe._fast_sampler``).

    Args:
        compile: ``torch.compile`` the UNet (compiled on the first call; with inductor not bit-identical to eager).
            If compiling fails, the sampler warns and runs the eager UNet (``sampler.compile_error`` says why).
        cuda_graph: capture the whole few-step loop per (batch, schedule, dtype) as one CUDA graph. None (default):
            on CUDA, unless the UNet has CPU-offload hooks. True on CPU warns and runs the eager loop; True with
            offload hooks raises a ValueError.
        channels_last: run the UNet and the sampler state in channels_last layout (the UNet's weights are converted
            in place and restored by :func:`disable_fast_sampling`). None (default): on CUDA. True on CPU warns and
            is ignored.
        dtype: network dtype (float16 / bfloat16 for speed). A cast copy of the UNet is kept, and the sampler state
            and step math stay in the UNet's dtype. None keeps the UNet as it is.
        in_kernel_rng: on CUDA with Triton, draw the step noise in-kernel (Philox, seeded from ``generator``):
            fastest, but not bit-compatible with ``torch.randn``. Where it cannot apply (CPU, no Triton,
            ``backend="torch"``, float64) the sampler warns and uses the generator's noise.
        backend: kernel backend for the fused steps, "auto" (Triton on CUDA), "triton" or "torch".
        compile_backend: the ``torch.compile`` backend (only with ``compile=True``): None = "inductor"; "eager" /
            "aot_eager" trace the UNet without generating code (CPU tests use "eager", bit-identical to eager
            PyTorch).
    """
    check_fast_sampling_options(compile=compile, cuda_graph=cuda_graph, channels_last=channels_last, dtype=dtype,
                                in_kernel_rng=in_kernel_rng, backend=backend, compile_backend=compile_backend)
    if getattr(pipe, "_fast_sampler", None) is not None:
        disable_fast_sampling(pipe)
    sampler = FastSampler(pipe, compile=compile, cuda_graph=cuda_graph, channels_last=channels_last, dtype=dtype,
                          in_kernel_rng=in_kernel_rng, backend=backend, compile_backend=compile_backend)
    if in_kernel_rng:
        warnings.warn("in_kernel_rng=True: step noise comes from Triton's Philox RNG, not from `generator`; samples "
                      "are reproducible per seed but differ from the standard pipeline.", stacklevel=2)
    pipe._fast_sampler = sampler
    return sampler


def disable_fast_sampling(pipe: DiffusionPipeline) -> None:
    """Undo :func:`enable_fast_sampling`: free graphs and network copies and restore the UNet's layout."""
    sampler = getattr(pipe, "_fast_sampler", None)
    if sampler is not None:
        sampler._release()
    pipe._fast_sampler = None


def fast_call(pipe: DiffusionPipeline, batch_size: int = 1, **kwargs) -> ImagePipelineOutput | tuple:
    """Sample with the pipeline's fast sampler: ``fast_call(pipe, 16, num_inference_steps=2, generator=g)``.
    Takes the keyword arguments of :meth:`FastSampler.__call__`."""
    sampler = getattr(pipe, "_fast_sampler", None)
    if sampler is None:
        raise ValueError("fast sampling is not enabled on this pipeline; call enable_fast_sampling(pipe) first.")
    return sampler(batch_size, **kwargs)


class FastSamplingMixin:
    """Adds ``enable_fast_sampling`` / ``disable_fast_sampling`` / ``fast_call`` methods to a pipeline class."""

    def enable_fast_sampling(self, compile: bool = False, cuda_graph: bool | None = None,
                             channels_last: bool | None = None, dtype: torch.dtype | None = None,
                             in_kernel_rng: bool = False, backend: Backend = "auto",
                             compile_backend: str | Callable | None = None) -> FastSampler:
        return enable_fast_sampling(self, compile=compile, cuda_graph=cuda_graph, channels_last=channels_last,
                                    dtype=dtype, in_kernel_rng=in_kernel_rng, backend=backend,
                                    compile_backend=compile_backend)

    def disable_fast_sampling(self) -> None:
        disable_fast_sampling(self)

    def fast_call(self, batch_size: int = 1, **kwargs) -> ImagePipelineOutput | tuple:
        return fast_call(self, batch_size, **kwargs)


FastSamplingMixin.enable_fast_sampling.__doc__ = enable_fast_sampling.__doc__
FastSamplingMixin.disable_fast_sampling.__doc__ = disable_fast_sampling.__doc__
FastSamplingMixin.fast_call.__doc__ = fast_call.__doc__
