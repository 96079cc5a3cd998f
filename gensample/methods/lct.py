"""sLCT: latent consistency training (Dao, Doan, Liu, Le, Metaxas, "Improved Training Technique for Latent
Consistency Models", ICLR 2025, arXiv 2502.01441), on top of :class:`ImprovedConsistencyTraining`.

The paper's code is quandao10/LCT (branch ``ot`` @ 3f636db, script ``train_lct_ot_newc_allnonscalinglayernorm.sh``);
every default below is that script's setting:

* **Cauchy distance** (``distance="cauchy"``), per sample ``ln(1 + MSE_b / (2 c^2))`` with MSE the per-element mean
  (``loss_norm cauchy``), weighted by iCT's lambda = 1 / (sigma_{i+1} - sigma_i) and averaged over the batch.
* **Adaptive c** (``adaptive_c=True``, ``--c-by-loss-std``): c = 0.00054 sqrt(d) during the first curriculum stage
  (N = s0 + 1; ``cauchy_c`` overrides it, ``--custom-constant-c``), then c(N) = exp(-1.15 ln(N - 1) - 0.85).
* **Diffusion loss** on the low-noise part of the grid (``use_diffusion_loss=True``, ``--use-diffloss``): on the
  descending grid t_0 = sigma_max > ... > t_{N-1} = sigma_min with the student at t_n, the samples with
  n >= int(0.75 N) add ``mean_{C,H,W} (f_theta(x_t, t) - x0)^2 (1/t^2 + 1/sigma_data^2)`` (EDM weight), averaged
  over that subset and weighted 5: ``L = mean_b L_CM,b + 5 mean_{b in S} L_diff,b``. It reuses the student forward
  (no extra network evaluation). An empty subset contributes 0 (its mean would be NaN in the research code).
* **OT pairing** (``ot_pairing=True``, ``--ot-hard``): the unit-variance noise of the batch is permuted to the exact
  minibatch OT coupling with the latents (:mod:`gensample.methods.ot`) before noising; student and teacher share it.
* **Curriculum** s0 = 10, **s1 = 640** (iCT's doubling; N in {11, 21, ..., 641}).
* Non-scaling LayerNorm is a property of the backbone (:class:`gensample.models.nsln.NsLNUNet2DModel`), not of
  this objective.

With ``distance="pseudo_huber"``, ``adaptive_c=False``, ``use_diffusion_loss=False``, ``ot_pairing=False`` (and
``s1=1280``) the loss is exactly iCT's on the same batch and random state: plain iCT in latent space.

The input batches are latents already normalised per element to std 0.5 (:mod:`gensample.data.latents`); the VAE and
:class:`~gensample.models.latent_normalizer.LatentNormalizer` passed here are used only to build the exported
:class:`~gensample.pipelines.LatentConsistencyPipeline` (they are not submodules: not trained, not checkpointed).

Index convention: the code here uses iCT's ascending grid (pair i = (sigma_i, sigma_{i+1}), student at sigma_{i+1});
the research code's descending index of the student is n = N - 2 - i.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.losses import edm_denoising_loss, get_distance, scale_or_default, slct_cauchy_c
from ..core.sigmas import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .ict import ImprovedConsistencyTraining
from .ot import ot_pair_noise

__all__ = ["LatentConsistencyTraining", "diffusion_loss_mask"]


def diffusion_loss_mask(index: torch.Tensor, num_sigmas: int, rate: float = 0.75) -> torch.Tensor:
    """Which pairs get sLCT's diffusion loss: ascending pair index ``i`` (student at sigma_{i+1}) whose descending
    student index ``n = N - 2 - i`` satisfies ``n >= int(rate * N)`` (research code: ``indices >= int(0.75 N)``).

    N = 11 -> pairs i <= 1 (student sigma <= 0.0851); N >= 21 -> student sigma <= 0.16975.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"diffusion-loss rate must be in (0, 1), got {rate}.")
    threshold = int(rate * num_sigmas)
    return (num_sigmas - 2 - index) >= threshold


