"""SCott: Stochastic Consistency Distillation (Liu et al., AAAI 2025, arXiv 2403.01505): consistency distillation in
which the teacher's step from t_n down to t_m is an SDE solve, with classifier-free guidance w as a student input and
an optional adversarial term. No public implementation exists; the choices where the paper (or our secondary notes
on it) is unclear are marked "choice" below and exposed as arguments.

Everything runs in VE sigma space (x_sigma = x_0 + sigma z) on an ascending grid sigma_1 < ... < sigma_N; a VP
teacher enters through :func:`gensample.methods.teachers.as_denoiser`. Per generator step (paper sec. 3; LCM
Algorithm 1 for the guided-distillation frame):

    n ~ U{skip, ..., N-1} per sample,  t_n = sigma_n,  t_m = sigma_{n - skip}
    w ~ U[w_min, w_max] per sample                                   (one student serves a range of w)
    x_n   = x_0 + t_n z
    pred  = f_theta(x_n, t_n, w, c)                                   (consistency function, boundary f(x, sigma_1) = x)
    x_m   = SDE-Solve_phi^w(x_n; t_n -> t_m, h sub-steps)             (no grad; teacher D_w with CFG scale w)
    tgt   = f_theta-(x_m, t_m, w, c)                                  (no grad; theta- = EMA of theta, or theta)
    L_CD  = mean d(pred, tgt)                                         (lambda(t_n) = 1, as LCM)
    L_adv = mean(-D_psi(pred + s xi, s, c)),  s ~ logN(P_mean, P_std) (generator hinge term)
    loss  = L_CD + lambda_adv L_adv
and, when the adversarial term is on, a discriminator step in the same training step (the Trainer's second group):
    L_D = mean relu(1 - D_psi(x_0 + s xi', s, c)) + mean relu(1 + D_psi(pred + s xi, s, c))    (pred without grad)

The teacher's solve (:func:`gensample.core.sampling.sde_solve`) splits [t_m, t_n] into h sub-steps of
``step_fn``: stochastic DDIM with eta (``solver="ddim"``), the first-order ER-SDE solver with a noise-scale function
phi (``solver="er-sde"``), or the deterministic DDIM / Euler step of the probability-flow ODE (``solver="ode"``).
``solver="ode"``, ``solver="ddim"`` with eta = 0 and ``solver="er-sde"`` with phi = "ode" are all plain consistency
distillation (CD) through the very same code, and consume no random numbers in the teacher.

Choices ([unverified] items of the reference notes, ../shared/reference/ctm-scott-nct-lcsc-video.md sec. 2):

* Sub-step spacing: the h sub-steps are equally spaced in sigma^(1/rho) between t_n and t_m (the spacing of the Karras
  grid; SCott's equal spacing on the DDPM index, "t_m = t_n - 24 with h = 3", is the VP analogue). t_n is drawn over
  every grid index with a t_m below it (LCM draws over the coarse skipping grid; with ``skip=1`` they coincide).
* Distance: the pseudo-Huber distance of the core (iCT's form on the per-sample L2 norm, c = 0.00054 sqrt(d)) by
  default; any core distance by name (``"pseudo_huber_elementwise"`` with ``huber_c=0.001`` is LCM's form).
* Target: an EMA of the student with rate 0.95 (SCott's [2nd-hand] setting, as LCM) or, with ``target_ema=None``,
  the current student under stop-gradient. Teacher and EMA target run in eval mode.
* Guidance: D_w = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)) (Ho & Salimans 2022; w = 1 is the
  conditional model alone, one network call). LCM samples its scale in [w_min, w_max] = [2, 14] in its "w + 1"
  convention; ours is diffusers' ``guidance_scale`` (w = 1: no guidance).
* Adversarial term: ADD/UFOGen style, because SCott's discriminator is conditioned on the timestep: the student's
  clean estimate and a real image are both noised to the same level s (log-normal, EDM's P_mean = -1.2, P_std = 1.2
  by default) and scored by D(x_s, s, c). Hinge losses (:mod:`gensample.models.discriminator`). lambda_adv = 0.4
  fixed (paper) or ``adv_weight_mode="adaptive"`` (lambda_adv times VQGAN's gradient-norm ratio on the student's last
  layer, clamped to [0.01, 10], as CTM). The discriminator takes an optimizer step after every generator step (both
  groups each training step), so runs with and without the term make the same number of student updates.
  Discriminators: :mod:`gensample.models.scott_discriminator` (the teacher's encoder with LoRA, as the paper, or a
  small stand-alone one).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core.losses import get_distance
from ..core.parametrization import ConsistencyFunction, per_sample
from ..core.sampling import check_eta, er_sde_noise_scale, er_sde_step, sde_solve, stochastic_ddim_step
from ..core.sigmas import RHO, SIGMA_DATA, karras_sigmas
from ..models.discriminator import hinge_d_loss, hinge_g_loss
from .base import TrainingMethod

__all__ = ["SOLVERS", "ADV_WEIGHT_MODES", "ClassifierFreeGuidance", "GuidedConsistencyFunction", "SCottDistillation",
           "guided_teacher", "check_student_matches_teacher"]

SOLVERS = ("ddim", "er-sde", "ode")
ADV_WEIGHT_MODES = ("fixed", "adaptive")
#: clamps of the adaptive adversarial weight (VQGAN / CTM ``get_GAN_loss``)
ADV_WEIGHT_CLAMP = (0.01, 10.0)


def _per_sample_scale(guidance_scale, x: torch.Tensor) -> torch.Tensor | None:
    """w as a float32 tensor of shape (B,) on x's device (None stays None)."""
    if guidance_scale is None:
        return None
    w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device).reshape(-1)
    return w.expand(x.shape[0])


