"""DiViCoConfig: the settings of the compression (pipeline/model/divico.py has the method).

Torch-free on purpose: the run config (pipeline/train/config.py) types its `divico:` section with
this dataclass; only what a mode does (compresses, ...) imports its class, and with it torch.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import TYPE_CHECKING

from pipeline.contract import TAUS

if TYPE_CHECKING:
    from pipeline.model.modes import CompressionMode

# The compression modes `divico.mode` can name, as "module:Class" (pipeline/model/modes.py has the
# interface): a new mode is one file plus one line here.
MODES = {
    "none": "pipeline.model.modes:Uncompressed",
    "fastv": "pipeline.model.modes:FastV",
    "divico": "pipeline.model.modes:DiViCoMode",
    "select_only": "pipeline.model.modes:SelectOnly",
    "point_estimate": "pipeline.model.modes:PointEstimate",
    "random": "pipeline.model.modes:RandomKeep",
    "fastervlm": "pipeline.model.baselines.fastervlm:FasterVLM",
    "visionzip": "pipeline.model.baselines.visionzip:VisionZip",
    "deco": "pipeline.model.baselines.deco:DeCo",
    "dart": "pipeline.model.baselines.dart:DART",
    "divico_dart": "pipeline.model.baselines.dart:DiViCoOverDART",
    "pdrop": "pipeline.model.baselines.pdrop:PyramidDrop",
    "recoverable": "pipeline.model.baselines.recoverable:RecoverableCompression",
    "recoverable_budget": "pipeline.model.baselines.recoverable:RecoverableCompressionAtBudget",
    "mustdrop": "pipeline.model.baselines.mustdrop:MustDrop",
    "mustdrop_budget": "pipeline.model.baselines.mustdrop:MustDropAtBudget",
    "divico_mustdrop": "pipeline.model.baselines.mustdrop:DiViCoOverMustDrop",
}
QUERY_RULES = ("first_answer", "last")
KL_VARIANTS = ("released", "standard")
INITS = ("released", "zero")
COUNT_RULES = ("project", "released")
# The gap encoders `divico.encoder` can name, as "module:Class"; each is built as
# Class(hidden_size, config) and called as the DiViCo module's gap_encoder slot (divico.py's
# docstring). A new encoder, such as the Mixture-of-Experts stage's, is one file plus one line here.
GAP_ENCODERS = {"mlp": "pipeline.model.divico:GapEncoder", "moe": "pipeline.model.moe:MixtureGapEncoder"}


@dataclass
class MixtureSettings:
    """The Mixture-of-Experts gap encoder (`encoder: moe`, pipeline/model/moe.py): one expert of
    the released g_theta's shape per centre rate, mixed by a router that reads the rate."""

    # Each expert's centre rate (kept fraction), ascending: the paper's large / medium / small
    # compression. The routing prior pulls each rate toward the expert whose centre is nearest in log tau.
    centres: list[float] = field(default_factory=lambda: list(TAUS))
    # The rates the model is trained for and may be run at, [low, high].
    tau_range: list[float] = field(default_factory=lambda: [0.05, 0.25])
    router_hidden: int = 64
    # The router reads log tau and, when true, a summary of the sample's tokens (v_p and the mean kept token).
    router_reads_tokens: bool = True
    # Weight of the routing prior (-log of the nearest expert's router weight, an auxiliary loss).
    prior_weight: float = 0.1

    def validate(self, prefix: str = "DiViCoConfig.") -> None:
        if len(self.tau_range) != 2 or not 0.0 < self.tau_range[0] < self.tau_range[1] <= 1.0:
            raise ValueError(f"{prefix}moe.tau_range={self.tau_range}: expected [low, high] with 0 < low < high <= 1")
        if len(self.centres) < 2 or list(self.centres) != sorted(set(self.centres)):
            raise ValueError(f"{prefix}moe.centres={self.centres}: expected two or more distinct rates, ascending")
        if not (self.tau_range[0] <= self.centres[0] and self.centres[-1] <= self.tau_range[1]):
            raise ValueError(f"{prefix}moe.centres={self.centres}: outside tau_range {self.tau_range}")
        if self.router_hidden < 1:
            raise ValueError(f"{prefix}moe.router_hidden={self.router_hidden}: must be >= 1")
        if self.prior_weight < 0:
            raise ValueError(f"{prefix}moe.prior_weight={self.prior_weight}: must be >= 0")