class LatentConsistencyTraining(ImprovedConsistencyTraining):
    """sLCT objective on normalised latents; see the module docstring for each switch.

    Args:
        backbone: the network F (``UNet2DModel`` or ``NsLNUNet2DModel``) over latents.
        total_steps: K of the curriculum.
        s0, s1, p_mean, p_std, sigma_*, rho: as :class:`ImprovedConsistencyTraining` (s1 defaults to 640).
        distance: "cauchy" (sLCT) or a :mod:`gensample.core.losses` name ("pseudo_huber" = iCT).
        cauchy_c: first-stage Cauchy c (default 0.00054 sqrt(d), d = C*h*w of the latents).
        adaptive_c: after the first stage use c(N) = exp(-1.15 ln(N-1) - 0.85) (Cauchy only).
        huber_c: the pseudo-Huber c when ``distance`` is a pseudo-Huber variant (default 0.00054 sqrt(d)).
        use_diffusion_loss, diffusion_weight, diffusion_rate: the low-noise diffusion term (5 and 0.75 in sLCT).
        ot_pairing: exact minibatch OT coupling of noise and latents.
        sampling_sigmas: a tuned few-step schedule recorded in the exported scheduler (as iCT's); sLCT samples
            2 steps with ``--ts 0,440,640 --steps 641``, i.e. ``[80.0, 0.369315]``. None: the scheduler's grid rule.
        vae, normalizer: the ``AutoencoderKL`` and ``LatentNormalizer`` the exported pipeline decodes with.
    """

    method_name = "lct"

    def __init__(
        self,
        backbone: nn.Module,
        total_steps: int,
        s0: int = 10,
        s1: int = 640,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        distance: str = "cauchy",
        cauchy_c: float | None = None,
        adaptive_c: bool = True,
        huber_c: float | None = None,
        use_diffusion_loss: bool = True,
        diffusion_weight: float = 5.0,
        diffusion_rate: float = 0.75,
        ot_pairing: bool = True,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
        rho: float = RHO,
        sampling_sigmas: list[float] | None = None,
        vae: nn.Module | None = None,
        normalizer: nn.Module | None = None,
    ):
        distance_fn = get_distance(distance)  # validates the name (ValueError lists the choices)
        if adaptive_c and distance != "cauchy":
            raise ValueError(f"adaptive_c applies to the Cauchy distance only (its constants are fitted to the "
                             f"MSE-form Cauchy loss); got distance={distance!r}. Pass adaptive_c=False.")
        if cauchy_c is not None and not cauchy_c > 0:
            raise ValueError(f"cauchy_c must be > 0, got {cauchy_c}.")
        if diffusion_weight < 0:
            raise ValueError(f"diffusion_weight must be >= 0, got {diffusion_weight}.")
        if not 0.0 < diffusion_rate < 1.0:
            raise ValueError(f"diffusion_rate must be in (0, 1), got {diffusion_rate}.")
        if (vae is None) != (normalizer is None):
            raise ValueError("pass both vae and normalizer (to export a LatentConsistencyPipeline) or neither.")
        super().__init__(backbone, total_steps, s0=s0, s1=s1, p_mean=p_mean, p_std=p_std, distance=distance,
                         huber_c=huber_c, sigma_min=sigma_min,
                         sigma_max=sigma_max, sigma_data=sigma_data, rho=rho, sampling_sigmas=sampling_sigmas)
        self.cauchy_c = None if cauchy_c is None else float(cauchy_c)
        self.adaptive_c = bool(adaptive_c)
        self.use_diffusion_loss = bool(use_diffusion_loss)
        self.diffusion_weight, self.diffusion_rate = float(diffusion_weight), float(diffusion_rate)
        self.ot_pairing = bool(ot_pairing)
        self._latent_codec = None if vae is None else (vae, normalizer)
        if vae is not None:
            self._check_codec(backbone, vae, normalizer)

    @staticmethod
    def _check_codec(backbone: nn.Module, vae: nn.Module, normalizer: nn.Module) -> None:
        shape = tuple(normalizer.latent_shape)
        if vae.config.latent_channels != shape[0]:
            raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the normalizer "
                             f"statistics are for shape {shape}.")
        cfg = getattr(backbone, "config", None)
        if cfg is not None and (cfg.in_channels != shape[0] or cfg.sample_size not in (shape[1], list(shape[1:]),
                                                                                          tuple(shape[1:]))):
            raise ValueError(f"the backbone takes {cfg.in_channels}x{cfg.sample_size} inputs but the latents are "
                             f"{shape}.")

    # -- the scale of the Cauchy distance --------------------------------------------------------------------------
    def cauchy_scale(self, step: int, num_dims: int) -> float:
        """c at ``step``: the first-stage constant (``cauchy_c`` or 0.00054 sqrt(d)) while N = s0 + 1 or when
        ``adaptive_c`` is off, then ``slct_cauchy_c(N)`` (research code: ``if N > s0 + 1``)."""
        n = self.num_sigmas(step)
        if self.adaptive_c and n > self.s0 + 1:
            return slct_cauchy_c(n)
        return scale_or_default(self.cauchy_c, num_dims)

    def distance_kwargs(self, step: int, num_dims: int) -> dict[str, float]:
        if self.distance_name == "cauchy":
            return {"c": self.cauchy_scale(step, num_dims)}
        return super().distance_kwargs(step, num_dims)

    def pair_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return ot_pair_noise(x0, noise) if self.ot_pairing else noise

    def forward(self, x0: torch.Tensor, step: int, group: str = "model") -> dict[str, torch.Tensor]:
        pair = self.consistency_pair(x0, step)
        num_sigmas = len(pair.sigmas)
        kwargs = self.distance_kwargs(step, x0[0].numel())
        distance = self.distance(pair.student, pair.teacher, **kwargs)
        cm_loss = (pair.weight * distance).mean()
        out = {"distance": distance.mean().detach(), "cm_loss": cm_loss.detach(),
               "num_sigmas": torch.tensor(float(num_sigmas))}
        if "c" in kwargs:
            out["c"] = torch.tensor(kwargs["c"])
        loss = cm_loss
        if self.use_diffusion_loss:
            mask = diffusion_loss_mask(pair.index, num_sigmas, self.diffusion_rate).to(x0.device)
            if mask.any():
                diff = edm_denoising_loss(pair.student, x0, pair.sigma_student, self.sigma_data)[mask].mean()
            else:  # empty low-noise subset: the research code's mean would be NaN
                diff = torch.zeros((), device=x0.device)
            loss = loss + self.diffusion_weight * diff
            out["diffusion_loss"] = diff.detach()
            out["diffusion_fraction"] = mask.float().mean()
        out["loss"] = loss
        return out

    # -- export -----------------------------------------------------------------------------------------------------
    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        """A :class:`~gensample.pipelines.LatentConsistencyPipeline` around the EMA UNet and copies of the VAE and
        normalizer. Its scheduler does not clamp the clean estimates (latents are not bounded to [-1, 1])."""
        if self._latent_codec is None:
            raise ValueError("LatentConsistencyTraining was built without vae= and normalizer=; pass both to export "
                             "a LatentConsistencyPipeline.")
        from gensample.pipelines.pipeline_latent_consistency import LatentConsistencyPipeline

        from ..schedulers import ConsistencyScheduler

        unet = eval_modules["unet"]
        device = next(unet.parameters()).device
        vae, normalizer = (copy.deepcopy(m).eval().to(device) for m in self._latent_codec)
        scheduler = ConsistencyScheduler(
            num_train_timesteps=self.num_sigmas(self.total_steps), sigma_min=self.sigma_min,
            sigma_max=self.sigma_max, sigma_data=self.sigma_data, rho=self.rho, clip_denoised=False,
            sampling_sigmas=self.sampling_sigmas,
        )
        return LatentConsistencyPipeline(unet=unet, scheduler=scheduler, vae=vae, normalizer=normalizer)

    def method_config(self) -> dict[str, Any]:
        return dict(super().method_config(), cauchy_c=self.cauchy_c, adaptive_c=self.adaptive_c,
                    use_diffusion_loss=self.use_diffusion_loss, diffusion_weight=self.diffusion_weight,
                    diffusion_rate=self.diffusion_rate, ot_pairing=self.ot_pairing)
