"""Easy Consistency Tuning (Geng, Pokle, Luo, Lin, Kolter; ICLR 2025, "Consistency Models Made Easy"; locuslab/ect
``training/loss.py::ECMLoss``): consistency training in continuous time that starts from a pretrained diffusion
model (EDM) instead of from scratch.

Per step k:
    t = exp(P_mean + P_std n), n ~ N(0, 1)                     (continuous, iCT's lognormal: -1.1, 2.0)
    r = t - gap(t),  gap(t) = t q^-(stage(k)+1) (1 + k_s sigmoid(-b t)), r >= 0     (the "sigmoid" mapping)
    loss = E[ d(f_theta(x0 + t z, t), sg f_theta(x0 + r z, r)) / (t - r) ]
with the same z and the same dropout mask for both calls. At stage 0 with q = 2 the gap is the whole of t for
t < ~1.5 (r = 0: the target is x0, plain denoising, which is what the EDM initialisation already does); each stage
divides the gap by q, so training moves from diffusion towards consistency (ECT sec. 3, eq. 7-9).

Choices (stated, as they differ from locuslab/ect's CIFAR-10 run):
- **Parametrization.** locuslab/ect trains with EDM's c_skip/c_out and evaluates with the boundary-condition form at
  sigma_min = 0.003 (a train/eval mismatch). We train and sample the very same
  :class:`~gensample.core.parametrization.ConsistencyFunction` (boundary condition at sigma_min = 0.002, our iCT
  models' form), so the exported pipeline is exactly the trained function. For r <= sigma_min the target is the
  boundary value f(x_r, r) := x_r (r = 0 gives x0, as in ECT). t is clamped to [sigma_min, sigma_max].
- **Distance.** iCT's pseudo-Huber on the per-sample L2 norm, c = 0.00054 sqrt(d); ECT's CIFAR default is c = 0 (the
  plain norm), which has no gradient where student and target coincide. Both divide by t - r.
- **Stages.** ``num_stages`` equal stages over ``total_steps`` (ECT: 8 doublings of q = 2 over 200k iterations).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.parametrization import per_sample
from ..core.sigmas import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ect_pair_gap, ect_stage, sample_lognormal_sigmas
from .ict import ImprovedConsistencyTraining

__all__ = ["EasyConsistencyTuning"]


class EasyConsistencyTuning(ImprovedConsistencyTraining):
    """ECT on a backbone that should start as an EDM denoiser (``gensample train ect --init-from EDM_PIPELINE``).

    Args:
        backbone: the network F (a diffusers ``UNet2DModel``), ideally with an EDM teacher's weights.
        total_steps: the steps the ``num_stages`` stages span (keep it fixed when training in legs).
        q, num_stages: the gap shrinks by q at each of ``num_stages`` equal stages (ECT CIFAR-10: q = 2, 8 stages).
        mapping_k, mapping_b: k and b of the sigmoid mapping (ECT: 8, 1).
        p_mean, p_std: the lognormal of t (ECT and iCT: -1.1, 2.0).
        grid_size: ``num_train_timesteps`` of the exported scheduler, whose grid the default few-step schedules index
            (1281: iCT's final grid, so ``num_inference_steps=2`` means the same schedule as for an iCT model).
        Other arguments as in :class:`~gensample.methods.ict.ImprovedConsistencyTraining`.
    """

    method_name = "ect"

    def __init__(
        self,
        backbone: nn.Module,
        total_steps: int,
        q: float = 2.0,
        num_stages: int = 8,
        mapping_k: float = 8.0,
        mapping_b: float = 1.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
        rho: float = RHO,
        grid_size: int = 1281,
        sampling_sigmas: list[float] | None = None,
    ):
        super().__init__(backbone, total_steps, p_mean=p_mean, p_std=p_std, distance=distance, huber_c=huber_c,
                         sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho,
                         sampling_sigmas=sampling_sigmas)
        if q <= 1:
            raise ValueError(f"q must be > 1 (the gap t - r shrinks by q per stage), got {q}.")
        if int(num_stages) < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}.")
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}.")
        if int(grid_size) < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size}.")
        self.q, self.num_stages = float(q), int(num_stages)
        self.mapping_k, self.mapping_b = float(mapping_k), float(mapping_b)
        self.grid_size = int(grid_size)

    def num_sigmas(self, step: int) -> int:
        """The exported scheduler's grid (ECT's time is continuous; there is no discretization curriculum)."""
        return self.grid_size

    def stage(self, step: int) -> int:
        return ect_stage(step, self.total_steps, self.num_stages)

    def sample_times(self, batch_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, t - r), float64 on the CPU: t lognormal, clamped to [sigma_min, sigma_max]; the gap of the sigmoid
        mapping at this step's stage (global torch RNG)."""
        t = sample_lognormal_sigmas(batch_size, self.p_mean, self.p_std).clamp(self.sigma_min, self.sigma_max)
        return t, ect_pair_gap(t, self.stage(step), self.q, self.mapping_k, self.mapping_b)

    def forward(self, x0, step: int, group: str = "model") -> dict[str, torch.Tensor]:
        """``x0``: images, or (images, labels) for a class-conditional UNet (both calls get the label)."""
        model_kwargs = {}
        if isinstance(x0, (tuple, list)):
            x0, labels = x0
            model_kwargs["class_labels"] = labels
        t, gap = self.sample_times(x0.shape[0], step)
        r = t - gap
        noise = torch.randn_like(x0)
        t, gap, r = (v.to(x0.device) for v in (t, gap, r))
        x_t = x0 + per_sample(t, x0).to(x0.dtype) * noise
        x_r = x0 + per_sample(r, x0).to(x0.dtype) * noise
        # r at or below sigma_min: the boundary value x_r is the target (the network is not called there), but
        # the teacher pass still runs on the whole batch so that the dropout masks stay paired.
        student, teacher = self._student_teacher(x_t, t, x_r, r.clamp_min(self.sigma_min), **model_kwargs)
        teacher = torch.where(per_sample(r <= self.sigma_min, x0), x_r, teacher)
        distance = self.distance(student, teacher, **self.distance_kwargs(step, x0[0].numel()))
        loss = (distance / gap.to(distance.dtype)).mean()
        return {"loss": loss, "distance": distance.mean().detach(),
                "stage": torch.tensor(float(self.stage(step))),
                "denoising_fraction": (r <= self.sigma_min).float().mean()}

    def method_config(self) -> dict[str, Any]:
        return dict(total_steps=self.total_steps, q=self.q, num_stages=self.num_stages, mapping_k=self.mapping_k,
                    mapping_b=self.mapping_b, p_mean=self.p_mean, p_std=self.p_std, distance=self.distance_name,
                    huber_c=self.huber_c, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    sigma_data=self.sigma_data, rho=self.rho, grid_size=self.grid_size)