class ClassifierFreeGuidance(nn.Module):
    """D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)) around a class-conditional
    denoiser D(x, sigma, class_labels=...) whose label ``null_label`` (K) is the unconditional one (gensample's CFG
    convention, ``EDMPipeline(num_classes=K)``). Both passes run as one batched call of 2B; with every w = 1 only the
    conditional pass runs. ``null_label=None``: an unconditional denoiser, which refuses w != 1.

    ``forward(x, sigma, guidance_scale=None, class_labels=None, **kwargs)``; ``guidance_scale`` is a number or one
    value per sample (None: 1).
    """

    def __init__(self, denoiser: nn.Module, null_label: int | None):
        super().__init__()
        self.denoiser = denoiser
        self.null_label = None if null_label is None else int(null_label)

    @property
    def supports_guidance(self) -> bool:
        return self.null_label is not None

    def forward(self, x: torch.Tensor, sigma, guidance_scale=None, class_labels: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        w = _per_sample_scale(guidance_scale, x)
        if self.null_label is None:
            if w is not None and bool((w != 1).any()):
                raise ValueError("a guidance scale != 1 needs a classifier-free-guidance teacher (a class-conditional "
                                 "EDM pipeline with num_classes, `gensample train edm --class-conditional "
                                 "--label-dropout 0.1`); this teacher is unconditional. Use guidance scale 1.")
            if class_labels is not None:
                raise ValueError("class labels given, but the teacher is unconditional.")
            return self.denoiser(x, sigma, **kwargs)
        if class_labels is None:
            raise ValueError("a class-conditional teacher needs `class_labels` (labelled training batches).")
        if w is None or bool((w == 1).all()):
            return self.denoiser(x, sigma, class_labels=class_labels, **kwargs)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        labels = torch.cat([class_labels, torch.full_like(class_labels, self.null_label)])
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=labels, **kwargs)
        cond, uncond = both.chunk(2)
        return uncond + per_sample(w, x).to(x.dtype) * (cond - uncond)


def guided_teacher(teacher: Any, num_classes: int | None = None) -> ClassifierFreeGuidance:
    """A frozen :class:`ClassifierFreeGuidance` teacher from anything
    :func:`gensample.methods.teachers.as_denoiser` accepts (e.g. an ``EDMPipeline``); ``num_classes`` defaults to
    the pipeline's config ``num_classes`` (None: unconditional)."""
    from .teachers import as_denoiser

    if num_classes is None:
        num_classes = getattr(getattr(teacher, "config", None), "num_classes", None)
    denoiser = as_denoiser(teacher).requires_grad_(False).eval()
    return ClassifierFreeGuidance(denoiser, num_classes)


