"""Noise Consistency Training (NCT; Luo, Xue, Hu, Tang, "Noise Consistency Training: A Native Approach for One-Step
Generator in Learning Additional Controls", arXiv 2506.19741): teach a frozen one-step generator f_theta(z) a new
control c through an adapter phi, without images.

Per step (the paper's Algorithm 1, sec. 3.2-3.3):

    z ~ N(0, I);  x = f_theta(z) (frozen base);  c ~ p(c | x) (a control model, :mod:`gensample.controls`)
    k ~ U{0, ..., N-1};  eps ~ N(0, I);  z_t = alpha_t z + sigma_t eps  with alpha_t = sqrt(1 - sigma_t^2)
    L_con   = d( f_{theta,phi}(z_{t_{k+1}}, c),  sg[ f_{theta,phi}(z_{t_k}, c) ] )    same z and eps at both levels
    L_bound = d( f_{theta,phi}(z, c),  x )                                             the coupled pair keeps the base
    primal step on phi:  L_con + lambda L_bound
    dual step:           lambda <- max(0, lambda + eta_lambda (L_bound - xi))         (Definition 1, Eq. 12)

so that min L_con s.t. L_bound <= xi (Definition 1). z_t stays N(0, I) at every t, and (z_t, c) goes from coupled
(t = 0) to independent (t = 1, Lemma 1): the consistency loss carries the control from the coupled end to plain noise.

Choices (the authors' repository, github.com/Luo-Yihong/NCT, could not be read here: the stored-code index and the
mirror have no copy of it, and the paper's equations were not legible in the text we had; see the reference notes
ctm-scott-nct-lcsc-video.md, sec. 3), so each item below is ours unless marked [paper]:

* the schedule sigma_t: ``"sin"`` (default), sigma_t = sin(pi t / 2), alpha_t = cos(pi t / 2): the angle between the
  coupled noise z and the fresh eps grows uniformly in t, so every adjacent pair is equally correlated
  (corr(z_{t_k}, z_{t_{k+1}}) = cos(pi / 2N)); ``"linear"``, sigma_t = t, is the alternative. sigma_0 = 0, sigma_1 = 1
  [paper].
* the grid: t_k = k / N, k = 0..N, N = ``num_levels`` (default 4); k uniform on {0..N-1}, one draw per sample. N = 4
  is sized for our short CPU runs: the control reaches t = 1 (plain noise) through N hops, and on the digits N = 1
  did not learn the control at all in 300 steps (benchmarks/RESULTS.md, NCT section).
* d: the mean squared error per sample (``"l2"``, default) or iCT's pseudo-Huber on the per-sample L2 norm,
  c = 0.00054 sqrt(dim) (``"pseudo_huber"``) [paper: "l2 loss or pseudo-Huber loss"]. On the digits l2 learned the
  class control several times faster (59% vs 22% accuracy after 500 steps at batch 16); xi is in d's units
  (default 0.01 under l2: an RMS difference of 0.1 per pixel in [-1, 1]).
* the target is the current adapter under stop-gradient, not an EMA [paper]; the EMA of phi (the Trainer's evaluation
  EMA, ``ema_modules``) is for evaluation only [paper: decay 0.9999; our runs are 1000x shorter, see the CLI default].
* the dual variable: projected gradient ascent lambda <- max(0, lambda + eta (mean_batch L_bound - xi)) after each
  optimizer step, using that step's batch(es) [the form is the standard one, unverified against the code]; lambda_0
  = ``lambda_init``. lambda is a buffer, so checkpoints hold it and a resume continues from it.
* the adapter: :class:`gensample.models.adapter.ZeroConvAdapter` for UNet2DModel bases, diffusers' ``ControlNetModel``
  for UNet2DConditionModel bases [paper: ControlNet].
* the base output x enters the control model clamped to [-1, 1], the image the base's pipeline shows; the losses
  compare unclamped outputs (the clamp would cut gradients at saturated pixels).
* ablations of the paper's Table (no consistency loss / no boundary loss / fixed lambda) are flags:
  ``consistency_weight=0``; ``lambda_init=0, dual_lr=0``; ``dual_lr=0``.

No training images enter: the Trainer's dataset only sets the batch size (see ``gensample train nct``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from ..controls import Control
from ..core.losses import get_distance, scale_or_default
from ..core.parametrization import ConsistencyFunction
from ..models.adapter import ControlledUNet, ZeroConvAdapter, controlnet_from_unet
from .base import TrainingMethod

__all__ = ["NOISE_SCHEDULES", "ConsistencyOneStep", "LCMOneStep", "NoiseConsistencyTraining", "dual_update",
           "noise_levels", "one_step_generator"]

NOISE_SCHEDULES = ("sin", "linear")


def noise_levels(num_levels: int, schedule: str = "sin") -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_k, sigma_k) at t_k = k / N, k = 0..N (float64, N + 1 values each), alpha = sqrt(1 - sigma^2), with
    sigma_0 = 0 and sigma_N = 1 exactly. ``"sin"``: sigma = sin(pi t / 2); ``"linear"``: sigma = t."""
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
        raise ValueError(f"num_levels must be an integer >= 1, got {num_levels!r}.")
    t = torch.arange(num_levels + 1, dtype=torch.float64) / num_levels
    if schedule == "sin":
        sigma, alpha = torch.sin(math.pi / 2 * t), torch.cos(math.pi / 2 * t)
    elif schedule == "linear":
        sigma = t
        alpha = (1 - t.square()).clamp_min(0).sqrt()
    else:
        raise ValueError(f"noise schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}.")
    sigma[0], sigma[-1], alpha[0], alpha[-1] = 0.0, 1.0, 1.0, 0.0
    return alpha, sigma


