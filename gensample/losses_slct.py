"""sLCT's Cauchy distance and its adaptive scale c (Dao et al., "Improved Training Technique for Latent Consistency
Models", ICLR 2025, arXiv 2502.01441; research code quandao10/LCT, branch ``ot`` @ 3f636db).

Both are meant to be merged into :mod:`gensample.losses` (``DISTANCES["cauchy"] = cauchy``); until then
:func:`get_lct_distance` resolves "cauchy" next to the distances of :mod:`gensample.losses`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["cauchy", "slct_cauchy_c", "get_lct_distance"]


def cauchy(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sLCT Cauchy distance, one value per sample: ``ln(1 + MSE_b / (2 c^2))``.

    ``MSE_b`` is the **mean** of (x - y)^2 over the elements (C, H, W) of sample b: the research code
    (``KarrasDenoiser.consistency_losses``, ``loss_norm == "cauchy"``) computes
    ``log(0.5 * mean_flat(diff^2) + c^2) - 2 log(c)``, i.e. the paper's ``||.||^2`` is averaged over elements, not
    summed, and ``c`` (see :func:`slct_cauchy_c`) lives on that per-element scale (reference pitfall P5/P11). The batch
    reduction (``mean_b lambda_b * cauchy_b``) is the caller's, as for every distance in :mod:`gensample.losses`.
    Written with ``log1p`` (equal to the reference's form, more accurate for small MSE). ``c`` defaults to sLCT's
    first-stage value 0.00054 sqrt(d), d = C*H*W (``--custom-constant-c`` unset).

    Reference value (residual 0.01 in every element, c = 0.03456): 0.0410097.
    """
    if x.shape != y.shape:
        raise ValueError(f"cauchy: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}.")
    diff = (x - y).flatten(1).float()
    if c is None:
        c = 0.00054 * math.sqrt(diff.shape[1])
    if not c > 0:
        raise ValueError(f"the Cauchy scale c must be > 0, got {c}.")
    mse = diff.square().mean(1)
    return torch.log1p(mse / (2.0 * c * c))


def slct_cauchy_c(num_sigmas: int) -> float:
    """sLCT's adaptive Cauchy scale ``c(N) = exp(-1.15 ln(N - 1) - 0.85)`` for a grid of N noise levels.

    ``train_cm_latent.py --c-by-loss-std`` (fitted to the std of the MSE-form consistency residual, paper Fig. 4).
    The research code applies it only once N > s0 + 1, i.e. from the second curriculum stage on; the first stage keeps
    c = 0.00054 sqrt(d) (see :class:`gensample.methods.lct.LatentConsistencyTraining`). The constants are for the
    MSE-form Cauchy loss only. Reference values: N = 21 -> 0.0136353, 41 -> 0.00614442, 641 -> 0.000253363.
    """
    if int(num_sigmas) != num_sigmas or num_sigmas < 2:
        raise ValueError(f"num_sigmas must be an integer >= 2 (c(N) needs N - 1 >= 1), got {num_sigmas}.")
    return math.exp(-1.15 * math.log(num_sigmas - 1) - 0.85)


def get_lct_distance(name: str) -> Callable[..., torch.Tensor]:
    """``"cauchy"`` or any name of :func:`gensample.losses.get_distance`."""
    from .losses import get_distance  # here, so that gensample.losses may import this module

    if name == "cauchy":
        return cauchy
    try:
        return get_distance(name)
    except ValueError as e:
        raise ValueError(f"{e} (or 'cauchy').") from None