class GuidedConsistencyFunction(ConsistencyFunction):
    """f_theta(x, sigma, w, c) = c_skip(sigma) x + c_out(sigma) F_theta(c_in x, c_noise, c, w): the core
    :class:`~gensample.core.parametrization.ConsistencyFunction` (boundary f(x, sigma_min) = x) whose backbone also
    takes ``guidance_scale`` (e.g. :class:`gensample.models.scott_student.SCottStudentUNet`)."""

    def forward(self, x: torch.Tensor, sigma, guidance_scale=None, **kwargs: Any) -> torch.Tensor:
        return super().forward(x, sigma, guidance_scale=_per_sample_scale(guidance_scale, x), **kwargs)


def check_student_matches_teacher(student_unet: nn.Module, teacher_unet: nn.Module) -> None:
    """A ValueError naming the fix when the student's image shape (channels, size) differs from the teacher's."""
    s, t = student_unet.config, teacher_unet.config
    if (s.in_channels, s.out_channels, s.sample_size) != (t.in_channels, t.out_channels, t.sample_size):
        raise ValueError(
            f"the student is a {s.in_channels}-channel {s.sample_size}x{s.sample_size} model but the teacher is "
            f"{t.in_channels}-channel {t.sample_size}x{t.sample_size}: the student distils the teacher's images. "
            "Build the student from the teacher (SCottStudentUNet.from_teacher) or pass an --init-from pipeline "
            "distilled from this teacher.")


