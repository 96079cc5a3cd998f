"""Improved Consistency Training (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models").

Per step k (ascending grid sigma_1 < ... < sigma_N, iCT sec. 3):
    N = N(k) (doubling curriculum, eq. 7);  i ~ p(i) (discretized lognormal, eq. 10);  z ~ N(0, I)
    loss = E[ lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} z, sigma_{i+1}), f_theta-(x0 + sigma_i z, sigma_i)) ]
with theta- = stopgrad(theta) (no EMA teacher), lambda = 1/(sigma_{i+1} - sigma_i) and d the pseudo-Huber distance on
the per-sample L2 norm with c = 0.00054 sqrt(d). Student and teacher see the same z and the same dropout mask (the
RNG state is replayed for the teacher pass). The evaluation EMA never enters the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.losses import get_distance, scale_or_default
from ..core.parametrization import ConsistencyFunction, per_sample
from ..core.sigmas import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    ict_loss_weighting,
    ict_num_sigmas,
    karras_sigmas,
    lognormal_index_probabilities,
)
from .base import TrainingMethod


def _rng_devices(x: torch.Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


@dataclass
class ConsistencyPair:
    """One consistency-training pair per sample: the student f_theta(x0 + sigma_{i+1} z, sigma_{i+1}) and the
    stop-gradient teacher f_theta(x0 + sigma_i z, sigma_i), with the grid and the draws that made them."""

    student: torch.Tensor
    teacher: torch.Tensor
    sigmas: torch.Tensor  # the ascending grid at this step
    index: torch.Tensor  # pair i per sample
    sigma_student: torch.Tensor  # (B,) float64
    weight: torch.Tensor  # lambda(sigma_i), (B,) float32


class ImprovedConsistencyTraining(TrainingMethod):
    method_name = "ict"

    def __init__(
        self,
        backbone: nn.Module,
        total_steps: int,
        s0: int = 10,
        s1: int = 1280,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float = SIGMA_DATA,
        rho: float = RHO,
        sampling_sigmas: list[float] | None = None,
    ):
        super().__init__()
        self.sampling_sigmas = None if sampling_sigmas is None else [float(x) for x in sampling_sigmas]
        self.model = ConsistencyFunction(backbone, sigma_data=sigma_data, sigma_min=sigma_min)
        self.total_steps = int(total_steps)
        self.s0, self.s1 = int(s0), int(s1)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        if distance == "edm":
            raise ValueError("distance 'edm' is EDM's weighted denoising loss, not a consistency distance; choose "
                             "pseudo_huber, pseudo_huber_elementwise, l2 or cauchy.")
        self.distance_name = distance
        self.distance = get_distance(distance)
        self.huber_c = huber_c
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        ict_num_sigmas(0, self.total_steps, self.s0, self.s1)  # validates s0, s1, K early

    # -- curriculum: a pure function of the step, so resume restores it -------------------------------------------
    def num_sigmas(self, step: int) -> int:
        return ict_num_sigmas(step, self.total_steps, self.s0, self.s1)

    def noise_grid(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigmas ascending, pair probabilities, pair weights lambda) at ``step``."""
        sigmas = karras_sigmas(self.num_sigmas(step), self.sigma_min, self.sigma_max, self.rho)
        return sigmas, lognormal_index_probabilities(sigmas, self.p_mean, self.p_std), ict_loss_weighting(sigmas)

    def trainable_groups(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model.backbone}

    def _student_teacher(self, x_student: torch.Tensor, sigma_student: torch.Tensor, x_teacher: torch.Tensor,
                         sigma_teacher: torch.Tensor, **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Student f_theta(x_student) with grad; teacher f_theta(x_teacher) under no_grad, detached, with the same
        dropout mask: the RNG state of the device the dropout runs on (not only the CPU generator) is replayed for
        the teacher."""
        devices = _rng_devices(x_student)
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        student = self.model(x_student, sigma_student, **model_kwargs)
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)
            with torch.no_grad():
                teacher = self.model(x_teacher, sigma_teacher, **model_kwargs).detach()
        return student, teacher

    def pair_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise z shared by student and teacher (iCT: as drawn; sLCT re-pairs it with the batch)."""
        return noise

    def consistency_pair(self, x0: torch.Tensor, step: int, **model_kwargs: Any) -> ConsistencyPair:
        """Draw i ~ p(i) and z, then evaluate student and teacher on the same z (random draws in this order: index,
        noise, then the dropout masks). ``model_kwargs`` go to both network calls (e.g. ``class_labels``)."""
        sigmas, probs, weights = self.noise_grid(step)
        index = torch.multinomial(probs, x0.shape[0], replacement=True)
        sigma_teacher = sigmas[index].to(x0.device)
        sigma_student = sigmas[index + 1].to(x0.device)
        weight = weights[index].to(device=x0.device, dtype=torch.float32)
        noise = self.pair_noise(x0, torch.randn_like(x0))
        x_student = x0 + per_sample(sigma_student, x0).to(x0.dtype) * noise
        x_teacher = x0 + per_sample(sigma_teacher, x0).to(x0.dtype) * noise
        student, teacher = self._student_teacher(x_student, sigma_student, x_teacher, sigma_teacher, **model_kwargs)
        return ConsistencyPair(student, teacher, sigmas, index, sigma_student, weight)

    def distance_kwargs(self, step: int, num_dims: int) -> dict[str, float]:
        """Keyword arguments of the distance at ``step`` (the pseudo-Huber c, default 0.00054 sqrt(d))."""
        if self.distance_name.startswith("pseudo_huber"):
            return {"c": scale_or_default(self.huber_c, num_dims)}
        return {}

    def forward(self, x0: torch.Tensor, step: int, group: str = "model") -> dict[str, torch.Tensor]:
        """``x0``: images, or the tuple (images, labels) of a labelled run (a class-conditional UNet: student and
        teacher both get the sample's label)."""
        model_kwargs = {}
        if isinstance(x0, (tuple, list)):
            x0, labels = x0
            model_kwargs["class_labels"] = labels
        pair = self.consistency_pair(x0, step, **model_kwargs)
        distance = self.distance(pair.student, pair.teacher, **self.distance_kwargs(step, x0[0].numel()))
        loss = (pair.weight * distance).mean()
        return {"loss": loss, "distance": distance.mean().detach(),
                "num_sigmas": torch.tensor(float(len(pair.sigmas)))}

    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        from gensample.pipelines import ConsistencyPipeline

        from ..schedulers import ConsistencyScheduler

        scheduler = ConsistencyScheduler(
            num_train_timesteps=self.num_sigmas(self.total_steps), sigma_min=self.sigma_min,
            sigma_max=self.sigma_max, sigma_data=self.sigma_data, rho=self.rho, sampling_sigmas=self.sampling_sigmas,
        )
        return ConsistencyPipeline(unet=eval_modules["unet"], scheduler=scheduler)

    def method_config(self) -> dict[str, Any]:
        return dict(total_steps=self.total_steps, s0=self.s0, s1=self.s1, p_mean=self.p_mean, p_std=self.p_std,
                    distance=self.distance_name, huber_c=self.huber_c, sigma_min=self.sigma_min,
                    sigma_max=self.sigma_max, sigma_data=self.sigma_data, rho=self.rho)
