"""Consistency Trajectory Model training (Kim et al., ICLR 2024, "Consistency Trajectory Model: Learning Probability
Flow ODE Trajectory of Diffusion", arXiv 2310.02279): distil a frozen EDM teacher into a trajectory function
G_theta(x_t, t, s) with the soft-consistency CTM loss, the DSM term and an optional GAN term (sony/ctm
``cm/karras_diffusion.py`` ``ctm_losses``).

Networks (roles):
    student   G_theta   = TrajectoryFunction(CTMUNet2DModel), initialised from the teacher (g_theta(x, t, s) = D_phi)
    target    G_theta-  = an EMA of the student with fixed rate mu (0.999, ``target_ema_mode='fixed'``), updated after
                          every generator step; NOT the evaluation EMA (the Trainer keeps that one, "unet")
    teacher   D_phi     = the frozen EDM denoiser (any teacher :func:`gensample.teachers.as_denoiser` accepts)
    discriminator (GAN term only), trained on alternate steps

Generator loss per step (sony/ctm ``ctm_losses``):
    k ~ p(k) proportional to k (once per step), t = sigma_n, u = sigma_{n+k}, s = sigma_m, m ~ U{n+k..N-1}
    x_t   = x_0 + t z
    x_est = G_theta-( G_theta(x_t, t, s), s, sigma_min )                 grads flow through the inner G_theta and
                                                                         through the outer network's input
    x_u   = Heun_phi^k(x_t; sigma_n -> sigma_{n+k})                      no grad (EDM Heun steps on the grid)
    x_tgt = G_theta-( stopgrad G_theta(x_u, u, s), s, sigma_min )        no grad
    L_CTM = mean d(x_est, x_tgt)                                         (lambda(t) = 1, 'uniform')
    L_DSM = mean lambda(sigma) (g_theta(x_sigma, sigma, sigma) - x_0)^2  lambda = (sigma^2 + sd^2)/(sigma sd)^2
    L_G   = mean(-D(aug(x_est)))                                         (GAN term, optional)
    loss  = L_CTM + w_DSM lambda_DSM L_DSM + w_GAN lambda_GAN L_G
    lambda_DSM = clamp(||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4), 0, 1e4)    W = the student's last conv weight
    lambda_GAN = clamp(||grad_W L_CTM|| / (||grad_W L_G||   + 1e-4), 0.01, 10)  (``calculate_adaptive_weight``)
Discriminator loss (odd steps once the GAN phase has begun): hinge mean(relu(1 - D(aug(x_0)))) + mean(relu(1 +
D(aug(x_est)))), with x_est recomputed without gradients.

Choices (and where they differ from sony/ctm; all documented at the arguments):

* Target inner map: ``target_inner="student"`` (default) is sony/ctm's ``ctm_target_inner_type='model_sg'``:
  the *current* student weights under stop-gradient, G_theta(x_u, u, s). ``"target"`` uses the EMA weights instead
  (``'target_model_sg'``, the paper's G_sg(theta) read as the target network; used by later forks of the code).
* Distance: ``"lpips"`` is CTM's default (``loss_norm='lpips'``): LPIPS (:mod:`gensample.metrics.lpips`) on images
  bilinearly upsampled to 224 px, with weights the user supplies (``lpips_weights``: the torchvision VGG16/AlexNet
  file + the ``lpips`` package's lin file, or one combined file); nothing is downloaded, so it is not our default.
  sony/ctm uses ``piq.LPIPS(replace_pooling=True)`` (VGG16 with average pooling: ``lpips_pooling="avg"``) on
  (x + 1)/2, which equals LPIPS' ScalingLayer on x; it upsamples only images smaller than 256 px, ours resize to
  ``lpips_resize`` whatever the size (None: no resize). The default is the pixel pseudo-Huber distance of iCT
  (c = 0.00054 sqrt(d)); ``"l2"`` is the per-sample mean squared error and ``"digits_features"`` the squared
  distance between the 64-d features of the embedded digits classifier
  (:class:`gensample.metrics.features.DigitsClassifier`, frozen): a learned perceptual distance in the spirit of
  LPIPS for the digits data. The LPIPS network is frozen, moves with the method (``.to``) but is not part of its
  state dict (checkpoints do not carry it; ``method_config`` records its weights' sha256).
* Teacher and target network run in eval mode (no dropout; our choice). The student's two passes (estimate, and
  the stop-gradient inner map of the target) are separate calls, so with dropout they draw independent masks.
* k (the number of Heun steps) is drawn from a generator seeded by (seed, step): one value per step on every process
  (sony/ctm broadcasts it from rank 0) that a resumed run reproduces; t, s and the noise use the global RNG, which
  the Trainer checkpoints.
* GAN: a small trainable multi-scale discriminator on pixels with DiffAugment (:mod:`gensample.models.discriminator`)
  instead of the frozen DeiT/EfficientNet projected discriminator (offline); see there. Its Adam optimizer takes
  betas (0.5, 0.9) as in CTM (``discriminator_betas``) and the Trainer's lr unless ``discriminator_lr`` is given
  (CTM CIFAR-10: RAdam, D lr 2e-3 with G lr 4e-4); the Trainer's evaluation EMA is not moved by discriminator steps.
* Under ``torch.no_grad()`` (evaluation) the adaptive weights cannot be formed (they need gradients) and are 1.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import UNet2DModel
from torch import nn

from ..core.losses import edm_denoising_loss, pseudo_huber, squared_l2
from ..core.parametrization import EDMDenoiser, TrajectoryFunction, per_sample
from ..core.sampling import check_gamma, heun_step
from ..core.sigmas import RHO, SIGMA_MAX, SIGMA_MIN, CTMTimes, karras_ramp, karras_sigmas_descending, sample_ctm_times
from ..models.ctm_unet import CTMUNet2DModel
from ..models.discriminator import Discriminator, diff_augment, hinge_d_loss, hinge_g_loss, parse_augment_policy
from .base import TrainingMethod

__all__ = ["CTMTraining", "CTM_DISTANCES", "adaptive_weight", "teacher_heun_solve"]

CTM_DISTANCES = ("pseudo_huber", "l2", "digits_features", "lpips")
TARGET_INNER = ("student", "target")
#: (min, max) clamps of the adaptive weights (sony/ctm ``calculate_adaptive_weight``; GAN: ``get_GAN_loss``)
DSM_WEIGHT_CLAMP = (0.0, 1e4)
GAN_WEIGHT_CLAMP = (0.01, 10.0)


def adaptive_weight(main_loss: torch.Tensor, aux_loss: torch.Tensor, last_layer: torch.Tensor,
                    min_value: float, max_value: float) -> torch.Tensor:
    """clamp(||d main/d W|| / (||d aux/d W|| + 1e-4), min_value, max_value), detached (sony/ctm
    ``calculate_adaptive_weight``; VQGAN's adaptive GAN weight). ``W`` = ``last_layer`` (the student's output
    convolution weight). Uses ``torch.autograd.grad`` with ``retain_graph=True``, so no ``.grad`` is touched and the
    losses can still be back-propagated. A loss that does not reach ``W`` counts as a zero gradient."""
    main_grad = torch.autograd.grad(main_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    aux_grad = torch.autograd.grad(aux_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    main_norm = main_grad.norm() if main_grad is not None else last_layer.new_zeros(())
    aux_norm = aux_grad.norm() if aux_grad is not None else last_layer.new_zeros(())
    return (main_norm / (aux_norm + 1e-4)).clamp(min_value, max_value).detach().float()


def teacher_heun_solve(denoiser: nn.Module, x: torch.Tensor, grid: torch.Tensor, start_index: torch.Tensor,
                       num_steps: int, **kwargs: Any) -> torch.Tensor:
    """k = ``num_steps`` EDM Heun steps on the descending ``grid`` from sigma_{n} to sigma_{n+k}, with a different
    start index n per sample (CTM ``heun_solver``). For j = 0..k-1, sigma_a = grid[n + j],
    sigma_b = grid[n + j + 1]:

        d = (x - D(x, sigma_a)) / sigma_a;  x' = x + (sigma_b - sigma_a) d
        d' = (x' - D(x', sigma_b)) / sigma_b;  x <- x + (sigma_b - sigma_a)(d + d') / 2

    (no Euler fallback: every sigma_b >= sigma_min > 0): :func:`gensample.core.sampling.heun_step` with per-sample
    levels (:func:`~gensample.core.sampling.heun_solve` does the same for one shared schedule). Costs 2k denoiser
    calls. Gradients are not disabled here.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if int(start_index.max()) + num_steps > len(grid) - 1:
        raise ValueError(f"start_index + num_steps must stay on the {len(grid)}-point grid.")
    grid = grid.to(torch.float64)
    index = start_index.to("cpu")
    for j in range(num_steps):
        x, _ = heun_step(denoiser, x, grid[index + j], grid[index + j + 1], **kwargs)
    return x


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without recording gradients for its parameters (gradients still flow to its input), so a
    generator step leaves no stale ``.grad`` in the discriminator's parameters."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _resolve_teacher(teacher: Any) -> tuple[nn.Module, UNet2DModel | None, float | None]:
    """(denoiser D(x, sigma), the EDM backbone if there is one, the teacher's sigma_data if known)."""
    from .teachers import as_denoiser
    if teacher is None:
        raise ValueError(
            "CTM distils a pretrained diffusion teacher, but teacher=None: pass an EDMPipeline (e.g. "
            "EDMPipeline.from_pretrained('runs/edm/pipeline'), trained with `gensample train edm`), an EDMDenoiser, "
            "or the path of a saved EDM pipeline (CLI: `gensample train ctm --teacher PATH`).")
    if isinstance(teacher, (str, Path)):
        from ..loading import load_pipeline

        teacher = load_pipeline(teacher)
    backbone, sigma_data = None, None
    if isinstance(teacher, EDMDenoiser):
        backbone, sigma_data = teacher.backbone, teacher.sigma_data
    elif hasattr(teacher, "unet") and hasattr(teacher, "scheduler") and not isinstance(teacher, nn.Module):
        from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

        if isinstance(teacher.scheduler, EDMHeunScheduler):
            backbone, sigma_data = teacher.unet, float(teacher.scheduler.config.sigma_data)
    denoiser = as_denoiser(teacher)
    if not isinstance(backbone, UNet2DModel):
        backbone = None
    return denoiser, backbone, sigma_data


