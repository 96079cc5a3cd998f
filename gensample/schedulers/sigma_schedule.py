"""What the three gensample schedulers (:class:`ConsistencyScheduler`, :class:`CTMScheduler`,
:class:`EDMHeunScheduler`) share: the schedule checks, diffusers' timestep protocol (step index, begin index,
``add_noise`` at a value of ``scheduler.timesteps``) and ``compatibles`` resolution.

The timestep protocol is diffusers' (``EulerDiscreteScheduler`` / ``CMStochasticIterativeScheduler`` /
``EDMEulerScheduler``), so a loop written for diffusers gives the same result with our schedulers:

* ``scheduler.timesteps`` holds the value passed to the model at each model evaluation; entry i is evaluated at the
  noise level ``scheduler.timestep_sigmas[i]``.
* ``scale_model_input(sample, t)`` and ``step(model_output, t, sample, ...)`` locate their index from ``t`` when no
  step is in progress (:meth:`SigmaScheduleMixin._init_step_index`: the position of ``t`` in ``timesteps``, or
  ``begin_index`` if :meth:`set_begin_index` was called), then every ``step`` advances the index by one.
  ``set_timesteps`` clears both. So a loop may start mid-schedule: ``for t in scheduler.timesteps[k:]``.
* ``add_noise(x0, noise, timesteps)`` takes values of ``scheduler.timesteps`` (one per sample, or one for all) and
  returns x0 + sigma * noise at their levels; :meth:`add_noise_at_sigma` takes the levels themselves.

Differences from diffusers, all of them errors where diffusers fails later or silently: a timestep that is not in
``scheduler.timesteps`` raises a ``ValueError`` that says what to pass (diffusers: ``IndexError``); ``timestep=None``
is allowed and means "the current step" (``begin_index``, or 0, when none is in progress); ``set_begin_index`` checks
its argument against the schedule; stepping past the end of the schedule raises.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.utils import BaseOutput

from ..core.sigmas import karras_sigma_at_descending_index
from ..kernels import scale_model_input as _scale_model_input

__all__ = [
    "SigmaScheduleMixin", "DenoisingStepOutput", "check_noise_constants", "check_num_inference_steps",
    "check_one_schedule_source", "check_descending_sigmas", "karras_grid_sigmas",
]


# -- schedule checks -------------------------------------------------------------------------------------------------
def check_noise_constants(sigma_min: float, sigma_max: float, sigma_data: float | None = None,
                          rho: float | None = None, num_train_timesteps: int | None = None) -> None:
    """Constructor checks: 0 < sigma_min < sigma_max; sigma_data, rho > 0; num_train_timesteps an integer >= 2
    (each checked only when given)."""
    if num_train_timesteps is not None and (not isinstance(num_train_timesteps, int)
                                            or isinstance(num_train_timesteps, bool) or num_train_timesteps < 2):
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    for name, value in (("sigma_data", sigma_data), ("rho", rho)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {name}={value}.")


def check_num_inference_steps(num_inference_steps, maximum: int | None = None) -> int:
    """An integer >= 1 (not a bool), and <= ``maximum`` (= num_train_timesteps) when given."""
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
    if maximum is not None and num_inference_steps > maximum:
        raise ValueError(f"`num_inference_steps` ({num_inference_steps}) cannot exceed `num_train_timesteps` "
                         f"({maximum}); pass explicit `sigmas` for a finer schedule.")
    return num_inference_steps


def check_one_schedule_source(**sources) -> str:
    """The name of the only argument of ``sources`` that is not None (``set_timesteps``' alternatives)."""
    given = [name for name, value in sources.items() if value is not None]
    if len(given) != 1:
        names = ", ".join(f"`{name}`" for name in sources)
        raise ValueError(f"Pass exactly one of {names} to set_timesteps (got {len(given)}).")
    return given[0]


def check_descending_sigmas(sigmas: Sequence[float] | torch.Tensor, lower: float, upper: float | None = None,
                            name: str = "sigmas", hint: str = "") -> torch.Tensor:
    """``sigmas`` as a flat float64 CPU tensor after checking it is non-empty, finite, strictly descending and inside
    (lower, upper] (upper = None: no upper bound). ``hint`` is appended to the error messages."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    shown = values.tolist()
    if len(values) == 0 or not torch.isfinite(values).all() or (values[1:] >= values[:-1]).any():
        raise ValueError(f"`{name}` must be non-empty, finite and strictly descending, got {shown}{hint}.")
    if upper is None:
        if values.min() <= lower:
            raise ValueError(f"`{name}` must be > {lower}, got {shown}{hint}.")
    elif values.min() <= lower or values.max() > upper:
        raise ValueError(f"`{name}` must lie in (sigma_min, sigma_max] = ({lower}, {upper}], got {shown}{hint}.")
    return values


def karras_grid_sigmas(timesteps: Sequence[int], num_train_timesteps: int, sigma_min: float, sigma_max: float,
                       rho: float) -> torch.Tensor:
    """Descending float64 sigmas of the grid indices ``timesteps`` (any order, as openai's ``ts``; diffusers' CM
    scheduler wants them descending) on the ``num_train_timesteps``-point descending Karras grid (0 = sigma_max).
    The last index, sigma_min, is the implicit end point of every schedule and is refused."""
    last = num_train_timesteps - 1
    values = list(timesteps)
    idx = sorted(int(t) for t in values) if all(float(t) == int(t) for t in values) else None
    if not idx or len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= last:
        raise ValueError(
            f"`timesteps` must be distinct grid indices in [0, {last - 1}] (index {last} is sigma_min, the implicit "
            f"end point: leave it out), got {values}."
        )
    return torch.tensor([karras_sigma_at_descending_index(i, num_train_timesteps, sigma_min, sigma_max, rho)
                         for i in idx], dtype=torch.float64)


def _is_integer_timestep(timestep) -> bool:
    if isinstance(timestep, torch.Tensor):
        return not (timestep.is_floating_point() or timestep.is_complex())
    return isinstance(timestep, int) and not isinstance(timestep, bool)


# -- step output ------------------------------------------------------------------------------------------------------
@dataclass
class DenoisingStepOutput(BaseOutput):
    """prev_sample: the sample after this step; denoised: the clean estimate the step computed (also readable as
    ``pred_original_sample``, the name diffusers' DDIM / Euler / EDM scheduler outputs use). Both fields, in this
    order, are also the ``return_dict=False`` tuple."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor

    @property
    def pred_original_sample(self) -> torch.Tensor:
        """The clean estimate (= ``denoised``)."""
        return self.denoised


# -- the mixin --------------------------------------------------------------------------------------------------------
class SigmaScheduleMixin:
    """Step-index protocol, ``add_noise`` and ``compatibles`` of a sigma-space scheduler. Put it first among the
    bases (``class S(SigmaScheduleMixin, SchedulerMixin, ConfigMixin)``) so that its ``_get_compatibles`` is used.

    A subclass's ``set_timesteps`` sets ``timesteps`` and ``timestep_sigmas`` (same length: the level of each model
    evaluation) and calls :meth:`_reset_step_index`; its ``step`` calls :meth:`_current_step_index` with the
    timestep it was given and then stores the next index (``scale_model_input`` is shared: c_in at that level).
    """

    _step_index: int | None = None
    _begin_index: int | None = None

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the current model evaluation; None until the first ``scale_model_input`` /
        ``step`` after ``set_timesteps``, +1 per ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index the next sampling run starts at, if :meth:`set_begin_index` was called since ``set_timesteps``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` whatever timestep is passed first (diffusers'
        img2img pipelines call it after ``set_timesteps``). Also fixes the level ``add_noise`` uses before the first
        step."""
        n = len(self.timesteps)
        if not isinstance(begin_index, int) or isinstance(begin_index, bool) or not 0 <= begin_index < n:
            raise ValueError(f"begin_index must be an integer in [0, {n - 1}] (an index into scheduler.timesteps), "
                             f"got {begin_index!r}.")
        self._begin_index = begin_index

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor,
                           schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``), by equality as in
        diffusers; of several equal entries the second is taken (a second-order scheduler's repeated timestep: the
        start of a new step, so a run that starts there does not skip a level)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        value = torch.as_tensor(timestep).to(schedule_timesteps.device).flatten()
        if value.numel() == 0 or (value != value[0]).any():
            raise ValueError(f"a step takes one timestep for the whole batch, got {timestep!r}.")
        indices = (schedule_timesteps == value[0]).nonzero().flatten()
        if len(indices) == 0:
            hint = (" It is an integer: pass values of `scheduler.timesteps`, not indices from "
                    "`enumerate(scheduler.timesteps)`." if _is_integer_timestep(timestep) else "")
            shown = schedule_timesteps.tolist()
            shown = f"{shown[:6]}"[:-1] + f", ... ({len(shown)} values)]" if len(shown) > 8 else f"{shown}"
            raise ValueError(
                f"timestep {float(value[0])!r} is not one of scheduler.timesteps {shown}.{hint} "
                "Pass a value of `scheduler.timesteps` (after set_timesteps), call `set_begin_index`, or use "
                "`add_noise_at_sigma` for an arbitrary noise level."
            )
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep: float | torch.Tensor | None) -> None:
        """diffusers' rule: ``begin_index`` if set, else the position of ``timestep`` (None: index 0)."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
        elif timestep is None:
            self._step_index = 0
        else:
            self._step_index = self.index_for_timestep(timestep)

    def _current_step_index(self, timestep: float | torch.Tensor | None = None) -> int:
        """The index of the model evaluation in progress (located from ``timestep`` if none is); raises once the
        schedule is used up."""
        if self._step_index is None:
            self._init_step_index(timestep)
        n = len(self.timesteps)
        if self._step_index >= n:
            raise ValueError(f"step() called more times than there are timesteps: all {n} model evaluations of this "
                             "schedule are done; call set_timesteps() to start a new sampling run.")
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """c_in(sigma) x = x / sqrt(sigma^2 + sigma_data^2) at the level of ``timestep`` (a value of ``timesteps``;
        None: the current model evaluation). Locates the step index when none is in progress."""
        sigma = self.timestep_sigmas[self._current_step_index(timestep)]
        return _scale_model_input(sample, sigma, self.config.sigma_data)

    # -- noising --------------------------------------------------------------------------------------------------
    def sigmas_for_timesteps(self, timesteps: float | torch.Tensor) -> torch.Tensor:
        """float64 noise levels of ``timesteps`` (values of ``scheduler.timesteps``; a 0-d value or one per sample),
        located as diffusers' ``add_noise`` does: by value when no ``begin_index`` is set, otherwise the current
        step's level (or ``begin_index``'s before the first step) for every entry."""
        values = torch.as_tensor(timesteps)
        flat = values.flatten()
        if self._begin_index is None:
            schedule = self.timesteps.to(flat.device)
            indices = [self.index_for_timestep(t, schedule) for t in flat]
        else:
            start = self._current_step_index() if self._step_index is not None else self._begin_index
            indices = [start] * flat.numel()
        return self.timestep_sigmas[indices].reshape(values.shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: float | torch.Tensor) -> torch.Tensor:
        """x0 + sigma noise at the levels of ``timesteps``, values taken from ``scheduler.timesteps`` (diffusers'
        ``add_noise``): a scalar for the whole batch or one per sample. For a noise level itself use
        :meth:`add_noise_at_sigma`."""
        return self.add_noise_at_sigma(original_samples, noise, self.sigmas_for_timesteps(timesteps))

    def add_noise_at_sigma(self, original_samples: torch.Tensor, noise: torch.Tensor,
                           sigmas: float | torch.Tensor) -> torch.Tensor:
        """x_sigma = x0 + sigma noise for any sigma (a scalar or one per sample), in the samples' dtype."""
        sigmas = torch.as_tensor(sigmas, device=original_samples.device, dtype=original_samples.dtype)
        if sigmas.ndim == 1:
            sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + sigmas * noise

    def __len__(self) -> int:
        """``num_train_timesteps``: the size of the grid that ``set_timesteps(timesteps=...)`` indexes."""
        return self.config.num_train_timesteps

    # -- config swaps ---------------------------------------------------------------------------------------------
    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """The class itself and every name in ``_compatibles``, looked up in diffusers and then in
        ``gensample.schedulers`` (diffusers' own lookup only knows the ``diffusers`` namespace, so it drops our
        classes, including the scheduler itself)."""
        namespaces = [importlib.import_module("diffusers"), importlib.import_module(__name__.rsplit(".", 1)[0])]
        found = []
        for name in dict.fromkeys([cls.__name__, *cls._compatibles]):
            for namespace in namespaces:
                candidate = getattr(namespace, name, None)
                if isinstance(candidate, type):
                    found.append(candidate)
                    break
        return found

