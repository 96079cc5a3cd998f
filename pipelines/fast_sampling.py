"""Fast sampling mode for :class:`~gensample.pipelines.ConsistencyPipeline` (CM paper, Algorithm 1).

``enable_fast_sampling(pipe)`` attaches a :class:`FastSampler` to the pipeline, and ``fast_call(pipe, ...)`` (or
``pipe._fast_sampler(...)``) runs it. It takes the arguments of ``pipe(...)`` and returns the same outputs, but:

* **Precomputed plan.** All per-step scalars (c_in, c_skip, c_out, the re-noise std and the c_noise timesteps) are
  computed once per schedule in float64 by the same functions the scheduler uses, and cached. The loop makes no
  scheduler calls.
* **Fused steps.** Each step is two fused kernels (:mod:`gensample.kernels`): c_in x with the cast to the network
  dtype, and the consistency step. They run in Triton on CUDA and as the PyTorch reference elsewhere.
* **CUDA graphs** (``cuda_graph=True``, CUDA only): the whole few-step loop (network and step kernels) is captured
  once per (batch size, schedule, dtype, class-conditioning) key with static input buffers and then replayed.
  The noise is drawn from the caller's generator *before* the replay, in the order of the standard pipeline
  (latents, class labels, then one draw per step that re-noises), and copied into the graph's buffers. The samples
  are therefore those of the standard pipeline for the same generator.
* **Optional extras on CUDA**: ``channels_last`` weights and activations, ``torch.compile`` of the UNet
  (``compile=True``), a float16/bfloat16 network copy (``dtype=``) while the sampler state and step math stay in the
  UNet's original dtype, and in-kernel Philox noise (``in_kernel_rng=True``; this is the fastest path, but its noise
  is *not* bit-compatible with ``torch.randn`` and ignores the generator after drawing a seed from it).

On CPU the mode falls back to the eager precomputed loop. ``cuda_graph``, ``channels_last`` and ``in_kernel_rng``
do not apply there. With ``dtype=None`` and ``compile=False`` its outputs are **bit-identical** to ``pipe(...)``
for the same generator (tests/test_kernels.py checks this). On CUDA, cuDNN may choose other convolution algorithms
for channels_last / compiled / reduced-precision networks, so the results there are close but not bit-identical.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

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
           "fast_call"]

_WARMUP_ITERS = 2  # eager runs before capture: compile Triton / torch.compile, settle cuDNN and the allocator


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


class _CapturedLoop:
    """One CUDA graph of the whole sampling loop for a fixed (batch, schedule, dtype) key, with static buffers."""

    def __init__(self, sampler: "FastSampler", plan: SamplingPlan, shape: tuple[int, ...], with_labels: bool,
                 kernel_rng: bool, pool) -> None:
        device = sampler.device
        fmt = torch.channels_last if sampler.use_channels_last else torch.contiguous_format
        self.latents = torch.zeros(shape, device=device, dtype=sampler.state_dtype).contiguous(memory_format=fmt)
        self.noises = [torch.zeros_like(self.latents) if (draw and not kernel_rng) else None
                       for draw in plan.draws_noise]
        self.labels = torch.zeros(shape[0], dtype=torch.long, device=device) if with_labels else None
        self.seed = torch.zeros(1, dtype=torch.int64, device=device) if kernel_rng else None

        def body() -> torch.Tensor:
            return sampler._loop(plan, self.latents, self.noises, self.labels, self.seed)

        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = body()

    def run(self, latents: torch.Tensor, noises: list[torch.Tensor | None], labels: torch.Tensor | None,
            seed: torch.Tensor | None) -> torch.Tensor:
        self.latents.copy_(latents)
        for buf, z in zip(self.noises, noises):
            if buf is not None:
                buf.copy_(z)
        if self.labels is not None:
            self.labels.copy_(labels)
        if self.seed is not None:
            self.seed.copy_(seed)
        self.graph.replay()
        return self.output.clone()


class FastSampler:
    """Fast few-step sampling for a :class:`ConsistencyPipeline` (see the module docstring). Create it with
    :func:`enable_fast_sampling`. Calling it takes the arguments of ``ConsistencyPipeline.__call__``, except the
    step callbacks."""

    def __init__(self, pipe: DiffusionPipeline, compile: bool = False, cuda_graph: bool = True,
                 channels_last: bool = True, dtype: torch.dtype | None = None, in_kernel_rng: bool = False,
                 backend: Backend = "auto") -> None:
        if not isinstance(pipe.scheduler, ConsistencyScheduler):
            raise ValueError(f"fast sampling needs a ConsistencyScheduler, got {type(pipe.scheduler).__name__}; set "
                             "pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config).")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"`dtype` must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype}.")
        self.pipe = pipe
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph)
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.in_kernel_rng = bool(in_kernel_rng)
        self.backend: Backend = backend
        self._plans: dict[tuple, SamplingPlan] = {}
        self._graphs: dict[tuple, _CapturedLoop] = {}
        self._graph_pool = None
        self._prepared_for: tuple | None = None
        self._converted_channels_last = False
        self.net = None
        self.device = torch.device("cpu")
        self.state_dtype = pipe.unet.dtype
        self.net_dtype = pipe.unet.dtype
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
        on_cuda = self.device.type == "cuda"
        net = unet if self.net_dtype == unet.dtype else copy.deepcopy(unet).to(dtype=self.net_dtype)
        self.use_channels_last = self.channels_last and on_cuda
        if self.use_channels_last:
            net.to(memory_format=torch.channels_last)
            self._converted_channels_last = net is unet
        self.net = torch.compile(net, dynamic=False) if self.compile else net
        self._prepared_for = key

    def _release(self) -> None:
        """Drop graphs, compiled and cast copies; give the UNet back its contiguous layout."""
        self._graphs.clear()
        self._plans.clear()
        self._graph_pool = None
        if self._converted_channels_last:
            self.pipe.unet.to(memory_format=torch.contiguous_format)
            self._converted_channels_last = False
        self.net = None
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

    def _kernel_rng(self) -> bool:
        """In-kernel noise only where the Triton kernel runs (CUDA with triton); elsewhere the generator's noise."""
        return self.in_kernel_rng and self.device.type == "cuda" and triton_available() and self.backend != "torch"

    # -- the loop ------------------------------------------------------------------------------------------------
    def _loop(self, plan: SamplingPlan, latents: torch.Tensor, noises: list[torch.Tensor | None],
              labels: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
        """CM Algorithm 1 with precomputed coefficients: x = sigma_max z; for each step x0 = f(x, sigma_i),
        x = x0 + std_i z_i. ``latents`` is unit noise. Returns the final sample (the last clean estimate)."""
        x = latents * plan.init_noise_sigma
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i in range(plan.num_steps):
            model_input = scale_input_with_coefficient(x, plan.c_in[i], self.net_dtype, backend=self.backend)
            model_output = self.net(model_input, plan.timesteps[i], class_labels=labels, return_dict=False)[0]
            draws = plan.draws_noise[i]
            x, _ = consistency_step_with_coefficients(
                model_output, x, plan.steps[i], noises[i] if draws else None, plan.clip_denoised,
                rng_seed=seed if (draws and seed is not None) else None, rng_offset=i * x.numel(),
                backend=self.backend,
            )
        return x

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
        device, dtype = self.device, self.state_dtype
        shape = (batch_size, *pipe.latent_shape)

        # Random draws in the order of the standard pipeline: latents, class labels, then per-step noise. The loop
        # scales the unit latents by sigma_max itself.
        latents = pipe.prepare_latents(shape, dtype, device, generator, latents)
        labels = pipe.prepare_class_labels(batch_size, class_labels, generator, device)
        pipe._num_timesteps = plan.num_steps
        kernel_rng = self._kernel_rng()
        seed = None
        noises: list[torch.Tensor | None] = [None] * plan.num_steps
        if kernel_rng:
            gen = generator[0] if isinstance(generator, list) else generator
            gen_device = gen.device if gen is not None else torch.device("cpu")
            seed = torch.randint(0, 2**62, (1,), generator=gen, device=gen_device).to(device)
        else:
            for i, draw in enumerate(plan.draws_noise):
                if draw:
                    noises[i] = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * plan.s_noise

        if self.cuda_graph and device.type == "cuda":
            if hasattr(pipe.unet, "_hf_hook"):
                raise ValueError("CUDA-graph capture cannot be combined with CPU offload hooks on the UNet; call "
                                 "enable_fast_sampling(pipe, cuda_graph=False) or remove the offloading.")
            key = (batch_size, plan.sigmas, self.net_dtype, labels is not None, kernel_rng)
            if key not in self._graphs:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                self._graphs[key] = _CapturedLoop(self, plan, shape, labels is not None, kernel_rng,
                                                  self._graph_pool)
            sample = self._graphs[key].run(latents, noises, labels, seed)
        else:
            if self.use_channels_last:
                noises = [z if z is None else z.contiguous(memory_format=torch.channels_last) for z in noises]
            sample = self._loop(plan, latents, noises, labels, seed)

        image = pipe.postprocess(sample.contiguous(), output_type)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def enable_fast_sampling(pipe: DiffusionPipeline, compile: bool = False, cuda_graph: bool = True,
                         channels_last: bool = True, dtype: torch.dtype | None = None, in_kernel_rng: bool = False,
                         backend: Backend = "auto") -> FastSampler:
    """Switch ``pipe`` to fast sampling and return the :class:`FastSampler` (also kept as ``pipe._fast_sampler``).

    Args:
        compile: ``torch.compile`` the UNet (compiled on the first call; not bit-identical to eager).
        cuda_graph: on CUDA, capture the whole few-step loop per (batch, schedule, dtype) as one CUDA graph.
        channels_last: on CUDA, run the UNet and the sampler state in channels_last layout (the UNet's weights are
            converted in place and restored by :func:`disable_fast_sampling`).
        dtype: network dtype (float16 / bfloat16 for speed). A cast copy of the UNet is kept, and the sampler state
            and step math stay in the UNet's dtype. None keeps the UNet as it is.
        in_kernel_rng: on CUDA with Triton, draw the step noise in-kernel (Philox, seeded from ``generator``):
            fastest, but not bit-compatible with ``torch.randn``.
        backend: kernel backend for the fused steps, "auto" (Triton on CUDA), "triton" or "torch".
    """
    if getattr(pipe, "_fast_sampler", None) is not None:
        disable_fast_sampling(pipe)
    sampler = FastSampler(pipe, compile=compile, cuda_graph=cuda_graph, channels_last=channels_last, dtype=dtype,
                          in_kernel_rng=in_kernel_rng, backend=backend)
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

    def enable_fast_sampling(self, compile: bool = False, cuda_graph: bool = True, channels_last: bool = True,
                             dtype: torch.dtype | None = None, in_kernel_rng: bool = False,
                             backend: Backend = "auto") -> FastSampler:
        return enable_fast_sampling(self, compile=compile, cuda_graph=cuda_graph, channels_last=channels_last,
                                    dtype=dtype, in_kernel_rng=in_kernel_rng, backend=backend)

    def disable_fast_sampling(self) -> None:
        disable_fast_sampling(self)

    def fast_call(self, batch_size: int = 1, **kwargs) -> ImagePipelineOutput | tuple:
        return fast_call(self, batch_size, **kwargs)


FastSamplingMixin.enable_fast_sampling.__doc__ = enable_fast_sampling.__doc__
FastSamplingMixin.disable_fast_sampling.__doc__ = disable_fast_sampling.__doc__
FastSamplingMixin.fast_call.__doc__ = fast_call.__doc__
