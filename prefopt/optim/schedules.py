"""Learning-rate schedules: a multiplier on the optimizer's lr per step."""
from __future__ import annotations

import math

import torch

from utils import ConfigError


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over `warmup_steps`, then
    constant: 1;  linear: down to 0 at `total_steps`;  cosine: half a cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = ("constant", "linear", "cosine")


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    if schedule not in SCHEDULES:
        raise ConfigError(f"scheduler={schedule} is unknown; choose one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, schedule, warmup_steps, total_steps))
