"""Learning-rate multipliers for the Trainer: linear warm-up, then constant, cosine or linear decay."""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def check_lr_schedule(schedule: str, warmup_steps: int, decay_steps: int, final_fraction: float = 0.0) -> None:
    """Raise a ValueError naming the argument when a schedule cannot be built."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not known; use one of {list(LR_SCHEDULES)}.")
    if warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps={warmup_steps} must be >= 0.")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"lr_final_fraction={final_fraction} must lie in [0, 1].")
    if schedule != "constant" and decay_steps <= warmup_steps:
        raise ValueError(f"lr_schedule={schedule!r} decays over {decay_steps} steps (lr_decay_steps, or max_steps), "
                         f"which must exceed lr_warmup_steps={warmup_steps}; lower the warm-up, raise the decay "
                         "steps or use lr_schedule='constant'.")


def lr_multiplier(step: int, schedule: str = "constant", warmup_steps: int = 0, decay_steps: int = 0,
                  final_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps. Then "constant" stays at 1; "cosine" follows
    final + (1 - final) (1 + cos(pi t)) / 2 and "linear" 1 - (1 - final) t, with t = (step - warmup) / (decay - warmup)
    clipped to [0, 1], so the rate reaches ``final_fraction`` of the base at ``decay_steps`` and stays there.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    t = min(1.0, max(0.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps)))
    if schedule == "cosine":
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - (1.0 - final_fraction) * t
    raise ValueError(f"lr_schedule={schedule!r} is not known; use one of {list(LR_SCHEDULES)}.")
