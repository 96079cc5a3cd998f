"""The contract between a training method and the Trainer.

A method is an ``nn.Module`` that owns its networks' roles (student, frozen teacher, target EMA, discriminator,
adapter) and turns a batch and a step into a dict of named losses. The Trainer owns optimizers, accumulation, mixed
precision, evaluation EMA, checkpoints, logging and evaluation. Curriculum state must be a function of the step, so
that restoring the step restores it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainingMethod(nn.Module):
    #: name recorded in checkpoints; resuming a checkpoint of another method is refused.
    method_name: str = "base"

    def trainable_groups(self) -> dict[str, nn.Module]:
        """Optimizer groups: one optimizer per entry (e.g. {"generator": ..., "discriminator": ...})."""
        raise NotImplementedError

    def groups_for_step(self, step: int) -> list[str]:
        """Which groups take an optimizer step at ``step`` (alternating GAN updates override this). The Trainer
        updates an evaluation EMA only after steps in which a group holding its parameters was stepped."""
        return list(self.trainable_groups())

    def optimizer_settings(self) -> dict[str, dict[str, Any]]:
        """Per-group optimizer settings that differ from the Trainer's defaults (``TrainConfig.learning_rate``,
        ``adam_betas``, ``weight_decay``): ``{group: {"lr": float, "betas": (b1, b2), "weight_decay": float}}``, any
        subset of the keys (e.g. a GAN discriminator's ``{"discriminator": {"betas": (0.5, 0.9)}}``).
        ``TrainConfig.group_optimizer_settings`` overrides these key by key."""
        return {}

    def ema_modules(self) -> dict[str, nn.Module]:
        """Networks that get an evaluation EMA (the exported pipeline uses these averages)."""
        return {}

    def forward(self, batch: torch.Tensor, step: int, group: str) -> dict[str, torch.Tensor]:
        """Losses for ``group`` at ``step``; must contain "loss", the scalar to minimise."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Hook after every optimizer step (e.g. a target-network EMA update)."""

    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        """A diffusers pipeline around ``eval_modules`` (the EMA copies of :meth:`ema_modules`)."""
        raise NotImplementedError

    def method_config(self) -> dict[str, Any]:
        """Hyper-parameters that define the objective; saved with every checkpoint."""
        return {}
