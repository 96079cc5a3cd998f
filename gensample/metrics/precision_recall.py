"""Fidelity and diversity of generated samples in a feature space, with k-nearest-neighbour balls:

* precision and recall (Kynkaanniemi et al., NeurIPS 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models", eq. 1-3): the real manifold is the union of balls B(r_i, NND_k(r_i)) around every real feature,
  with NND_k the distance to its k-th nearest real neighbour (itself excluded); precision is the fraction of generated
  features inside it. Recall swaps the roles: the fraction of real features inside the generated manifold.
* density and coverage (Naeem et al., ICML 2020, "Reliable Fidelity and Diversity Metrics for Generative Models",
  eq. 5-6): density = (1 / (k M)) sum_j sum_i 1[g_j in B(r_i, NND_k(r_i))]; coverage = the fraction of real
  features whose ball holds at least one generated feature. Coverage uses only real-sample balls, so it is less
  sensitive to generated outliers than recall.

Distances are Euclidean; a point on a ball's boundary counts as inside (<=, as both papers' code). k = 5 is both
papers' default.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_radii", "precision_recall_coverage"]


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"`{name}` must be features of shape (N, D) with N >= 2, got {tuple(x.shape)}.")
    return x


def knn_radii(features: torch.Tensor, k: int = 5) -> torch.Tensor:
    """NND_k: the distance of every row of ``features`` to its k-th nearest other row, (N,) float64."""
    features = _as_features(features, "features")
    if not isinstance(k, int) or not 1 <= k <= len(features) - 1:
        raise ValueError(f"k must be an integer in [1, N - 1 = {len(features) - 1}], got {k!r}.")
    distances = torch.cdist(features, features)
    # the k-th smallest distance after the row's own zero: index k of the sorted row
    return distances.kthvalue(k + 1, dim=1).values


def precision_recall_coverage(real, generated, k: int = 5) -> dict[str, float]:
    """{"precision", "recall", "density", "coverage"} of ``generated`` against ``real`` features ((N, D) and (M, D),
    tensors or arrays) with k-nearest-neighbour balls (see the module docstring)."""
    real, generated = _as_features(real, "real"), _as_features(generated, "generated")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real and generated features differ in dimension: {real.shape[1]} vs {generated.shape[1]}.")
    real_radii, gen_radii = knn_radii(real, k), knn_radii(generated, k)
    cross = torch.cdist(real, generated)  # (N, M): real i to generated j
    inside_real = cross <= real_radii[:, None]  # generated j inside the ball of real i
    inside_gen = cross <= gen_radii[None, :]  # real i inside the ball of generated j
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float(inside_gen.any(1).double().mean()),
        "density": float(inside_real.double().sum() / (k * generated.shape[0])),
        "coverage": float(inside_real.any(1).double().mean()),
    }