@contextlib.contextmanager
def _frozen(module: nn.Module | None) -> Iterator[None]:
    """Parameters of ``module`` without requires_grad inside the block (the generator's adversarial term must not
    leave gradients on the discriminator); restored afterwards."""
    params = [] if module is None else [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class SCottDistillation(TrainingMethod):
    """SCott (see the module docstring).

    Args:
        student: ``student(x, sigma, guidance_scale, **cond) -> x_0`` estimate, a consistency function in VE space
            (for the digits a :class:`GuidedConsistencyFunction` around a ``SCottStudentUNet``; a bare diffusers
            backbone is wrapped in one with the grid's sigma_1 as boundary).
        teacher: ``teacher(x, sigma, guidance_scale, **cond) -> D_w(x, sigma)`` (e.g. :func:`guided_teacher`); a
            pipeline is wrapped with :func:`guided_teacher`. Frozen here.
        sigmas: the ascending grid sigma_1 < ... < sigma_N (float64; :func:`gensample.core.sigmas.karras_sigmas`).
        skip: t_m = sigmas[n - skip] for t_n = sigmas[n].
        solver: "ddim" (stochastic DDIM with ``eta``), "er-sde" (first order, noise scale ``phi``) or "ode" (CD).
        eta: DDIM's eta in [0, 1] (0: CD). substeps: h, the teacher's sub-steps per interval (>= 1).
        phi: the ER-SDE noise scale (a name in ``gensample.core.sampling.ER_SDE_NOISE_SCALES`` or a callable).
        guidance_range: (w_min, w_max); w ~ U[w_min, w_max] per sample. (1, 1): no guidance.
        distance, huber_c: a core distance by name and its scale c (None: the distance's default).
        target_ema: rate of the EMA target network in [0, 1); None: the current student under stop-gradient.
        adv_weight: lambda_adv (0: no adversarial term). discriminator: D(x_s, sigma, **cond) -> list of logits.
        adv_weight_mode: "fixed" or "adaptive". adv_p_mean, adv_p_std: the log-normal noise level of the
            discriminator's inputs. discriminator_lr, discriminator_betas: its Adam settings (lr None: the Trainer's).
        num_classes: K of a class-conditional teacher (default: the teacher's null label; None: unconditional).
        sigma_data, rho: of the parametrization and of the exported scheduler's Karras grid.
        sample_guidance_scale: the exported pipeline's default w (None: the middle of ``guidance_range``).
        sampling_sigmas: a tuned few-step schedule recorded in the exported scheduler (optional).
    """

    method_name = "scott"

    def __init__(self, student: nn.Module, teacher: nn.Module, sigmas: torch.Tensor, *,
                 skip: int = 1,
                 solver: str = "ddim",
                 eta: float = 0.3, substeps: int = 3,
                 phi: str | Callable[[torch.Tensor], torch.Tensor] = "er-sde-5",
                 guidance_range: tuple[float, float] = (1.0, 1.0),
                 distance: str = "pseudo_huber", huber_c: float | None = None,
                 target_ema: float | None = 0.95,
                 adv_weight: float = 0.0, discriminator: nn.Module | None = None,
                 adv_weight_mode: str = "fixed", adv_p_mean: float = -1.2, adv_p_std: float = 1.2,
                 discriminator_lr: float | None = None, discriminator_betas: tuple[float, float] = (0.5, 0.9),
                 num_classes: int | None = None, sigma_data: float = SIGMA_DATA, rho: float = RHO,
                 sample_guidance_scale: float | None = None, sampling_sigmas: list[float] | None = None):
        super().__init__()
        # -- the grid and the teacher solve
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool(sigmas[0] > 0):
            raise ValueError(f"`sigmas` must be an ascending grid sigma_1 < ... < sigma_N of >= 2 positive levels "
                             f"(e.g. gensample.core.sigmas.karras_sigmas(18)), got {sigmas.tolist()[:6]}...")
        if not isinstance(skip, int) or isinstance(skip, bool) or not 1 <= skip <= len(sigmas) - 1:
            raise ValueError(f"`skip` must be an integer in [1, N - 1 = {len(sigmas) - 1}] (t_m = sigmas[n - skip]), "
                             f"got {skip!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS} ('ddim': stochastic DDIM with eta, 'er-sde': the "
                             f"first-order ER-SDE solver with phi, 'ode': plain consistency distillation), got "
                             f"{solver!r}.")
        eta = check_eta(eta)
        if not isinstance(substeps, int) or isinstance(substeps, bool) or substeps < 1:
            raise ValueError(f"`substeps` (--substeps) must be an integer >= 1 (the teacher's SDE sub-steps between "
                             f"t_n and t_m; SCott uses 3), got {substeps!r}.")
        er_sde_noise_scale(phi)  # a clear error for an unknown name
        #: the ascending grid (float64, CPU; a plain attribute so that .to(dtype) never rounds it)
        self.sigmas = sigmas
        self.skip, self.solver, self.eta, self.substeps, self.phi = skip, solver, eta, substeps, phi
        self.deterministic = solver == "ode" or (solver == "ddim" and eta == 0.0) or (
            solver == "er-sde" and phi == "ode")
        if solver == "er-sde":
            self.step_fn = functools.partial(er_sde_step, phi=phi)
        else:
            self.step_fn = functools.partial(stochastic_ddim_step, eta=0.0 if solver == "ode" else eta)

        # -- networks
        if not isinstance(teacher, nn.Module):
            teacher = guided_teacher(teacher, num_classes)
        if num_classes is None:
            num_classes = getattr(teacher, "null_label", None)
        self.num_classes = None if num_classes is None else int(num_classes)
        w_min, w_max = (float(v) for v in guidance_range)
        if not 0.0 <= w_min <= w_max < float("inf"):
            raise ValueError(f"`guidance_range` must be (w_min, w_max) with 0 <= w_min <= w_max, got {guidance_range}.")
        if (w_min, w_max) != (1.0, 1.0) and not getattr(teacher, "supports_guidance",
                                                               getattr(teacher, "has_unconditional", True)):
            raise ValueError(f"guidance_range {guidance_range} needs a classifier-free-guidance teacher, but this "
                             "teacher is unconditional (no null label). Train one with `gensample train edm "
                             "--class-conditional --label-dropout 0.1`, or use --guidance-range 1 1.")
        self.guidance_range = (w_min, w_max)
        self.sample_guidance_scale = float(sample_guidance_scale if sample_guidance_scale is not None
                                           else (w_min + w_max) / 2)
        self.sigma_data, self.rho = float(sigma_data), float(rho)
        if not isinstance(student, ConsistencyFunction) and hasattr(student, "config"):
            student = GuidedConsistencyFunction(student, sigma_data=sigma_data, sigma_min=float(sigmas[0]))
        if isinstance(student, ConsistencyFunction) and abs(student.sigma_min - float(sigmas[0])) > 1e-12:
            raise ValueError(f"the student's boundary sigma_min={student.sigma_min} must be the grid's first level "
                             f"sigma_1={float(sigmas[0])} (f(x, sigma_1) = x is the target at t_m = sigma_1).")
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        if target_ema is not None and not 0.0 <= float(target_ema) < 1.0:
            raise ValueError(f"`target_ema` must be in [0, 1) (None: stop-gradient target), got {target_ema}.")
        self.target_ema = None if target_ema is None else float(target_ema)
        self.target = None if target_ema is None else copy.deepcopy(student).requires_grad_(False).eval()

        # -- loss
        if distance == "edm":
            raise ValueError("distance 'edm' is EDM's denoising loss, not a consistency distance; choose "
                             "pseudo_huber, pseudo_huber_elementwise, l2 or cauchy.")
        self.distance_fn = get_distance(distance)
        self.distance_name, self.huber_c = distance, huber_c
        if adv_weight < 0:
            raise ValueError(f"`adv_weight` (lambda_adv) must be >= 0, got {adv_weight}.")
        if adv_weight_mode not in ADV_WEIGHT_MODES:
            raise ValueError(f"`adv_weight_mode` must be one of {ADV_WEIGHT_MODES}, got {adv_weight_mode!r}.")
        if adv_weight > 0 and discriminator is None:
            raise ValueError("adv_weight > 0 needs a discriminator (gensample.models.scott_discriminator."
                             "SCottDiscriminator.from_teacher(...) or .standalone(...)).")
        if adv_weight == 0 and discriminator is not None:
            raise ValueError("a discriminator was given but adv_weight is 0; pass adv_weight > 0 (SCott: 0.4).")
        if adv_p_std <= 0:
            raise ValueError(f"`adv_p_std` must be > 0, got {adv_p_std}.")
        self.discriminator = discriminator
        self.adv_weight, self.adv_weight_mode = float(adv_weight), adv_weight_mode
        self.adv_p_mean, self.adv_p_std = float(adv_p_mean), float(adv_p_std)
        self.discriminator_lr = discriminator_lr
        self.discriminator_betas = tuple(float(b) for b in discriminator_betas)
        self.sampling_sigmas = None if sampling_sigmas is None else [float(s) for s in sampling_sigmas]

    # -- roles ------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "SCottDistillation":
        """Only the student and the discriminator change mode; teacher and EMA target stay in eval."""
        super().train(mode)
        self.teacher.eval()
        if self.target is not None:
            self.target.eval()
        return self

    def trainable_groups(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"generator": self.student}
        if self.discriminator is not None:
            groups["discriminator"] = self.discriminator
        return groups

    def groups_for_step(self, step: int) -> list[str]:
        """The student every step; with the adversarial term also the discriminator, after it."""
        return list(self.trainable_groups())

    def optimizer_settings(self) -> dict[str, dict[str, Any]]:
        if self.discriminator is None:
            return {}
        settings: dict[str, Any] = {"betas": self.discriminator_betas}
        if self.discriminator_lr is not None:
            settings["lr"] = float(self.discriminator_lr)
        return {"discriminator": settings}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.student.backbone}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """theta- <- mu theta- + (1 - mu) theta after every (generator) step; buffers are copied."""
        if self.target is None:
            return
        for p_target, p_student in zip(self.target.parameters(), self.student.parameters()):
            p_target.lerp_(p_student.detach().to(p_target.dtype), 1.0 - self.target_ema)
        for b_target, b_student in zip(self.target.buffers(), self.student.buffers()):
            b_target.copy_(b_student)

    # -- batches and draws ------------------------------------------------------------------------------------------
    def unpack_batch(self, batch) -> tuple[torch.Tensor, dict]:
        """(x_0 in VE space, conditioning kwargs): labelled batches ``(images, labels)`` give
        ``{"class_labels": labels}`` for a class-conditional teacher."""
        if isinstance(batch, (tuple, list)):
            images, labels = batch
            if self.num_classes is None:
                raise ValueError("labelled batches, but the teacher is unconditional; train without labels or "
                                 "distil a class-conditional teacher.")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}], got "
                                 f"[{int(labels.min())}, {int(labels.max())}].")
            return images, {"class_labels": labels}
        if self.num_classes is not None:
            raise ValueError("a class-conditional teacher needs labelled batches (Trainer(..., labels=...)).")
        return batch, {}

    def sample_levels(self, batch_size: int, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_n, t_m) per sample, float64: n ~ U{skip, ..., N-1}, t_m = sigmas[n - skip] (global RNG)."""
        n = torch.randint(self.skip, len(self.sigmas), (batch_size,))
        return self.sigmas[n].to(device), self.sigmas[n - self.skip].to(device)

    def sample_guidance(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """w ~ U[w_min, w_max] per sample, float32 (global RNG)."""
        w_min, w_max = self.guidance_range
        return (w_min + (w_max - w_min) * torch.rand(batch_size)).to(device)

    def sample_adv_sigmas(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The discriminator's noise level s = exp(P_mean + P_std n), clamped to the grid's range (float64)."""
        s = (self.adv_p_mean + self.adv_p_std * torch.randn(batch_size, dtype=torch.float64)).exp()
        return s.clamp(float(self.sigmas[0]), float(self.sigmas[-1])).to(device)

    # -- the pieces of the loss -------------------------------------------------------------------------------------
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x, y) per sample, the scale ``huber_c`` passed where the distance takes one."""
        if self.distance_name == "l2":
            return self.distance_fn(x, y)
        return self.distance_fn(x, y, self.huber_c)

    @torch.no_grad()
    def teacher_solve(self, x_n: torch.Tensor, t_n: torch.Tensor, t_m: torch.Tensor, w: torch.Tensor,
                      **cond: Any) -> torch.Tensor:
        """x_m: h sub-steps of the guided teacher from t_n to t_m (:func:`gensample.core.sampling.sde_solve`)."""
        return sde_solve(self.teacher, x_n, t_n, t_m, self.substeps, self.step_fn, deterministic=self.deterministic,
                         rho=self.rho, guidance_scale=w, **cond)

    @torch.no_grad()
    def consistency_target(self, x_m: torch.Tensor, t_m: torch.Tensor, w: torch.Tensor, **cond: Any) -> torch.Tensor:
        """f_theta-(x_m, t_m, w, c): the EMA target, or the current student under stop-gradient."""
        net = self.student if self.target is None else self.target
        return net(x_m, t_m, w, **cond)

    def student_estimate(self, x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, ...]:
        """(pred, x_n, t_n, t_m, w): the draws of one generator step and f_theta(x_n, t_n, w, c)."""
        t_n, t_m = self.sample_levels(x0.shape[0], x0.device)
        w = self.sample_guidance(x0.shape[0], x0.device)
        x_n = x0 + per_sample(t_n, x0).to(x0.dtype) * torch.randn_like(x0)
        return self.student(x_n, t_n, w, **cond), x_n, t_n, t_m, w

    def discriminate(self, x0: torch.Tensor, sigma: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        """D(x_0 + s xi, s, c): the discriminator's logits for (clean) images noised to level s."""
        x_s = x0 + per_sample(sigma, x0).to(x0.dtype) * torch.randn_like(x0)
        logits = self.discriminator(x_s, sigma, **cond)
        return list(logits) if isinstance(logits, (list, tuple)) else [logits]

    def last_layer(self) -> torch.Tensor:
        """W_L of the adaptive weight: the student backbone's output convolution weight."""
        return self.student.backbone.conv_out.weight

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, batch, step: int, group: str = "generator") -> dict[str, torch.Tensor]:
        if group not in self.trainable_groups():
            raise ValueError(f"unknown group {group!r}; this SCott method trains {list(self.trainable_groups())}.")
        x0, cond = self.unpack_batch(batch)
        if group == "discriminator":
            return self.discriminator_losses(x0, cond)
        return self.generator_losses(x0, cond)

    def generator_losses(self, x0: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        pred, x_n, t_n, t_m, w = self.student_estimate(x0, cond)
        x_m = self.teacher_solve(x_n, t_n, t_m, w, **cond)
        target = self.consistency_target(x_m, t_m, w, **cond)
        cd = self.distance(pred, target).mean()
        losses = {"cd": cd.detach()}
        total = cd
        if self.discriminator is not None:
            with _frozen(self.discriminator):
                adv = hinge_g_loss(self.discriminate(pred, self.sample_adv_sigmas(x0.shape[0], x0.device), cond))
            weight = torch.ones((), device=x0.device)
            if self.adv_weight_mode == "adaptive" and torch.is_grad_enabled() and cd.requires_grad:
                from .ctm import adaptive_weight

                weight = adaptive_weight(cd, adv, self.last_layer(), *ADV_WEIGHT_CLAMP)
            total = total + self.adv_weight * weight * adv
            losses.update(adv_g=adv.detach(), adv_weight=weight)
        losses["loss"] = total
        return losses

    def discriminator_losses(self, x0: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        """Hinge loss of D on real x_0 and the student's estimate (recomputed without gradients), both noised to the
        same level s."""
        with torch.no_grad():
            fake = self.student_estimate(x0, cond)[0]
        sigma = self.sample_adv_sigmas(x0.shape[0], x0.device)
        real_logits = self.discriminate(x0, sigma, cond)
        fake_logits = self.discriminate(fake, sigma, cond)
        loss = hinge_d_loss(real_logits, fake_logits)
        return {"loss": loss, "d_real": torch.stack([h.mean() for h in real_logits]).mean().detach(),
                "d_fake": torch.stack([h.mean() for h in fake_logits]).mean().detach()}

    # -- export -----------------------------------------------------------------------------------------------------
    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        """An :class:`~gensample.pipelines.pipeline_scott.SCottPipeline` (multi-step through the shared
        ``ConsistencyScheduler`` on the training grid, which must be a Karras grid)."""
        from gensample.pipelines.pipeline_scott import SCottPipeline

        from ..schedulers import ConsistencyScheduler

        n, lo, hi = len(self.sigmas), float(self.sigmas[0]), float(self.sigmas[-1])
        if not torch.allclose(self.sigmas.cpu(), karras_sigmas(n, lo, hi, self.rho), rtol=1e-9, atol=0):
            raise ValueError("the exported ConsistencyScheduler samples on a Karras grid, but the training grid is "
                             "not karras_sigmas(N, sigma_min, sigma_max, rho); train on a Karras grid.")
        scheduler = ConsistencyScheduler(num_train_timesteps=n, sigma_min=lo, sigma_max=hi,
                                         sigma_data=self.sigma_data, rho=self.rho,
                                         sampling_sigmas=self.sampling_sigmas)
        return SCottPipeline(unet=eval_modules["unet"], scheduler=scheduler, num_classes=self.num_classes,
                             guidance_scale=self.sample_guidance_scale)

    def method_config(self) -> dict[str, Any]:
        return dict(num_sigmas=len(self.sigmas), sigma_min=float(self.sigmas[0]), sigma_max=float(self.sigmas[-1]),
                    skip=self.skip, solver=self.solver, eta=self.eta, substeps=self.substeps,
                    phi=self.phi if isinstance(self.phi, str) else getattr(self.phi, "__name__", repr(self.phi)),
                    guidance_range=list(self.guidance_range), distance=self.distance_name, huber_c=self.huber_c,
                    target_ema=self.target_ema, adv_weight=self.adv_weight, adv_weight_mode=self.adv_weight_mode,
                    adv_p_mean=self.adv_p_mean, adv_p_std=self.adv_p_std, discriminator_lr=self.discriminator_lr,
                    discriminator_betas=list(self.discriminator_betas), num_classes=self.num_classes,
                    sigma_data=self.sigma_data, rho=self.rho, sample_guidance_scale=self.sample_guidance_scale,
                    sampling_sigmas=self.sampling_sigmas)