def dual_update(lam: float, bound: float, xi: float, lr: float) -> float:
    """Projected dual ascent on lambda >= 0: max(0, lambda + lr (L_bound - xi)). A violated constraint
    (L_bound > xi) raises lambda; a slack one lowers it, never below 0."""
    return max(0.0, lam + lr * (bound - xi))


class ConsistencyOneStep(nn.Module):
    """f(z) = f_theta(sigma_max z, sigma_max): one step of a consistency model (what its pipeline's 1-step sampling
    computes), with the adapters of ``controlled`` applied when controls are given."""

    def __init__(self, controlled: ControlledUNet, sigma_max: float, sigma_min: float, sigma_data: float):
        super().__init__()
        self.controlled = controlled
        self.function = ConsistencyFunction(controlled, sigma_data=sigma_data, sigma_min=sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        cfg = self.controlled.unet.config
        size = cfg.sample_size
        return (cfg.in_channels, *((size, size) if isinstance(size, int) else size))

    def forward(self, z: torch.Tensor, controls: list | None = None) -> torch.Tensor:
        return self.function(self.sigma_max * z, self.sigma_max, controls=controls)


class LCMOneStep(nn.Module):
    """An LCM-style one-step generator on a UNet2DConditionModel: at the scheduler's last training timestep T,
    x = c_skip(T) z + c_out(T) x0_hat(z), x0_hat = (z - sqrt(1 - abar_T) eps_hat) / sqrt(abar_T) (diffusers'
    ``LCMScheduler.step``, epsilon prediction), with a fixed prompt embedding."""

    def __init__(self, controlled: ControlledUNet, scheduler, encoder_hidden_states: torch.Tensor,
                 timestep: int | None = None):
        super().__init__()
        if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
            raise ValueError("LCMOneStep supports epsilon prediction only, got "
                             f"{scheduler.config.prediction_type!r}.")
        self.controlled = controlled
        self.timestep = int(scheduler.config.num_train_timesteps - 1 if timestep is None else timestep)
        abar = float(scheduler.alphas_cumprod[self.timestep])
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(self.timestep)
        self.scales = (math.sqrt(abar), math.sqrt(1 - abar), float(c_skip), float(c_out))
        self.register_buffer("encoder_hidden_states", encoder_hidden_states.detach().clone(), persistent=False)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        cfg = self.controlled.unet.config
        size = cfg.sample_size
        return (cfg.in_channels, *((size, size) if isinstance(size, int) else size))

    def forward(self, z: torch.Tensor, controls: list | None = None) -> torch.Tensor:
        a, s, c_skip, c_out = self.scales
        ehs = self.encoder_hidden_states.expand(z.shape[0], *self.encoder_hidden_states.shape[1:])
        t = torch.full((z.shape[0],), self.timestep, device=z.device, dtype=torch.long)
        eps = self.controlled(z, t, controls, encoder_hidden_states=ehs)
        return c_skip * z + c_out * (z - s * eps) / a


def one_step_generator(base: Any, adapter: nn.Module | None = None, **kwargs: Any) -> nn.Module:
    """The one-step generator of ``base`` with ``adapter`` attached: a ConsistencyPipeline(-family) pipeline ->
    :class:`ConsistencyOneStep`; a (UNet2DConditionModel, LCM-style scheduler) pair -> :class:`LCMOneStep`
    (``kwargs``: ``encoder_hidden_states``, ``timestep``). Anything else: a ValueError saying what is one-step
    capable."""
    from gensample.pipelines import ConsistencyPipeline

    adapters = [] if adapter is None else [adapter]
    if isinstance(base, ConsistencyPipeline):
        unet, cfg = base.unet, base.scheduler.config
        if unet.config.num_class_embeds is not None:
            raise ValueError("base: NCT adapts an unconditional one-step generator f(z); this ConsistencyPipeline's "
                             "UNet is class-conditional. Pass an unconditional base.")
        return ConsistencyOneStep(ControlledUNet(unet, adapters), cfg.sigma_max, cfg.sigma_min, cfg.sigma_data)
    if isinstance(base, tuple) and len(base) == 2 and isinstance(base[0], UNet2DConditionModel):
        return LCMOneStep(ControlledUNet(base[0], adapters), base[1], **kwargs)
    raise ValueError(f"base: {type(base).__name__} is not a one-step generator. NCT needs a ConsistencyPipeline "
                     "(e.g. assets/pipelines/ict-digits, or the pipeline/ folder of `gensample train ict`) or a "
                     "(UNet2DConditionModel, LCMScheduler) pair; EDM/CTM/latent pipelines are not supported.")


class NoiseConsistencyTraining(TrainingMethod):
    """NCT (see the module docstring). ``generator`` is a one-step generator whose ``controlled.adapters`` holds the
    one trainable adapter; build both from a base with :meth:`from_base`."""

    method_name = "nct"

    def __init__(self, generator: nn.Module, control: Control, *, num_levels: int = 4, noise_schedule: str = "sin",
                 distance: str = "l2", huber_c: float | None = None, xi: float = 0.01,
                 dual_lr: float = 0.1, lambda_init: float = 1.0, consistency_weight: float = 1.0,
                 base_scheduler: Any = None, adam_betas: tuple[float, float] = (0.9, 0.95)):
        super().__init__()
        if len(generator.controlled.adapters) != 1:
            raise ValueError("the generator must hold exactly one (trainable) adapter.")
        if not isinstance(control, Control):
            raise ValueError(f"control must be a gensample.controls.Control, got {type(control).__name__}; wrap a "
                             "callable with gensample.controls.get_control(fn).")
        for name, value in (("xi", xi), ("dual_lr", dual_lr), ("lambda_init", lambda_init),
                            ("consistency_weight", consistency_weight)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if xi <= 0:
            raise ValueError(f"xi must be > 0 (the margin of the boundary constraint L_bound <= xi), got {xi}; e.g. "
                             "xi=0.5. To drop the boundary loss use lambda_init=0 and dual_lr=0.")
        if dual_lr < 0 or lambda_init < 0 or consistency_weight < 0:
            raise ValueError("dual_lr, lambda_init and consistency_weight must be >= 0 (lambda is a Lagrange "
                             f"multiplier), got {dual_lr}, {lambda_init}, {consistency_weight}.")
        if distance not in ("pseudo_huber", "l2"):
            raise ValueError(f"distance must be 'pseudo_huber' or 'l2', got {distance!r}.")
        self.generator = generator
        generator.controlled.unet.requires_grad_(False).eval()
        self.control = control
        self.alpha, self.sigma = noise_levels(num_levels, noise_schedule)
        self.num_levels, self.noise_schedule = num_levels, noise_schedule
        self.distance_name, self.distance, self.huber_c = distance, get_distance(distance), huber_c
        self.xi, self.dual_lr, self.lambda_init = float(xi), float(dual_lr), float(lambda_init)
        self.consistency_weight = float(consistency_weight)
        self.base_scheduler = base_scheduler
        self.adam_betas = tuple(adam_betas)
        self.register_buffer("dual_lambda", torch.tensor(float(lambda_init), dtype=torch.float64))
        self._bound_sum, self._bound_count = 0.0, 0
        self._check_adapter_control()

    @classmethod
    def from_base(cls, base: Any, control: Control, adapter: nn.Module | None = None,
                  generator_kwargs: dict | None = None, **kwargs: Any) -> NoiseConsistencyTraining:
        """NCT on ``base`` (see :func:`one_step_generator`) with a new adapter for ``control`` (a
        :class:`ZeroConvAdapter` initialised from a UNet2DModel base, a ``ControlNetModel`` from a
        UNet2DConditionModel base) unless ``adapter`` is given."""
        probe = one_step_generator(base, None, **(generator_kwargs or {}))  # validates the base first
        unet = probe.controlled.unet
        if adapter is None:
            if isinstance(unet, UNet2DModel):
                shape = control.control_shape(probe.latent_shape)
                adapter = ZeroConvAdapter.from_unet(
                    unet, control_type=control.kind, num_classes=control.num_classes,
                    control_channels=shape[0] if shape else 1, control_size=shape[-1] if shape else None,
                    control_range=list(control.value_range))
            else:
                if control.kind == "class":
                    raise ValueError("a class control on a UNet2DConditionModel base is not supported; use an image "
                                     "control (or one-hot label planes through a callable control).")
                adapter = controlnet_from_unet(unet, control.control_shape(probe.latent_shape)[0])
        generator = one_step_generator(base, adapter, **(generator_kwargs or {}))
        scheduler = getattr(base, "scheduler", None)
        return cls(generator, control, base_scheduler=scheduler, **kwargs)

    def _check_adapter_control(self) -> None:
        cfg = getattr(self.adapter, "config", None)
        kind = getattr(cfg, "control_type", None)
        if kind is not None and kind != self.control.kind:
            raise ValueError(f"the adapter takes {kind} controls but the control model gives {self.control.kind} "
                             "controls; build the adapter for this control.")

    # -- roles ----------------------------------------------------------------------------------------------------
    @property
    def adapter(self) -> nn.Module:
        """The trainable adapter (registered once, inside the generator)."""
        return self.generator.controlled.adapters[0]

    @property
    def base_unet(self) -> nn.Module:
        """The frozen base UNet (registered once, inside the generator)."""
        return self.generator.controlled.unet

    def trainable_groups(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter}

    def optimizer_settings(self) -> dict[str, dict[str, Any]]:
        return {"adapter": {"betas": self.adam_betas}}  # NCT App. B: AdamW betas (0.9, 0.95)

    def train(self, mode: bool = True) -> NoiseConsistencyTraining:
        super().train(mode)
        self.base_unet.eval()  # frozen: never its dropout
        self.control.eval()
        return self

    @property
    def lam(self) -> float:
        return float(self.dual_lambda)

    # -- the objective --------------------------------------------------------------------------------------------
    def _d(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kwargs = {"c": scale_or_default(self.huber_c, x[0].numel())} if self.distance_name == "pseudo_huber" else {}
        return self.distance(x, y, **kwargs)

    def noise_pair(self, z: torch.Tensor, eps: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_{t_{k+1}}, z_{t_k}): the less-coupled input and the more-coupled one, same z and eps."""
        shape = (-1,) + (1,) * (z.ndim - 1)
        a, s = self.alpha.to(z.device), self.sigma.to(z.device)
        hi = a[k + 1].reshape(shape).to(z.dtype) * z + s[k + 1].reshape(shape).to(z.dtype) * eps
        lo = a[k].reshape(shape).to(z.dtype) * z + s[k].reshape(shape).to(z.dtype) * eps
        return hi, lo

    def losses(self, z: torch.Tensor, eps: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_con, L_bound and the total for given draws (the random draws of :meth:`forward` made explicit)."""
        with torch.no_grad():
            x_base = self.generator(z)
            c = self.control(x_base.clamp(-1, 1))
        b = z.shape[0]
        out: dict[str, torch.Tensor] = {}
        if self.consistency_weight > 0:
            z_hi, z_lo = self.noise_pair(z, eps, k)
            both = self.generator(torch.cat([z_hi, z]), controls=[torch.cat([c, c])])  # one pass: student, boundary
            student, x_adapted = both[:b], both[b:]
            with torch.no_grad():
                target = self.generator(z_lo, controls=[c])
            out["consistency"] = self._d(student, target).mean()
        else:
            x_adapted = self.generator(z, controls=[c])
        out["boundary"] = self._d(x_adapted, x_base).mean()
        loss = self.dual_lambda.to(out["boundary"].dtype) * out["boundary"]
        if "consistency" in out:
            loss = loss + self.consistency_weight * out["consistency"]
        out["loss"] = loss
        return out

    def forward(self, batch: Any, step: int, group: str = "adapter") -> dict[str, torch.Tensor]:
        """``batch`` only sets the batch size (NCT uses no images). Draws z, eps, k; returns the losses and lambda."""
        size = (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]
        device = self.dual_lambda.device
        z = torch.randn(size, *self.generator.latent_shape, device=device)
        eps = torch.randn_like(z)
        k = torch.randint(0, self.num_levels, (size,), device=device)
        out = self.losses(z, eps, k)
        self._bound_sum += float(out["boundary"].detach())
        self._bound_count += 1
        out["lambda"] = self.dual_lambda.detach().float()
        return out

    def after_optimizer_step(self, step: int) -> None:
        """The dual step on lambda with this step's mean boundary loss (then the accumulator is reset)."""
        if self._bound_count and self.dual_lr > 0:
            bound = self._bound_sum / self._bound_count
            self.dual_lambda.fill_(dual_update(float(self.dual_lambda), bound, self.xi, self.dual_lr))
        self._bound_sum, self._bound_count = 0.0, 0

    # -- export ---------------------------------------------------------------------------------------------------
    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        from gensample.pipelines import NCTPipeline

        if not isinstance(self.base_unet, UNet2DModel) or self.base_scheduler is None:
            raise ValueError("NCTPipeline serves ConsistencyPipeline bases; for a UNet2DConditionModel base save the "
                             "trained ControlNetModel (method.adapter.save_pretrained(folder)).")
        return NCTPipeline(unet=self.base_unet, scheduler=self.base_scheduler, adapter=eval_modules["adapter"])

    def method_config(self) -> dict[str, Any]:
        return dict(num_levels=self.num_levels, noise_schedule=self.noise_schedule, distance=self.distance_name,
                    huber_c=self.huber_c, xi=self.xi, dual_lr=self.dual_lr, lambda_init=self.lambda_init,
                    consistency_weight=self.consistency_weight, control=self.control.config(),
                    adam_betas=list(self.adam_betas))
