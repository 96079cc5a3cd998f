"""Preconditioning around a backbone F: the consistency function, the EDM denoiser and the CTM trajectory function.

One set of scalings serves all three (CM paper, Song et al. 2023, appendix C; iCT sec. 3; EDM, Karras et al. 2022,
Table 1; CTM, Kim et al. 2024, sec. 3):

    c_skip(s) = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2)
    c_out(s)  = (s - sigma_min) sigma_data / sqrt(s^2 + sigma_data^2)
    c_in(s)   = 1 / sqrt(s^2 + sigma_data^2)
    c_noise(s) = 1000 * 0.25 * ln(s + 1e-44)

with sigma_min > 0 for the consistency function (boundary condition f(x, sigma_min) = x) and sigma_min = 0 for EDM's
denoiser and CTM's g (then D(x, 0) = x). Every model here is ``combine(x, F(c_in x, c_noise))``: the scalings, the
backbone call and the combination are written once (:func:`scalings`, :func:`preconditioned_output`,
:func:`combine`), so training, schedulers and kernels evaluate the very same formulas.

Choice of c_noise: the openai/consistency_models (ADM) form, 1000 * 0.25 ln(sigma), rather than EDM's 0.25 ln(sigma),
because diffusers' UNet2DModel uses a positional time embedding tuned for timesteps in the hundreds, and because it is
exactly what diffusers' ``CMStochasticIterativeScheduler.sigma_to_t`` feeds the UNet, so our UNets also run under
diffusers' ``ConsistencyModelPipeline`` unchanged, and one UNet serves as EDM teacher, consistency model and CTM
student.

Scalings are formed in float64 and cast to the input dtype, so f(x, sigma_min) = x and G(x, t, t) = x hold bit for bit
when sigma is a Python float or a float64 tensor (a float32 0.002 is not exactly sigma_min).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .sigmas import SIGMA_DATA, SIGMA_MIN

__all__ = [
    "as_float64", "per_sample", "scalings", "consistency_scalings", "edm_scalings", "input_scaling",
    "noise_conditioning", "preconditioned_output", "combine", "trajectory_jump", "ConsistencyFunction", "EDMDenoiser",
    "TrajectoryFunction",
]


def as_float64(value) -> torch.Tensor:
    """A tensor from a Python number (float64) or the tensor itself (its dtype kept)."""
    return value if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float64)


def per_sample(values, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or one value per sample, shape (B,), against ``x`` of shape (B, ...): shape (B, 1, ..., 1)
    on x's device (dtype kept)."""
    values = as_float64(values).to(device=x.device)
    if values.ndim == 0:
        values = values.expand(x.shape[0])
    return values.reshape((-1,) + (1,) * (x.ndim - 1))


def scalings(sigma, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0):
    """(c_skip, c_out, c_in, c_noise) at ``sigma`` (see the module docstring); sigma_min = 0 gives EDM's Table 1."""
    sigma = as_float64(sigma)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, input_scaling(sigma, sigma_data), noise_conditioning(sigma)


def consistency_scalings(sigma, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out) of the boundary-condition parametrization; c_skip(sigma_min) = 1, c_out(sigma_min) = 0."""
    return scalings(sigma, sigma_data, sigma_min)[:2]


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of EDM's preconditioning (Table 1): D(x, sigma) = x only at sigma = 0; at sigma = sigma_data,
    c_skip = 1/2 and c_out = sigma_data / sqrt(2)."""
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
    return scalings(sigma, sigma_data, 0.0)[:2]


def input_scaling(sigma, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2)."""
    sigma = as_float64(sigma)
    return 1.0 / (sigma**2 + sigma_data**2).sqrt()


def noise_conditioning(sigma) -> torch.Tensor:
    """c_noise(sigma) = 1000 * 0.25 * ln(sigma + 1e-44): the timestep value handed to the backbone."""
    return 1000 * 0.25 * torch.log(as_float64(sigma) + 1e-44)


def preconditioned_output(backbone, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA,
                          **kwargs: Any) -> torch.Tensor:
    """F(c_in(sigma) x, c_noise(sigma), **kwargs), a diffusers output's ``.sample`` unwrapped. ``sigma`` is float64 of
    shape (B, 1, ..., 1) (:func:`per_sample`); the network receives c_noise as float32 of shape (B,)."""
    c_in = input_scaling(sigma, sigma_data).to(x.dtype)
    out = backbone(c_in * x, noise_conditioning(sigma.flatten()).to(torch.float32), **kwargs)
    return out.sample if hasattr(out, "sample") else out


def combine(x: torch.Tensor, model_output: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """c_skip x + c_out F, the float64 scalings rounded to x's dtype first."""
    return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * model_output


def trajectory_jump(x: torch.Tensor, denoised: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """CTM's Euler outer parametrization, G = (s/t) x + (1 - s/t) g, from ``ratio`` = s/t in float64: the jump along
    the trajectory from t to s that :class:`TrajectoryFunction` and CTM's gamma-sampling step both make."""
    return combine(x, denoised, ratio, 1 - ratio)


class _Preconditioned(nn.Module):
    """combine(x, F(c_in x, c_noise)) with the scalings of :func:`scalings` at a given sigma_min."""

    def __init__(self, backbone: nn.Module, sigma_data: float, sigma_min: float):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min

    def backbone_output(self, x: torch.Tensor, sigma, **kwargs: Any) -> torch.Tensor:
        """F(c_in(sigma) x, c_noise(sigma)): the raw network output a scheduler's ``step`` expects."""
        s = per_sample(sigma, x).to(torch.float64)
        if (s < 0).any():
            raise ValueError(f"sigma must be >= 0, got min {float(s.min())}.")
        return preconditioned_output(self.backbone, x, s, self.sigma_data, **kwargs)

    def forward(self, x: torch.Tensor, sigma, **kwargs: Any) -> torch.Tensor:
        c_skip, c_out, _, _ = scalings(per_sample(sigma, x).to(torch.float64), self.sigma_data, self.sigma_min)
        return combine(x, self.backbone_output(x, sigma, **kwargs), c_skip, c_out)


class ConsistencyFunction(_Preconditioned):
    """f_theta(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x, c_noise(sigma)), with the boundary
    condition f(x, sigma_min) = x (CM paper, eq. 5 and appendix C).

    ``backbone`` is any callable ``F(x, timestep) -> tensor`` or a diffusers model returning an output with
    ``.sample`` (UNet2DModel). ``sigma`` is a float, a 0-d tensor or one value per sample.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
        super().__init__(backbone, sigma_data, sigma_min)


class EDMDenoiser(_Preconditioned):
    """D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))  (EDM Table 1, eq. 7).

    ``backbone`` is any callable ``F(x, timestep, **kwargs)`` returning a tensor or an output with ``.sample``
    (diffusers ``UNet2DModel``). ``sigma`` is a float, a 0-d tensor or one value per sample. The derivative of the
    probability-flow ODE is (x - D(x, sigma)) / sigma (EDM eq. 3 with s(t) = 1, sigma(t) = t).
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__(backbone, float(sigma_data), 0.0)


class TrajectoryFunction(nn.Module):
    """CTM's G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s), g = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t),
    c_noise(s)) with EDM's scalings at t (Kim et al., ICLR 2024, sec. 3; sony/ctm ``get_denoised_and_G`` with
    inner_parametrization='edm', outer_parametrization='euler').

    So G(x, t, t) = x bit for bit, G(x, t, 0) = g(x, t, 0), and g(x, t, t) is a denoiser D(x, t) (what CTM's DSM term
    trains; score = (g(x, t, t) - x) / t^2). ``backbone`` is called as ``F(x, c_noise_t, s_timestep=c_noise_s,
    **kwargs)`` (a :class:`gensample.models.ctm_unet.CTMUNet2DModel`, or any callable with that signature). ``t`` and
    ``s`` are floats, 0-d tensors or one value per sample, with 0 <= s <= t and t > 0.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    @staticmethod
    def _times(x: torch.Tensor, t, s) -> tuple[torch.Tensor, torch.Tensor]:
        t = per_sample(t, x).to(torch.float64)
        s = per_sample(s, x).to(torch.float64)
        if (t <= 0).any():
            raise ValueError(f"t must be > 0, got min {float(t.min())}.")
        if (s < 0).any() or (s > t).any():
            raise ValueError("need 0 <= s <= t for every sample (G jumps from t down to s), got "
                             f"t={t.flatten().tolist()[:8]}, s={s.flatten().tolist()[:8]}.")
        return t, s

    def backbone_output(self, x: torch.Tensor, t, s, **kwargs: Any) -> torch.Tensor:
        """F(c_in(t) x, c_noise(t), c_noise(s)): the raw network output."""
        t, s = self._times(x, t, s)
        s_timestep = noise_conditioning(s.flatten()).to(torch.float32)
        return preconditioned_output(self.backbone, x, t, self.sigma_data, s_timestep=s_timestep, **kwargs)

    def g(self, x: torch.Tensor, t, s, **kwargs: Any) -> torch.Tensor:
        """g(x, t, s) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s)) (EDM Table 1 scalings at t)."""
        t64, _ = self._times(x, t, s)
        c_skip, c_out = edm_scalings(t64, self.sigma_data)
        return combine(x, self.backbone_output(x, t, s, **kwargs), c_skip, c_out)

    def denoise(self, x: torch.Tensor, sigma, **kwargs: Any) -> torch.Tensor:
        """g(x, sigma, sigma): the student as an EDM denoiser D(x, sigma) (CTM's DSM term, score-based sampling)."""
        return self.g(x, sigma, sigma, **kwargs)

    def forward(self, x: torch.Tensor, t, s, **kwargs: Any) -> torch.Tensor:
        """G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)."""
        t64, s64 = self._times(x, t, s)
        return trajectory_jump(x, self.g(x, t, s, **kwargs), s64 / t64)
