"""Distances between a prediction and its target, each returning one value per sample (B,), behind one registry
(:data:`DISTANCES`, :func:`get_distance`). The batch reduction (mean_b lambda_b d_b) is the caller's.

| name | formula (per sample b, d = C*H*W elements) | from |
| --- | --- | --- |
| ``pseudo_huber`` | sqrt(sum (x - y)^2 + c^2) - c | iCT (Song & Dhariwal 2023, sec. 3.3) |
| ``pseudo_huber_elementwise`` | mean(sqrt((x - y)^2 + c^2) - c) | public code only, not iCT |
| ``cauchy`` | ln(1 + mean((x - y)^2) / (2 c^2)) | sLCT (Dao et al., ICLR 2025) |
| ``l2`` | mean((x - y)^2) | CM's ``l2`` |
| ``edm`` | lambda(sigma) mean((D - x_0)^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2 | EDM (Karras et al. 2022) |

The scale c of the first three defaults to iCT's 0.00054 sqrt(d) (:func:`scale_or_default`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .sigmas import SIGMA_DATA

__all__ = [
    "pseudo_huber_constant", "scale_or_default", "pseudo_huber", "pseudo_huber_elementwise", "squared_l2", "cauchy",
    "slct_cauchy_c", "edm_loss_weight", "edm_denoising_loss", "DISTANCES", "get_distance",
]


def pseudo_huber_constant(num_dims: int) -> float:
    """iCT's c = 0.00054 sqrt(d), d = C*H*W (Song & Dhariwal 2023, sec. 3.3; 3x32x32 -> 0.02993). sLCT keeps it as
    the Cauchy scale of its first curriculum stage."""
    return 0.00054 * math.sqrt(num_dims)


def scale_or_default(c: float | None, num_dims: int) -> float:
    """``c``, or :func:`pseudo_huber_constant` of the per-sample dimension when it is None."""
    return pseudo_huber_constant(num_dims) if c is None else c


def _flat_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).flatten(1).float()


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """iCT pseudo-Huber on the per-sample L2 norm: d(x, y) = sqrt(||x - y||_2^2 + c^2) - c."""
    diff = _flat_diff(x, y)
    c = scale_or_default(c, diff.shape[1])
    return (diff.square().sum(1) + c**2).sqrt() - c


def pseudo_huber_elementwise(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Element-wise pseudo-Huber, then the mean over elements: mean(sqrt((x - y)^2 + c^2) - c).

    Not the iCT loss: this is the variant of some public code (diffusers' research script, Kinyugo). Offered only
    under this name so it is never picked by accident.
    """
    diff = _flat_diff(x, y)
    c = scale_or_default(c, diff.shape[1])
    return ((diff.square() + c**2).sqrt() - c).mean(1)


def squared_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (CM's ``l2``, mean over C, H, W)."""
    return _flat_diff(x, y).square().mean(1)


def cauchy(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sLCT Cauchy distance (Dao et al., "Improved Training Technique for Latent Consistency Models", ICLR 2025):
    ``ln(1 + MSE_b / (2 c^2))``.

    ``MSE_b`` is the **mean** of (x - y)^2 over the elements of sample b: the research code (quandao10/LCT,
    ``KarrasDenoiser.consistency_losses``, ``loss_norm == "cauchy"``) computes
    ``log(0.5 * mean_flat(diff^2) + c^2) - 2 log(c)``, i.e. the paper's ``||.||^2`` is averaged over elements, not
    summed, and ``c`` (see :func:`slct_cauchy_c`) lives on that per-element scale. Written with ``log1p`` (equal to
    the reference's form, more accurate for small MSE).

    Reference value (residual 0.01 in every element, c = 0.03456): 0.0410097.
    """
    if x.shape != y.shape:
        raise ValueError(f"cauchy: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}.")
    diff = _flat_diff(x, y)
    c = scale_or_default(c, diff.shape[1])
    if not c > 0:
        raise ValueError(f"the Cauchy scale c must be > 0, got {c}.")
    return torch.log1p(diff.square().mean(1) / (2.0 * c * c))


def slct_cauchy_c(num_sigmas: int) -> float:
    """sLCT's adaptive Cauchy scale ``c(N) = exp(-1.15 ln(N - 1) - 0.85)`` for a grid of N noise levels.

    quandao10/LCT ``train_cm_latent.py --c-by-loss-std`` (fitted to the std of the MSE-form consistency residual,
    paper Fig. 4). The research code applies it only once N > s0 + 1, i.e. from the second curriculum stage on; the
    first stage keeps c = 0.00054 sqrt(d) (see :class:`gensample.methods.lct.LatentConsistencyTraining`). The
    constants are for the MSE-form Cauchy loss only. Reference values: N = 21 -> 0.0136353, 41 -> 0.00614442,
    641 -> 0.000253363.
    """
    if int(num_sigmas) != num_sigmas or num_sigmas < 2:
        raise ValueError(f"num_sigmas must be an integer >= 2 (c(N) needs N - 1 >= 1), got {num_sigmas}.")
    return math.exp(-1.15 * math.log(num_sigmas - 1) - 0.85)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2 (EDM Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoising_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                       sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) mean((D(x_0 + sigma z, sigma) - x_0)^2) per sample (EDM sec. 5; NVlabs/edm ``EDMLoss``, which
    sums over elements instead: a constant factor). ``sigma`` has shape (B,)."""
    return edm_loss_weight(sigma, sigma_data).float() * squared_l2(denoised, x0)


DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "pseudo_huber": pseudo_huber,
    "pseudo_huber_elementwise": pseudo_huber_elementwise,
    "l2": squared_l2,
    "cauchy": cauchy,
    "edm": edm_denoising_loss,
}


def get_distance(name: str) -> Callable[..., torch.Tensor]:
    """The distance registered as ``name`` in :data:`DISTANCES`."""
    if name not in DISTANCES:
        raise ValueError(f"Unknown distance {name!r}; choose one of {sorted(DISTANCES)}.")
    return DISTANCES[name]
