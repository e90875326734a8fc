"""The Mixture-of-Experts stage's rates: which keep ratio each optimizer step trains at, and
the routing prior's weight over the epoch.

A step's rate is a function of (train.seed, step) alone: every rank draws the same one without
talking to the others, and a resumed run replays the rates of the uninterrupted one.
    log_uniform (default): log tau uniform on divico.moe.tau_range
    uniform:               tau uniform on it
    all_centres:           every sample at each expert's centre rate in the same step; layers < K
                           run once, layers >= K once per rate on the short sequences (M3 found
                           averaging over all scales better than sampling one per sample)
The routing prior's weight decays linearly from divico.moe.prior_weight to 0 over the first
`moe.prior_anneal` of the epoch (0: constant).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.model.settings import DiViCoConfig

RATE_SCHEDULES = ("log_uniform", "uniform", "all_centres")


def step_rate(schedule: str, seed: int, step: int, tau_range: list[float]) -> float:
    """The keep ratio of optimizer step `step` (0-based) under a sampling schedule."""
    draw = float(np.random.default_rng([seed, step]).random())
    low, high = tau_range
    if schedule == "log_uniform":
        return math.exp(math.log(low) + draw * (math.log(high) - math.log(low)))
    if schedule == "uniform":
        return low + draw * (high - low)
    raise ValueError(f"moe.rate_schedule={schedule!r}: not a sampling schedule, expected log_uniform or uniform")


def prior_factor(step: int, total_steps: int, anneal: float) -> float:
    """The routing prior's weight at step `step` (0-based) as a fraction of its full weight."""
    if anneal <= 0:
        return 1.0
    return max(0.0, 1.0 - step / (anneal * total_steps))


def step_inputs(divico: DiViCoConfig, schedule: str, anneal: float, seed: int, step: int,
                total_steps: int) -> dict[str, Any]:
    """The extra forward() arguments of step `step` for a mixture-of-experts model; {} otherwise."""
    if divico.encoder != "moe" or not divico.uses_gap_encoder:
        return {}
    factor = prior_factor(step, total_steps, anneal)
    weights = {"routing_prior": divico.moe.prior_weight * factor}
    if schedule == "all_centres":
        return {"branch_rates": tuple(divico.moe.centres), "aux_weights": weights}
    return {"keep_ratio": step_rate(schedule, seed, step, divico.moe.tau_range), "aux_weights": weights}
