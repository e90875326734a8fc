"""The learning-rate schedule: linear warmup, then cosine decay to a floor, per parameter group.

Optimizer step k (1-based) of an epoch of T steps with W = ceil(warmup_ratio * T) warmup steps
runs at base_lr * lr_factor(k, T, W, floor):
    k <= W:  k / W
    k >  W:  floor + (1 - floor) * (1 + cos(pi * (k - W - 1) / (T - W - 1))) / 2
so steps W and W + 1 run at the full lr, step T at the floor, and no step before it at lr 0. DeepSpeed's WarmupCosineLR is not used: it starts at iteration -1, so
its first two steps run at lr 0 and short runs end above the floor.
"""

from __future__ import annotations

import math

import torch


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, floor: float) -> float:
    """The factor of each group's base lr at optimizer step `step` (1-based)."""
    if step <= warmup:
        return step / warmup
    decay_steps = total_steps - warmup - 1
    progress = min(1.0, (step - warmup - 1) / decay_steps) if decay_steps > 0 else 0.0
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """lr_factor as a torch scheduler: DeepSpeed steps it after each optimizer step and saves
    it with the checkpoint. After a resume the groups run at the restored step's lr at once."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup: int, floor: float) -> None:
        # LambdaLR's epoch counts finished steps from 0: the next step is epoch + 1.
        super().__init__(optimizer, lambda epoch: lr_factor(epoch + 1, total_steps, warmup, floor))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            group["lr"] = lr