class CTMTraining(TrainingMethod):
    """CTM distillation of a frozen EDM teacher (see the module docstring for the losses); exports a
    :class:`~gensample.pipelines.pipeline_ctm.CTMPipeline`.

    Args:
        teacher: the frozen teacher: an ``EDMPipeline``, an ``EDMDenoiser``, the path of a saved EDM pipeline, or any
            other object :func:`gensample.teachers.as_denoiser` accepts (then ``student`` is required). Its modules
            are frozen in place (``requires_grad_(False)``), not copied. None raises a ValueError.
        student: the CTM backbone F_theta (a ``CTMUNet2DModel``). Default: ``CTMUNet2DModel.from_teacher`` of the
            teacher's UNet (CTM ``cm_train.py``: copy matching weights; here the s-branch starts at zero output, so
            g_theta(x, t, s) = D_phi(x, t) at step 0).
        num_sigmas: N of the descending Karras grid (CTM CIFAR-10: 18, ImageNet-64: 40).
        max_heun_steps: K, the most teacher Heun steps per step (default N - 1: CIFAR 17, ImageNet 39).
        heun_step_multiplier: p(k) proportional to k^multiplier (CTM 'weighted', 1.0).
        target_ema: mu of the target network theta- <- mu theta- + (1 - mu) theta (CTM ``start_ema`` 0.999).
        target_inner: "student" (CTM default ``model_sg``) or "target" (``target_model_sg``): whose weights map
            x_u to s inside the target.
        distance: "pseudo_huber" (default), "l2", "digits_features" or "lpips" (needs ``lpips_weights``).
        lpips_weights: for distance="lpips": one combined file (:func:`gensample.metrics.lpips.save_lpips_weights`)
            or (backbone, lin) paths: torchvision's ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth`` and the
            ``lpips`` package's ``vgg.pth`` / ``alex.pth``; the trunk (VGG16 or AlexNet) follows from the files.
        lpips_resize: side to which LPIPS inputs are bilinearly resized (CTM: 224); None: no resize.
        lpips_pooling: "max" (LPIPS) or "avg" (VGG only; sony/ctm's ``piq.LPIPS(replace_pooling=True)``).
        huber_c: pseudo-Huber c (default 0.00054 sqrt(C H W)).
        dsm_weight: w_DSM (CTM ``denoising_weight`` 1.0); 0 disables the DSM term.
        dsm_p_mean, dsm_p_std: the log-normal half of the DSM sigmas (-1.2, 1.2).
        dsm_uniform_max: the other half is sigma(u) on the rho-grid with u ~ U[0, dsm_uniform_max] (0.7: sigma in
            [0.318, 80]; ``HalfLogNormalHalfUniformSampler``, ``diffusion_mult``).
        gan: add the GAN term and train a discriminator on alternate steps (default off; CTM trains CTM+DSM first
            and fine-tunes with the GAN term).
        gan_weight: w_GAN (CTM ``discriminator_weight`` 1.0).
        gan_start_step: first step of the GAN phase: from it on even offsets are generator steps (with the GAN
            term) and odd offsets discriminator steps (``g_learning_period=2``).
        gan_augment: DiffAugment policy ("" for none); drawn independently for real and fake images.
        discriminator: the discriminator (default ``Discriminator(in_channels, 32, num_scales=2)``).
        discriminator_lr: the discriminator's learning rate (None: the Trainer's ``learning_rate``).
        discriminator_betas: the discriminator's Adam betas (CTM: (0.5, 0.9)).
        sigma_min, sigma_max, rho: the grid; sigma_min is also the end time of the outer map G(., s, sigma_min).
        sigma_data: the student's preconditioning (default: the teacher's; must match it when known).
        sample_gamma: default gamma of the exported pipeline's scheduler (0: deterministic jumps).
        seed: seeds the per-step draw of k.
    """

    method_name = "ctm"

    def __init__(
        self,
        teacher: Any,
        student: CTMUNet2DModel | None = None,
        num_sigmas: int = 18,
        max_heun_steps: int | None = None,
        heun_step_multiplier: float = 1.0,
        target_ema: float = 0.999,
        target_inner: str = "student",
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        lpips_weights: Any = None,
        lpips_resize: int | None = 224,
        lpips_pooling: str = "max",
        dsm_weight: float = 1.0,
        dsm_p_mean: float = -1.2,
        dsm_p_std: float = 1.2,
        dsm_uniform_max: float = 0.7,
        gan: bool = False,
        gan_weight: float = 1.0,
        gan_start_step: int = 0,
        gan_augment: str = "color,translation,cutout",
        discriminator: nn.Module | None = None,
        discriminator_lr: float | None = None,
        discriminator_betas: tuple[float, float] = (0.5, 0.9),
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
        sigma_data: float | None = None,
        sample_gamma: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        denoiser, teacher_unet, teacher_sigma_data = _resolve_teacher(teacher)
        # -- validation ---------------------------------------------------------------------------------------------
        if not isinstance(num_sigmas, int) or num_sigmas < 2:
            raise ValueError(f"num_sigmas must be an integer >= 2, got {num_sigmas!r}.")
        max_heun_steps = num_sigmas - 1 if max_heun_steps is None else max_heun_steps
        if not isinstance(max_heun_steps, int) or not 1 <= max_heun_steps <= num_sigmas - 1:
            raise ValueError(f"max_heun_steps must be an integer in [1, num_sigmas - 1 = {num_sigmas - 1}], got "
                             f"{max_heun_steps!r}.")
        if not 0.0 <= target_ema < 1.0:
            raise ValueError(f"target_ema must lie in [0, 1), got {target_ema}.")
        if target_inner not in TARGET_INNER:
            raise ValueError(f"target_inner must be one of {TARGET_INNER}, got {target_inner!r}.")
        if distance not in CTM_DISTANCES:
            raise ValueError(f"distance must be one of {CTM_DISTANCES}, got {distance!r}.")
        if distance == "lpips" and lpips_weights is None:
            from ..metrics.lpips import lpips_weights_help

            raise ValueError(f"distance='lpips' needs lpips_weights (CLI: --lpips-weights). {lpips_weights_help()}")
        if distance != "lpips" and lpips_weights is not None:
            raise ValueError(f"lpips_weights were given but distance={distance!r}; pass distance='lpips' to use them.")
        if lpips_resize is not None and (not isinstance(lpips_resize, int) or lpips_resize < 1):
            raise ValueError(f"lpips_resize must be a positive int or None, got {lpips_resize!r}.")
        if discriminator_lr is not None and not discriminator_lr > 0:
            raise ValueError(f"discriminator_lr must be > 0, got {discriminator_lr}.")
        discriminator_betas = tuple(float(b) for b in discriminator_betas)
        if len(discriminator_betas) != 2 or not all(0.0 <= b < 1.0 for b in discriminator_betas):
            raise ValueError(f"discriminator_betas must be two numbers in [0, 1), got {discriminator_betas}.")
        if huber_c is not None and huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {huber_c}.")
        if dsm_weight < 0 or gan_weight < 0:
            raise ValueError(f"dsm_weight and gan_weight must be >= 0, got {dsm_weight}, {gan_weight}.")
        if dsm_p_std <= 0 or not 0.0 <= dsm_uniform_max <= 1.0:
            raise ValueError(f"need dsm_p_std > 0 and dsm_uniform_max in [0, 1], got {dsm_p_std}, {dsm_uniform_max}.")
        if not isinstance(gan_start_step, int) or gan_start_step < 0:
            raise ValueError(f"gan_start_step must be an integer >= 0, got {gan_start_step!r}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        parse_augment_policy(gan_augment)
        check_gamma(sample_gamma)
        if sigma_data is None:
            sigma_data = teacher_sigma_data if teacher_sigma_data is not None else 0.5
        elif teacher_sigma_data is not None and abs(sigma_data - teacher_sigma_data) > 1e-12:
            raise ValueError(f"sigma_data={sigma_data} differs from the teacher's {teacher_sigma_data}; the student "
                             "starts from the teacher's weights and must share its preconditioning.")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")

        # -- networks -----------------------------------------------------------------------------------------------
        if student is None:
            if teacher_unet is None:
                raise ValueError(
                    f"cannot build the CTM student from a {type(teacher).__name__} teacher: only an EDM teacher's "
                    "UNet2DModel initialises it. Pass student=CTMUNet2DModel(...) (e.g. CTMUNet2DModel.from_teacher "
                    "of an EDM UNet of the right size).")
            student = CTMUNet2DModel.from_teacher(teacher_unet)
        if not isinstance(student, CTMUNet2DModel):
            raise ValueError(f"student must be a CTMUNet2DModel (it takes the jump target s), got "
                             f"{type(student).__name__}.")
        if student.config.num_class_embeds is not None:
            raise ValueError("class-conditional CTM training is not supported: the Trainer feeds unlabelled image "
                             "batches. Use an unconditional teacher/student (num_class_embeds=None).")
        self.teacher = denoiser.requires_grad_(False).eval()
        self.student = TrajectoryFunction(student, sigma_data=sigma_data)
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.feature_net: nn.Module | None = None
        if distance == "digits_features":
            from ..metrics.features import load_digits_classifier

            self.feature_net = load_digits_classifier().requires_grad_(False).eval()
        lpips = None
        if distance == "lpips":
            from ..metrics.lpips import load_lpips

            if student.config.in_channels not in (1, 3):
                raise ValueError(f"distance='lpips' compares 1- or 3-channel images; this student has "
                                 f"{student.config.in_channels} channels (latents?). Use another distance.")
            lpips = load_lpips(lpips_weights, resize=lpips_resize, pooling=lpips_pooling)
        # Frozen and loaded from the user's files: kept out of the module tree (so out of state_dict and
        # checkpoints); _apply moves it with the method.
        object.__setattr__(self, "lpips", lpips)
        self.discriminator: nn.Module | None = None
        if gan:
            self.discriminator = discriminator if discriminator is not None else Discriminator(
                student.config.in_channels, 32, num_scales=2)
        elif discriminator is not None:
            raise ValueError("a discriminator was given but gan=False; pass gan=True to use the GAN term.")

        self.num_sigmas, self.max_heun_steps = num_sigmas, max_heun_steps
        self.heun_step_multiplier = float(heun_step_multiplier)
        self.target_ema, self.target_inner = float(target_ema), target_inner
        self.distance_name, self.huber_c = distance, huber_c
        self.dsm_weight, self.dsm_p_mean, self.dsm_p_std = float(dsm_weight), float(dsm_p_mean), float(dsm_p_std)
        self.dsm_uniform_max = float(dsm_uniform_max)
        self.gan, self.gan_weight, self.gan_start_step = bool(gan), float(gan_weight), gan_start_step
        self.gan_augment = gan_augment
        self.discriminator_lr, self.discriminator_betas = discriminator_lr, discriminator_betas
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.sigma_data = float(sigma_data)
        self.sample_gamma, self.seed = float(sample_gamma), int(seed)
        #: the descending N-point grid (float64, CPU; a plain attribute so that .to(dtype) never rounds it)
        self.grid = karras_sigmas_descending(num_sigmas, sigma_min, sigma_max, rho)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("lpips") is not None:
            self.lpips._apply(fn, *args, **kwargs)
        return self

    # -- roles ------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "CTMTraining":
        """Only the student and the discriminator change mode; teacher, target and feature net stay in eval."""
        super().train(mode)
        self.teacher.eval()
        self.target.eval()
        if self.feature_net is not None:
            self.feature_net.eval()
        return self

    def trainable_groups(self) -> dict[str, nn.Module]:
        groups: dict[str, nn.Module] = {"generator": self.student}
        if self.discriminator is not None:
            groups["discriminator"] = self.discriminator
        return groups

    def optimizer_settings(self) -> dict[str, dict[str, Any]]:
        """The discriminator's Adam betas (and lr when ``discriminator_lr`` is set); the generator takes the
        Trainer's settings."""
        if self.discriminator is None:
            return {}
        settings: dict[str, Any] = {"betas": self.discriminator_betas}
        if self.discriminator_lr is not None:
            settings["lr"] = self.discriminator_lr
        return {"discriminator": settings}

    def gan_active(self, step: int) -> bool:
        """Whether the GAN phase has begun at ``step``."""
        return self.gan and step >= self.gan_start_step

    def groups_for_step(self, step: int) -> list[str]:
        """Generator every step before the GAN phase; then generator on even, discriminator on odd offsets from
        ``gan_start_step`` (CTM ``g_learning_period=2``)."""
        if self.gan_active(step) and (step - self.gan_start_step) % 2 == 1:
            return ["discriminator"]
        return ["generator"]

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.student.backbone}

    def get_last_layer(self) -> torch.Tensor:
        """W_L of the adaptive weights: the student backbone's output convolution weight (CTM: the last output conv,
        e.g. ``dec['32x32_aux_conv'].weight`` / ``out[...].weight``)."""
        return self.student.backbone.conv_out.weight

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Target EMA theta- <- mu theta- + (1 - mu) theta after generator steps only (``_update_target_ema``);
        buffers are copied."""
        if "generator" not in self.groups_for_step(step):
            return
        for p_target, p_student in zip(self.target.parameters(), self.student.parameters()):
            p_target.lerp_(p_student.detach().to(p_target.dtype), 1.0 - self.target_ema)
        for b_target, b_student in zip(self.target.buffers(), self.student.buffers()):
            b_target.copy_(b_student)

    # -- sampling of times and noise levels -------------------------------------------------------------------------
    def num_heun_steps(self, step: int) -> int:
        """k for ``step``: p(k) proportional to k^multiplier, drawn from a generator seeded by (seed, step), so every
        process and a resumed run draw the same k."""
        from ..core.sigmas import heun_step_probabilities
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        probs = heun_step_probabilities(self.max_heun_steps, self.heun_step_multiplier)
        return int(torch.multinomial(probs, 1, generator=g)) + 1

    def sample_times(self, batch_size: int, step: int, device: torch.device | str | None = None) -> CTMTimes:
        """(k, t, u, s) of the generator loss (module docstring): k from :meth:`num_heun_steps`, t/u/s per sample
        from the global RNG."""
        return sample_ctm_times(batch_size, self.num_sigmas, self.max_heun_steps, self.heun_step_multiplier,
                                num_heun_steps=self.num_heun_steps(step), sigma_min=self.sigma_min,
                                sigma_max=self.sigma_max, rho=self.rho, device=device)

    def sample_dsm_sigmas(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """DSM noise levels (``HalfLogNormalHalfUniformSampler``): the first ceil(B/2) are exp(N(P_mean, P_std^2)),
        the rest sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
        u ~ U[0, dsm_uniform_max]. float64, global RNG."""
        n_log = batch_size - batch_size // 2
        log_normal = (self.dsm_p_mean + self.dsm_p_std * torch.randn(n_log, dtype=torch.float64)).exp()
        u = torch.rand(batch_size - n_log, dtype=torch.float64) * self.dsm_uniform_max
        uniform = karras_ramp(u, self.sigma_max, self.sigma_min, self.rho)
        return torch.cat([log_normal, uniform]).to(device)

    # -- the pieces of the loss -------------------------------------------------------------------------------------
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(x, y), one value per sample (see ``distance`` in the class docstring)."""
        if self.distance_name == "l2":
            return squared_l2(x, y)
        if self.distance_name == "pseudo_huber":
            return pseudo_huber(x, y, self.huber_c)
        if self.distance_name == "lpips":
            return self.lpips(x, y)
        fx, fy = self.feature_net.features(x.float()), self.feature_net.features(y.float())
        return (fx - fy).square().mean(1)

    def ctm_estimate(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x_est = G_theta-(G_theta(x_t, t, s), s, sigma_min): gradients reach theta through the inner map and
        through the (frozen) target network's input (``ctm_estimate_inner_type='model'``,
        ``outer_type='target_model_sg'``)."""
        inner = self.student(x_t, t, s, **kwargs)
        return self.target(inner, s, self.sigma_min, **kwargs)

    @torch.no_grad()
    def ctm_target(self, x_t: torch.Tensor, times: CTMTimes, **kwargs: Any) -> torch.Tensor:
        """x_tgt = G_theta-(sg G_inner(x_u, u, s), s, sigma_min), x_u = k teacher Heun steps from t to u."""
        x_u = teacher_heun_solve(self.teacher, x_t, self.grid, times.t_index, times.num_heun_steps, **kwargs)
        inner_net = self.student if self.target_inner == "student" else self.target
        inner = inner_net(x_u, times.u, times.s, **kwargs)
        return self.target(inner, times.s, self.sigma_min, **kwargs)

    def dsm_loss(self, x0: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """mean lambda(sigma) ||g_theta(x_sigma, sigma, sigma) - x_0||^2 / d, lambda = (sigma^2 + sd^2)/(sigma sd)^2
        (``get_DSM_loss`` with 'karras_weight')."""
        sigma = self.sample_dsm_sigmas(x0.shape[0], x0.device)
        x_sigma = x0 + per_sample(sigma, x0).to(x0.dtype) * torch.randn_like(x0)
        denoised = self.student.denoise(x_sigma, sigma, **kwargs)
        return edm_denoising_loss(denoised, x0, sigma, self.sigma_data).mean()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.gan_augment) if self.gan_augment else x

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, batch: torch.Tensor, step: int, group: str = "generator") -> dict[str, torch.Tensor]:
        """Named losses of ``group`` at ``step`` ("loss" is the one to minimise)."""
        if group not in self.trainable_groups():
            raise ValueError(f"unknown group {group!r}; this CTM method trains {list(self.trainable_groups())}.")
        if group == "discriminator":
            return self.discriminator_losses(batch, step)
        return self.generator_losses(batch, step)

    def generator_losses(self, x0: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        times = self.sample_times(x0.shape[0], step, x0.device)
        x_t = x0 + per_sample(times.t, x0).to(x0.dtype) * torch.randn_like(x0)
        estimate = self.ctm_estimate(x_t, times.t, times.s)
        target = self.ctm_target(x_t, times)
        ctm = self.distance(estimate, target).mean()
        losses = {"ctm": ctm.detach(), "num_heun_steps": torch.tensor(float(times.num_heun_steps))}
        total = ctm
        need_weights = torch.is_grad_enabled() and ctm.requires_grad
        if self.dsm_weight > 0:
            dsm = self.dsm_loss(x0)
            w = (adaptive_weight(ctm, dsm, self.get_last_layer(), *DSM_WEIGHT_CLAMP) if need_weights
                 else torch.ones((), device=x0.device))
            total = total + self.dsm_weight * w * dsm
            losses.update(dsm=dsm.detach(), dsm_weight=w)
        if self.gan_active(step) and self.gan_weight > 0:
            with _frozen(self.discriminator):
                gan_g = hinge_g_loss(self.discriminator(self._augment(estimate)))
            w = (adaptive_weight(ctm, gan_g, self.get_last_layer(), *GAN_WEIGHT_CLAMP) if need_weights
                 else torch.ones((), device=x0.device))
            total = total + self.gan_weight * w * gan_g
            losses.update(gan_g=gan_g.detach(), gan_weight=w)
        losses["loss"] = total
        return losses

    def discriminator_losses(self, x0: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Hinge loss of D on real x_0 vs fake x_est (recomputed without gradients), independent augmentations."""
        with torch.no_grad():
            times = self.sample_times(x0.shape[0], step, x0.device)
            x_t = x0 + per_sample(times.t, x0).to(x0.dtype) * torch.randn_like(x0)
            fake = self.ctm_estimate(x_t, times.t, times.s)
        logits = self.discriminator(torch.cat([self._augment(x0), self._augment(fake)]))
        real_logits = [h[: x0.shape[0]] for h in logits]
        fake_logits = [h[x0.shape[0]:] for h in logits]
        loss = hinge_d_loss(real_logits, fake_logits)
        return {"loss": loss, "d_real": torch.stack([h.mean() for h in real_logits]).mean().detach(),
                "d_fake": torch.stack([h.mean() for h in fake_logits]).mean().detach()}

    # -- export -----------------------------------------------------------------------------------------------------
    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        from gensample.pipelines.pipeline_ctm import CTMPipeline

        from ..schedulers.scheduling_ctm import CTMScheduler

        scheduler = CTMScheduler(num_train_timesteps=self.num_sigmas, sigma_min=self.sigma_min,
                                 sigma_max=self.sigma_max, sigma_data=self.sigma_data, rho=self.rho,
                                 gamma=self.sample_gamma)
        return CTMPipeline(unet=eval_modules["unet"], scheduler=scheduler)

    def method_config(self) -> dict[str, Any]:
        return dict(num_sigmas=self.num_sigmas, max_heun_steps=self.max_heun_steps,
                    heun_step_multiplier=self.heun_step_multiplier, target_ema=self.target_ema,
                    target_inner=self.target_inner, distance=self.distance_name, huber_c=self.huber_c,
                    dsm_weight=self.dsm_weight, dsm_p_mean=self.dsm_p_mean, dsm_p_std=self.dsm_p_std,
                    dsm_uniform_max=self.dsm_uniform_max, gan=self.gan, gan_weight=self.gan_weight,
                    gan_start_step=self.gan_start_step, gan_augment=self.gan_augment, sigma_min=self.sigma_min,
                    sigma_max=self.sigma_max, rho=self.rho, sigma_data=self.sigma_data,
                    sample_gamma=self.sample_gamma, seed=self.seed, **self._lpips_config())

    def _lpips_config(self) -> dict[str, Any]:
        """LPIPS settings, only for distance="lpips" (other runs keep the method_config of earlier versions)."""
        if self.lpips is None:
            return {}
        return dict(lpips_net=self.lpips.net, lpips_resize=self.lpips.resize, lpips_pooling=self.lpips.pooling,
                    lpips_weights_sha256=self.lpips.weights_sha256)