@dataclass
class MustDropSettings:
    """MustDrop's decoder filter (modes mustdrop, mustdrop_budget, divico_mustdrop;
    pipeline/model/baselines/mustdrop.py)."""

    # The decoder layers (0-indexed) whose attention the filter reads, in a decoder of
    # reference_depth layers; the drop takes effect from the next layer. Other depths scale
    # them: round(l x L / reference_depth). The official 32-layer schedule by default.
    filter_layers: list[int] = field(default_factory=lambda: [2, 6, 10, 14])
    reference_depth: int = 32
    # The filter's (gamma, alpha), both or neither: None takes the published TextVQA ones at
    # the budget tau names (192, 128 or 64 of 576); set, `mustdrop` runs at any tau (other
    # benchmarks' official scripts use other values: VizWiz at 64 tokens 0.005 and 0.001).
    gamma: float | None = None
    alpha: float | None = None

    def validate(self, prefix: str = "DiViCoConfig.") -> None:
        layers = list(self.filter_layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.reference_depth:
            raise ValueError(f"{prefix}mustdrop.filter_layers={layers}: expected distinct layers, ascending, in "
                             f"[0, reference_depth={self.reference_depth})")
        thresholds = (self.gamma, self.alpha)
        if (self.gamma is None) != (self.alpha is None) or any(v is not None and v < 0 for v in thresholds):
            raise ValueError(f"{prefix}mustdrop.gamma={self.gamma}, alpha={self.alpha}: set both (>= 0) or neither")


@dataclass
class DiViCoConfig:
    """Settings of the compression. tau is the kept fraction of visual tokens: the paper's
    small / medium / large compression are tau = 1/6, 1/9, 1/15 (576 -> 96, 64, 38)."""

    mode: str = "divico"
    tau: float = TAUS[1]
    layer: int = 2  # K: selection uses layer K-1's attention; layers >= K see fewer tokens
    beta: float = 0.02  # weight of the KL term (eq. 9)
    # The selection query: "first_answer" (the token before the first answer) or "last"
    # (the released code's rule: the last non-pad token, which in training sees the answers).
    query: str = "first_answer"
    sigma0: float = 0.075
    kl: str = "released"  # or "standard"
    # Gap-encoder init: "released" (xavier weights), or "zero": the mu half of the last layer
    # starts at zero, so training starts exactly at select_only instead of v_s + noise.
    init: str = "released"
    encoder: str = "mlp"  # a key of GAP_ENCODERS: "mlp" (the released g_theta) or "moe"
    moe: MixtureSettings = field(default_factory=MixtureSettings)  # read when encoder is "moe"
    mustdrop: MustDropSettings = field(default_factory=MustDropSettings)  # read by the MustDrop modes
    # KL normalised per kept token (a mean over kept tokens) instead of summed over them: beta
    # then weighs the same at every rate. The released sum weighs it 2.5x more at tau 1/6 than
    # at 1/15, so a model trained at several rates wants this (the MoE recipe sets it).
    kl_per_token: bool = False
    seed: int = 0  # random mode: seeds each image's draw of kept token slots
    # How many visual tokens are kept and averaged: "project": round(tau N) kept, every dropped
    # one averaged into v_p; "released": int(tau N) kept (truncated) and the lowest int((1 - tau) N)
    # by score averaged, as the released code's two top-k calls do (one token, the best dropped,
    # is then left out where the truncations do not add up to N: at tau 1/15 of 576, not at 1/9).
    counts: str = "project"

    def validate(self, num_layers: int | None = None, prefix: str = "DiViCoConfig.") -> None:
        """Raise ValueError naming the first bad setting, as `prefix` + its name (`divico.tau=`
        in a recipe or on eval's command line). The one check of tau and K: training's config,
        evaluation's overrides, saved settings and the model wrapper all call it."""
        for name, choices in (("mode", tuple(MODES)), ("query", QUERY_RULES), ("kl", KL_VARIANTS), ("init", INITS),
                              ("encoder", tuple(GAP_ENCODERS)), ("counts", COUNT_RULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{prefix}{name}={getattr(self, name)!r}: expected one of {choices}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"{prefix}tau={self.tau}: the kept fraction must be in (0, 1]")
        if (problem := self.compression.tau_problem(self.tau)) is not None:
            raise ValueError(f"{prefix}tau={self.tau}: {problem}")
        if self.beta < 0:
            raise ValueError(f"{prefix}beta={self.beta}: must be >= 0")
        if self.sigma0 <= 0:
            raise ValueError(f"{prefix}sigma0={self.sigma0}: must be > 0")
        self.mustdrop.validate(prefix)
        if self.encoder == "moe":
            self.moe.validate(prefix)
            low, high = self.moe.tau_range
            if not low <= self.tau <= high:
                raise ValueError(f"{prefix}tau={self.tau:.4f}: outside the rates this mixture-of-experts "
                                 f"model is trained for, moe.tau_range=[{low}, {high}]")
        if self.layer < 1 or (num_layers is not None and self.layer >= num_layers):
            limit = f"in [1, {num_layers - 1}]" if num_layers is not None else ">= 1"
            raise ValueError(f"{prefix}layer={self.layer}: K must be {limit}, since selection reads layer "
                             "K-1's attention and layers >= K see the compressed sequence")

    @property
    def compression(self) -> CompressionMode:
        """The mode's class instance (MODES): what it keeps and what it adds."""
        if self.mode not in MODES:
            raise ValueError(f"DiViCoConfig.mode={self.mode!r}: expected one of {tuple(MODES)}")
        return _mode(MODES[self.mode])(self)

    def kept_tokens(self, num_visual: int, tau: float | None = None) -> int | None:
        """Of an image's `num_visual` tokens, how many the decoder's compressed layers see at
        `tau` (config.tau when None); None when the mode decides per image."""
        return self.compression.kept_tokens(num_visual, self.tau if tau is None else tau, self.counts)

    @property
    def compresses(self) -> bool:
        return self.compression.compresses

    @property
    def uses_gap_encoder(self) -> bool:
        return self.compression.gap_encoder

    @property
    def uses_kl(self) -> bool:
        return self.compression.variational

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DiViCoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiViCo settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        for name, settings in (("moe", MixtureSettings), ("mustdrop", MustDropSettings)):
            if isinstance(values.get(name), dict):
                unknown = sorted(set(values[name]) - {f.name for f in fields(settings)})
                if unknown:
                    raise ValueError(f"unknown DiViCo {name} settings {unknown}")
                values[name] = settings(**values[name])
        return cls(**values)


@cache
def _mode(path: str) -> type[CompressionMode]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
