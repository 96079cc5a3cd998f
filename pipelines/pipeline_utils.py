"""What gensample's pipelines share, written once: diffusers' prepare-latents / class-label / post-processing steps,
the denoising loop over ``scheduler.timesteps``, ``callback_on_step_end``, the check of which schedulers a pipeline
serves, and the files that let diffusers' generic ``DiffusionPipeline.from_pretrained`` load a saved folder.

Generic loading (diffusers' mechanism for pipelines defined outside diffusers, ``custom_pipeline`` +
``trust_remote_code``): every folder a gensample pipeline saves holds a small ``gensample_pipeline.py`` next to
``model_index.json``. It contains no model code; it imports the pipeline class (and the modules of the components
that ``model_index.json`` names) from the installed gensample package, so

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="gensample_pipeline", trust_remote_code=True)

returns gensample's own pipeline class, in a fresh interpreter too (diffusers gives the folder's class precedence, so
``ConsistencyModelPipeline.from_pretrained`` with those arguments also returns it;
``ConsistencyModelPipeline.from_pipe`` turns it into the stock pipeline). ``model_index.json`` keeps the plain class
name and the components' module paths, so ``ConsistencyPipeline.from_pretrained(folder)`` and
``gensample.load_pipeline(folder)`` read old and new folders alike and never execute the file. A folder whose
``_class_name`` is diffusers' custom-code form ``["gensample_pipeline", "ConsistencyPipeline"]`` loads generically with
``trust_remote_code=True`` alone, and gensample's classes read it too.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .input_checks import as_latents

__all__ = ["GENERIC_LOADING_KWARGS", "LOADER_MODULE", "GenericLoadingMixin", "GensamplePipeline", "clean_estimate",
           "descending", "loader_source", "write_loader"]

logger = logging.get_logger(__name__)

#: name (without ``.py``) of the loader file written into every saved folder; pass it as ``custom_pipeline``
LOADER_MODULE = "gensample_pipeline"
#: the keyword arguments that make ``DiffusionPipeline.from_pretrained(folder, **GENERIC_LOADING_KWARGS)`` work
GENERIC_LOADING_KWARGS = {"custom_pipeline": LOADER_MODULE, "trust_remote_code": True}
# diffusers re-executes a loader file into one cached module ``diffusers_modules.local.gensample_pipeline``; binding
# the class to one fixed name keeps exactly one pipeline class in that module however many folders were loaded (what
# ``custom_pipeline=`` needs); a module ``__getattr__`` also returns it by its own name (what a ``_class_name``
# [file, class] needs)
_LOADER_ALIAS = "LoadedPipeline"
# roots of component libraries that diffusers imports itself
_DIFFUSERS_LIBRARIES = ("diffusers", "transformers", "onnxruntime")


def clean_estimate(output: Any) -> torch.Tensor | None:
    """The clean estimate in a scheduler's ``step`` output: ``denoised`` (gensample's and LCM's schedulers) or
    ``pred_original_sample`` (DDIM, Euler, EDM Euler); None if the scheduler returns neither
    (``CMStochasticIterativeScheduler``, the DPM solvers)."""
    for name in ("denoised", "pred_original_sample"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def descending(timesteps: Any) -> list | None:
    """Grid indices given in any order, in the descending order diffusers' schedulers take (None stays None)."""
    return None if timesteps is None else sorted(timesteps, reverse=True)


def _component_modules(model_index: Mapping[str, Any]) -> list[str]:
    """Modules of the components recorded in ``model_index`` that diffusers will not import on its own."""
    from diffusers import pipelines as diffusers_pipelines

    modules = set()
    for value in model_index.values():
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
            library = value[0]
            if library.split(".")[0] not in _DIFFUSERS_LIBRARIES and not hasattr(diffusers_pipelines, library):
                modules.add(library)
    return sorted(modules)


def loader_source(pipeline_class: type, model_index: Mapping[str, Any]) -> str:
    """The text of ``gensample_pipeline.py`` for a folder saved by ``pipeline_class`` with this ``model_index``."""
    imports = [f"import {module}" for module in _component_modules(model_index)]
    return "\n".join([
        f'"""Generic diffusers loading of this {pipeline_class.__name__} folder (written by gensample):',
        "",
        "    from diffusers import DiffusionPipeline",
        "    pipe = DiffusionPipeline.from_pretrained(",
        f'        folder, custom_pipeline="{LOADER_MODULE}", trust_remote_code=True)',
        "",
        "No model code: this imports the pipeline class and the component modules that model_index.json names from",
        "the installed gensample package, so the pipeline you get is gensample's own class.",
        '"""',
        *imports,
        f"from {pipeline_class.__module__} import {pipeline_class.__name__} as {_LOADER_ALIAS}",
        "",
        "",
        "def __getattr__(name):  # the class by its own name, for a model_index.json _class_name [file, class]",
        f"    if name == {_LOADER_ALIAS}.__name__:",
        f"        return {_LOADER_ALIAS}",
        "    raise AttributeError(name)",
        "",
    ])


