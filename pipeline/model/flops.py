"""Analytic FLOPs of a prefill with and without DiViCo, built on the paper's eq. 10.

Counted as FLOPs = 2 x multiply-adds (what torch's FlopCounterMode counts); the paper's
eq. 10, 4 n d^2 + 2 n^2 d + 2 n d m per layer, counts multiply-adds, and ratios are the
same either way. Everything counted is a matmul. Per decoder layer on n query tokens attending over n_k keys:
- q and o projections: 2 * n * d * d each; k and v: 2 * n * d * d_kv each (d_kv = d with
  multi-head attention, smaller with grouped-query attention);
- attention scores and weighted sum: 2 * 2 * n * n_k * d (the full n x n_k product, as the
  kernels compute it; no credit for the causal half);
- Llama's gated FFN has three d x m matrices: 3 * 2 * n * d * m (eq. 10 has two).
Plus, with compression: the selection scoring (one row of scores per head from the q and k
that layer K-1 projected anyway: 2 * N * d), the gap encoder (2 * N_i' * (2d*d + d*2d)), and
the lm_head on the positions whose logits are computed. Norms, RoPE and element-wise ops are not
counted (nor by FlopCounterMode); the vision tower is the same for every mode and left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.model.divico import kept_count
from pipeline.model.settings import DiViCoConfig


@dataclass(frozen=True)
class DecoderGeometry:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> DecoderGeometry:
        return cls(hidden=text_config.hidden_size, intermediate=text_config.intermediate_size,
                   layers=text_config.num_hidden_layers, heads=text_config.num_attention_heads,
                   kv_heads=text_config.num_key_value_heads, vocab=text_config.vocab_size)

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


def layer_flops(g: DecoderGeometry, n: int, n_keys: int | None = None) -> int:
    n_keys = n if n_keys is None else n_keys
    d, m = g.hidden, g.intermediate
    projections = 2 * n * d * (2 * d + 2 * g.kv_dim)
    attention = 2 * 2 * n * n_keys * d
    ffn = 3 * 2 * n * d * m
    return projections + attention + ffn


def compressed_length(num_tokens: int, num_visual: int, tau: float, counts: str = "project") -> int:
    """The sequence layers >= K see: the text tokens and the kept visual ones."""
    return num_tokens - num_visual + kept_count(num_visual, tau, counts)


def encoder_flops(g: DecoderGeometry, num_kept: int, config: DiViCoConfig | None = None) -> int:
    """The gap encoder on `num_kept` tokens: g_theta's two matmuls; a Mixture-of-Experts
    encoder runs every expert and its router (on the rate features and the token summary)."""
    d = g.hidden
    one_expert = 2 * num_kept * (2 * d * d + d * 2 * d)
    if config is None or config.encoder != "moe":
        return one_expert
    experts, hidden = len(config.moe.centres), config.moe.router_hidden
    inputs = experts + (2 * d if config.moe.router_reads_tokens else 0)
    return experts * one_expert + 2 * num_kept * (inputs * hidden + hidden * experts + experts * experts)


def decoder_tokens(num_layers: int, layer: int, num_tokens: int, num_visual: int, taus: list[float]) -> int:
    """Tokens through the decoder for one sample: layers < K on the whole sequence once, layers
    >= K on the compressed one once per rate in `taus` (one rate, or all_centres' several)."""
    return layer * num_tokens + (num_layers - layer) * sum(compressed_length(num_tokens, num_visual, tau)
                                                           for tau in taus)


def own_visual_counts(num_layers: int, num_visual: int, config: DiViCoConfig) -> list[int | None]:
    """The visual tokens a compressing mode leaves after each cut (the first, then each later
    stage) by its own rule; None where it decides per image."""
    mode = config.compression
    split = 0 if mode.before_decoder else config.layer
    return [config.kept_tokens(num_visual)] + [mode.stage_kept(num_visual, rate)
                                               for _, rate in mode.later_stages(num_layers, split, config.tau)]


def visual_counts(num_layers: int, num_visual: int, config: DiViCoConfig,
                  num_kept: int | Sequence[int] | None = None) -> list[int]:
    """The visual tokens left after each cut of a compressing mode: the first (at layer K, or
    before the decoder), then each later stage. `num_kept`: the measured counts, a prefix of
    them, or the first alone (an int), for a mode that decides them per image; the rest are the
    mode's own."""
    measured = [] if num_kept is None else [num_kept] if isinstance(num_kept, int) else list(num_kept)
    own = own_visual_counts(num_layers, num_visual, config)
    counts = measured + own[len(measured):]
    if None in counts:
        raise ValueError(f"mode {config.mode!r} decides per image how many visual tokens it keeps at cut "
                         f"{counts.index(None) + 1} of {len(counts)}: pass the measured counts (num_kept)")
    return counts


def layer_lengths(num_layers: int, num_tokens: int, num_visual: int, config: DiViCoConfig,
                  num_kept: int | Sequence[int] | None = None) -> list[int]:
    """The sequence each of the `num_layers` decoder layers sees, for one sample of `num_tokens`
    tokens, `num_visual` of them visual (`num_kept` as in visual_counts): the whole one before
    layer K, the text and kept visual tokens from K on (from the first layer for a mode acting
    before the decoder), shorter again after each later stage (PyramidDrop, MustDrop)."""
    if not config.compresses or num_visual == 0:
        return [num_tokens] * num_layers
    split = 0 if config.compression.before_decoder else config.layer
    counts = visual_counts(num_layers, num_visual, config, num_kept)
    stages = [split] + [stage for stage, _ in config.compression.later_stages(num_layers, split, config.tau)]
    lengths = [num_tokens] * split
    for start, end, count in zip(stages, [*stages[1:], num_layers], counts):
        lengths += [num_tokens - num_visual + count] * (end - start)
    return lengths


def prefill_flops(g: DecoderGeometry, num_tokens: int, num_visual: int, config: DiViCoConfig,
                  num_logits: int = 1, num_kept: int | Sequence[int] | None = None,
                  text_rows: int | None = None) -> dict[str, int]:
    """FLOPs of one sample's forward over `num_tokens` tokens, `num_visual` of them visual,
    by part; `num_logits` positions go through the lm_head (1 for a generation prefill,
    all tokens in training). `num_kept`: the visual tokens kept, measured, for a mode that
    decides its counts per image (visual_counts); else the mode's own. `text_rows`: for a mode
    whose later stages rank by the text rows' attention (reads_text_rows), how many rows (the
    text after the image up to the query)."""
    lengths = layer_lengths(g.layers, num_tokens, num_visual, config, num_kept)
    parts = {"layers": sum(layer_flops(g, n) for n in lengths), "scoring": 0, "encoder": 0}
    if config.compresses and num_visual:
        mode = config.compression
        counts = visual_counts(g.layers, num_visual, config, num_kept)
        first = counts[0]
        # A mode that acts before the decoder shortens every layer; its own work (the [CLS] row
        # in the vision tower) is on the vision side, which, like the tower, is not counted here.
        parts["scoring"] = mode.scoring_flops(g.hidden, num_tokens, num_visual, first)
        # Further drops: each stage's attention rows (the query's, or the text's) over the
        # sequence it cuts.
        if mode.reads_text_rows and text_rows is None:
            raise ValueError(f"mode {config.mode!r} ranks by the attention of the text rows: pass text_rows")
        rows = text_rows if mode.reads_text_rows else 1
        split = 0 if mode.before_decoder else config.layer
        parts["scoring"] += sum(2 * rows * lengths[stage - 1] * g.hidden
                                for stage, _ in mode.later_stages(g.layers, split, config.tau))
        encoded = counts[-1] if mode.encodes_at_stage else first
        parts["encoder"] = encoder_flops(g, encoded, config) if config.uses_gap_encoder else 0
        num_logits = min(num_logits, lengths[-1])
    parts["lm_head"] = 2 * num_logits * g.hidden * g.vocab
    parts["total"] = sum(parts.values())
    return parts


def theory_ratio(g: DecoderGeometry, num_tokens: int, lengths: list[int]) -> float:
    """The decoder layers' FLOPs at the per-layer sequence `lengths` (layer_lengths) over those
    at `num_tokens` in every layer, from eq. 10's per-layer count with two changes: it is applied
    to the whole sequence (text tokens included; the paper writes it for the N_i visual tokens)
    and Llama's gated FFN counts 3 n d m, not 2 n d m. For DiViCo:
    (K f(N) + (L-K) f(N - N_i + N_i')) / (L f(N)), f(n) = 4 n d^2 + 2 n^2 d + 3 n d m.
    Not the paper's eqs. 11-15, which drop the text tokens and approximate the ratio by
    1 - tau; no gap encoder, scoring or lm_head here (prefill_flops counts those)."""
    d, m = g.hidden, g.intermediate

    def f(n: int) -> int:
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    return sum(f(n) for n in lengths) / (len(lengths) * f(num_tokens))
