"""The sigma-space math every other part of gensample builds on: noise grids (:mod:`.sigmas`), preconditioning
(:mod:`.parametrization`), sampler and solver steps (:mod:`.sampling`) and distances (:mod:`.losses`).

This package imports torch, numpy and math only, never the rest of gensample.
"""
from __future__ import annotations

from . import losses, parametrization, sampling, sigmas
from .parametrization import ConsistencyFunction, EDMDenoiser, TrajectoryFunction

__all__ = ["losses", "parametrization", "sampling", "sigmas", "ConsistencyFunction", "EDMDenoiser",
           "TrajectoryFunction"]