def write_loader(folder: str | os.PathLike, pipeline_class: type, model_index: Mapping[str, Any]) -> Path | None:
    """Write ``folder/gensample_pipeline.py`` (see the module docstring); None (and a warning) when the class is not
    importable by module path, e.g. one defined in ``__main__``."""
    if pipeline_class.__module__ in ("__main__", "builtins") or "<locals>" in pipeline_class.__qualname__:
        logger.warning("%s is not importable by module path; %s cannot load this folder generically.",
                       pipeline_class.__qualname__, LOADER_MODULE)
        return None
    path = Path(folder) / f"{LOADER_MODULE}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(loader_source(pipeline_class, model_index))
    return path


class GenericLoadingMixin:
    """For a [`DiffusionPipeline`] subclass (listed before it): ``save_pretrained`` also writes the generic-loading
    file ``gensample_pipeline.py`` (module docstring), and ``from_pretrained`` on the class reads folders whose
    ``_class_name`` is a string or diffusers' custom-code form ``[module, class]``."""

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any):
        """diffusers' ``load_config``; a class name in diffusers' custom-code form ``[module, class]`` is read as the
        class name, so a gensample class loads such a folder itself, without executing the folder's file."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2:
            config["_class_name"] = class_name[1]
        return loaded

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """``model_index.json`` (diffusers) and the generic-loading file ``gensample_pipeline.py``."""
        write_loader(save_directory, type(self), dict(self.config))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)


class GensamplePipeline(GenericLoadingMixin, DiffusionPipeline):
    r"""Base of gensample's image pipelines (a [`DiffusionPipeline`] with a ``unet`` and a ``scheduler``).

    Subclasses set ``_scheduler_classes`` to the scheduler classes whose step math they serve: any other scheduler is
    refused with a ValueError when it is set, in ``__init__`` (so also in ``from_pretrained`` / ``from_pipe``) or by
    ``pipe.scheduler = ...``. Saving and loading: :class:`GenericLoadingMixin`.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "denoised"]
    #: the scheduler classes (and their subclasses) this pipeline can sample with; empty: no check
    _scheduler_classes: tuple[type, ...] = ()
    _num_timesteps: int | None = None

    def __init__(self):
        super().__init__()
        self.image_processor = VaeImageProcessor(do_resize=False)

    # -- components ----------------------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any):
        if name == "scheduler" and value is not None:
            self.check_scheduler(value)
        super().__setattr__(name, value)

    def check_scheduler(self, scheduler: Any) -> None:
        """Raise a ValueError naming the accepted classes if this pipeline cannot sample with ``scheduler``."""
        accepted = self._scheduler_classes
        if accepted and not isinstance(scheduler, accepted):
            names = ", ".join(c.__name__ for c in accepted)
            raise ValueError(
                f"{type(self).__name__} cannot sample with {type(scheduler).__name__}: its step math serves {names} "
                f"only. Pass one of those, e.g. pipe.scheduler = {accepted[0].__name__}.from_config("
                "pipe.scheduler.config)."
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one sample of the UNet's state."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def num_timesteps(self) -> int | None:
        """Iterations of the last call's denoising loop (= calls of ``callback_on_step_end``); None before a call."""
        return self._num_timesteps

    # -- the stages of __call__ ----------------------------------------------------------------------------------
    def retrieve_timesteps(self, device: torch.device, num_inference_steps: int | None = None,
                           timesteps: Any = None, sigmas: Any = None, **kwargs: Any) -> torch.Tensor:
        """``scheduler.set_timesteps`` from ``timesteps`` or ``sigmas`` when given (refused, naming the scheduler, if
        its ``set_timesteps`` does not take them), else from ``num_inference_steps``; returns
        ``scheduler.timesteps``. ``kwargs`` go to ``set_timesteps`` (e.g. CTM's ``gamma``)."""
        scheduler = self.scheduler
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None:
                if name not in accepted:
                    raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes no `{name}`; pass "
                                     "`num_inference_steps` instead, or use a scheduler that takes them.")
                scheduler.set_timesteps(device=device, **{name: value}, **kwargs)
                return scheduler.timesteps
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        return scheduler.timesteps

    def prepare_latents(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: Any,
                        latents: torch.Tensor | None = None, init_noise_sigma: float | None = None) -> torch.Tensor:
        """Unit noise from ``generator`` (one generator per sample if a list) unless ``latents`` are given (a torch
        tensor, or a numpy array, converted), on ``device`` in ``dtype``, times ``init_noise_sigma`` (None: not
        scaled). The pipelines' ``check_inputs`` checked given latents' shape and finiteness."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = as_latents(latents).to(device=device, dtype=dtype)
        if init_noise_sigma is not None:
            latents = latents * init_noise_sigma
        return latents

    def prepare_class_labels(self, batch_size: int, class_labels: Any, generator: Any,
                             device: torch.device) -> torch.Tensor | None:
        """None for an unconditional UNet; else ``class_labels`` broadcast to the batch, or labels drawn uniformly
        from the (first) generator after the latents (from ``range(config.num_classes)`` where the pipeline has that
        config, i.e. a guidance model whose label ``num_classes`` is the null label)."""
        if self.unet.config.num_class_embeds is None:
            return None
        # a classifier-free-guidance model's last embedding is its null label: never drawn
        num_classes = getattr(self.config, "num_classes", None) or self.unet.config.num_class_embeds
        if class_labels is None:
            gen = generator[0] if isinstance(generator, list) else generator
            class_labels = torch.randint(0, num_classes, (batch_size,), generator=gen,
                                         device=gen.device if gen is not None else None)
        return torch.as_tensor(class_labels, device=device).reshape(-1).expand(batch_size)

    def callback_tensor_names(self, callback_on_step_end: Any, names: Any) -> list[str]:
        """The tensor names a callback receives: a diffusers ``PipelineCallback`` brings its own."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return list(callback_on_step_end.tensor_inputs)
        return list(names)

    def run_callback(self, callback_on_step_end: Callable | None, i: int, t: torch.Tensor, names: list[str],
                     **tensors: torch.Tensor | None) -> torch.Tensor:
        """Call ``callback_on_step_end(self, i, t, {name: tensor for the requested names})`` and return the latents
        (replaced if the callback returned ``"latents"``; the latents are the only sampler state)."""
        latents = tensors["latents"]
        if callback_on_step_end is None:
            return latents
        outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in names}) or {}
        return outputs.pop("latents", latents)

    def unet_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's time input for the scheduler's timestep ``t`` (the value itself unless a pipeline converts
        between noise-conditioning conventions)."""
        return t

    def unet_step_kwargs(self, i: int) -> dict:
        """Extra UNet keyword arguments at step ``i`` (CTM: the jump target's ``s_timestep``)."""
        return {}

    def model_output(self, model_input: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None,
                     **kwargs: Any) -> torch.Tensor:
        """The UNet's output for one step (pipelines with classifier-free guidance override this)."""
        return self.unet(model_input, timestep, class_labels=class_labels, **kwargs, return_dict=False)[0]

    def denoising_loop(self, latents: torch.Tensor, class_labels: torch.Tensor | None, generator: Any,
                       callback_on_step_end: Callable | None, callback_names: list[str]) -> torch.Tensor:
        """diffusers' loop over ``scheduler.timesteps``: ``scale_model_input``, the UNet, ``scheduler.step`` (its
        ``prev_sample`` is the next state; ``denoised`` / ``pred_original_sample`` go to the callback), then
        ``callback_on_step_end``. Returns the final latents."""
        scheduler = self.scheduler
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        timesteps = scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = scheduler.scale_model_input(latents, t)
                model_output = self.model_output(model_input, self.unet_timestep(t), class_labels,
                                                 **self.unet_step_kwargs(i))
                output = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=True)
                latents = self.run_callback(callback_on_step_end, i, t, callback_names, latents=output.prev_sample,
                                            denoised=clean_estimate(output))
                progress_bar.update()
        return latents

    def sample_latents(self, batch_size: int, num_inference_steps: int | None, timesteps: Any, sigmas: Any,
                       generator: Any, latents: torch.Tensor | None, class_labels: Any,
                       callback_on_step_end: Callable | None, callback_names: list[str],
                       **schedule_kwargs: Any) -> torch.Tensor:
        """Stages 2-5 of ``__call__`` after the input checks: the noise levels (:meth:`retrieve_timesteps`), unit
        latents times ``scheduler.init_noise_sigma`` (:meth:`prepare_latents`), the class labels
        (:meth:`prepare_class_labels`) and :meth:`denoising_loop`. Returns the final latents."""
        device = self._execution_device
        self.retrieve_timesteps(device, num_inference_steps, timesteps=timesteps, sigmas=sigmas, **schedule_kwargs)
        latents = self.prepare_latents((batch_size, *self.latent_shape), self.unet.dtype, device, generator, latents,
                                       self.scheduler.init_noise_sigma)
        class_labels = self.prepare_class_labels(batch_size, class_labels, generator, device)
        return self.denoising_loop(latents, class_labels, generator, callback_on_step_end, callback_names)

    def postprocess(self, image: torch.Tensor, output_type: str, denormalize: bool = True) -> Any:
        """``"latent"``: ``image`` as it is; otherwise (x / 2 + 0.5) clamped to [0, 1] (if ``denormalize``) as
        ``"pt"`` (NCHW tensor), ``"np"`` (NHWC float array) or ``"pil"`` (list of images; mode L for one channel)."""
        do_denormalize = None if denormalize else [False] * image.shape[0]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
