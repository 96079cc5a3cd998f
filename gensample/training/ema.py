"""Exponential moving average of weights, for evaluation only (never used in a loss)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- rate * ema + (1 - rate) * param (openai ``update_ema``), with the usual warm-up
    rate_k = min(rate, (1 + k) / (10 + k)) so that short runs do not evaluate a mostly-random average.
    Buffers (e.g. norm statistics) are copied, not averaged."""

    def __init__(self, model: nn.Module, rate: float = 0.999, warmup: bool = True):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema rate must be in [0, 1), got {rate}.")
        self.rate = rate
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_rate(self) -> float:
        if not self.warmup:
            return self.rate
        return min(self.rate, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        rate = self.current_rate()
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - rate)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates
