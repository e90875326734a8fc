"""DiViCo: disentangled visual-token compression (TCSVT 2025), the method itself.

Between decoder layers K-1 and K the N_i visual tokens of each sample are replaced by
N_i' = round(tau * N_i) (at least 1) compressed tokens:

1. Selection (eq. 4): `query_attention_scores` gives each token the attention the query
   token pays it in layer K-1, averaged over heads; `select_visual_tokens` keeps the top
   N_i' visual tokens v_s (in their original order). The rest, v_r, are averaged into v_p.
2. Compression (eqs. 5-8): `GapEncoder` maps concat(v_s(t), v_p) to (mu, l) and the
   compressed token is v_s(t) + mu + eps * sigma while training, v_s(t) + mu in eval.
3. Training (eq. 9): loss = lm_loss + beta * KL (`kl_divergence`).

`DiViCo` ties these together; `pipeline/model/compressed_llava.py` runs it inside a LLaVA
model (layer loop, dropping tokens, masks, cache, generation).

Modes (`DiViCoConfig.mode`; pipeline/model/modes.py, one class each): none, fastv (top-tau by
attention, the rest dropped, training-free), select_only (the same forward under a LoRA
fine-tune: ablation (a)), point_estimate (v_s + mu: ablation (b)), divico (the full method) and
random (a seeded random tau of each image's tokens: the control; `random_scores`).

The gap-encoder slot: `DiViCo.gap_encoder` is any module called as
`encoder(selected, pooled, keep_ratio, sample_index) -> GapEstimate` with `selected` and
`pooled` of shape (T, d) (one row per kept token, `pooled` repeating its sample's v_p), and
`keep_ratio` (T,) float32 and `sample_index` (T,) long: each kept token's sample and that
sample's rate, so one batch may mix rates. A GapEstimate carries mu and l and may carry named
auxiliary losses (added to the loss with the encoder's `aux_weights`) and router weights.
An encoder is chosen by `divico.encoder` from settings.GAP_ENCODERS ("module:Class", built as
Class(hidden_size, config)): "mlp" is the released g_theta, "moe" the Mixture-of-Experts
encoder of pipeline/model/moe.py (one expert per rate, a router reading the rate).

The keep ratio: `config.tau` unless the caller passes `keep_ratio`, a float or a (B,) tensor
(one rate per sample); N_i' = round(keep_ratio_i * N_i).

Defaults reproduce the released code's numerics: g_theta = Linear(2d, d) -> tanh ->
Linear(d, 2d), output split into mu and l = log(sigma^2 / sigma0^2), sigma0 = 0.075,
sigma = exp(l / 2) * sigma0; KL = mean over samples and hidden dims of the sum over kept
tokens of 0.5 * (-l + exp(l) + mu^2 - 1); xavier-uniform weights, biases truncated
normal with std 0.001 (`init="released"`; `init="zero"` starts mu at zero); eval uses mu.

Deviations from the released code (each deliberate):
- Scores come from one attention row formed from the q/k projections layer K-1 computed
  in its own forward (captured by hooks; RoPE and GQA handled), instead of re-running
  layer K-1 under no_grad with output_attentions (that cost about 8% of the prefill and
  forced eager attention).
- Image positions, token counts and query positions are per sample (the released code
  takes sample 0's image position for the whole batch).
- The default query token is the one just before the first assistant answer (training:
  first supervised label - 1; inference: the last prompt token), so training and inference
  select the same way. The released rule is `query="last"`: the last non-pad token (not
  the last padded position, which in a right-padded batch is a pad).
- Masks are explicit everywhere, so padded batches work in eval and generation.
- The KL is averaged over the samples that have an image (a text-only sample has no kept
  tokens); the released code averages over the whole (all-image) batch.
- When every visual token is kept (tau = 1) v_p is the zero vector (an empty mean).
- v_p is averaged in fp32 whatever the decoder's dtype.
- `kl="standard"` gives the textbook KL(N(mu, sigma^2) || N(0, I)), summed over hidden
  dims and kept tokens, averaged over samples (beta must then be re-tuned).
- `kl_per_token`: the sum over kept tokens becomes a mean, so beta weighs the same at every
  rate (the released sum makes it 2.5x heavier at tau 1/6 than at 1/15); on for the MoE stage.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from pipeline.model.settings import GAP_ENCODERS, DiViCoConfig


def kept_count(num_visual: int | torch.Tensor, tau: float | torch.Tensor, counts: str = "project"
               ) -> int | torch.Tensor:
    """N_i' = round(tau * N_i), rounding halves up (counts="released": int(tau * N_i), truncated),
    at least 1 (0 for a sample without image). With tensors, tau may be one rate per sample."""
    half = 0.5 if counts == "project" else 0.0
    if isinstance(num_visual, torch.Tensor):
        if isinstance(tau, torch.Tensor):
            tau = tau.to(num_visual.device, torch.float64)
        kept = torch.floor(num_visual.double() * tau + half).long().clamp(min=1)
        return torch.where(num_visual > 0, kept, torch.zeros_like(kept))
    return max(1, math.floor(num_visual * tau + half)) if num_visual > 0 else 0


def score_ranks(scores: torch.Tensor, image_mask: torch.Tensor, descending: bool) -> torch.Tensor:
    """(B, N): each visual token's rank among its sample's visual tokens by score (0 = the
    highest when `descending`, the lowest otherwise; ties to the earlier token); text and
    padding rank after every visual token."""
    fill = float("-inf") if descending else float("inf")
    order = scores.float().masked_fill(~image_mask, fill).argsort(dim=1, descending=descending, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


class GapEstimate(NamedTuple):
    """Posterior of the gap v_c' for each kept token: mean and l = log(sigma^2 / sigma0^2);
    an encoder may add named auxiliary losses (scalars) and its router's weights (T, experts)."""

    mu: torch.Tensor
    log_ratio: torch.Tensor
    aux_losses: dict[str, torch.Tensor] | None = None
    router_weights: torch.Tensor | None = None


class GapEncoder(nn.Module):
    """g_theta of eq. 6: Linear(2d, d) -> tanh -> Linear(d, 2d), split into (mu, l).

    init "released": xavier-uniform weights, biases truncated normal with std 0.001; then mu
    is about as large as the token it is added to, so training starts below select_only.
    init "zero": the same, but the mu half of fc2 (weight rows and bias) is zero, so mu = 0
    at step 0 and the forward is exactly select_only's; the l half keeps the released init.
    """

    param_group = "gap_encoder"  # trains at optim.encoder_lr (pipeline/train/build.py)
    aux_weights: dict[str, float] = {}  # no auxiliary losses

    def __init__(self, hidden_size: int, config: DiViCoConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, 2 * hidden_size)
        self.init = config.init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.trunc_normal_(layer.bias, std=0.001)
        if self.init == "zero":
            hidden_size = self.fc1.out_features
            with torch.no_grad():
                self.fc2.weight[:hidden_size].zero_()  # forward() takes mu from the first half
                self.fc2.bias[:hidden_size].zero_()

    def forward(self, selected: torch.Tensor, pooled: torch.Tensor, keep_ratio: torch.Tensor,
                sample_index: torch.Tensor) -> GapEstimate:
        # keep_ratio and sample_index are part of the slot's contract (the mixture's router
        # reads them); a single encoder serves one rate and ignores them.
        out = self.fc2(torch.tanh(self.fc1(torch.cat([selected, pooled], dim=-1))))
        mu, log_ratio = out.chunk(2, dim=-1)
        return GapEstimate(mu, log_ratio)


def kl_divergence(estimate: GapEstimate, count: int, sigma0: float, variant: str) -> torch.Tensor:
    """KL of the gap posterior against its prior, summed over kept tokens and divided by
    `count`: the samples that have an image (the released normalisation), or the kept tokens
    (`kl_per_token`); for "released" also averaged over hidden dims."""
    mu, l = estimate.mu.float(), estimate.log_ratio.float()
    if variant == "released":
        per_entry = 0.5 * (-l + l.exp() + mu.square() - 1)
        return per_entry.sum() / (count * mu.shape[-1])
    log_var = l + 2 * math.log(sigma0)
    per_entry = 0.5 * (-log_var + log_var.exp() + mu.square() - 1)
    return per_entry.sum() / count


class ProjectionCapture:
    """Keeps what layer K-1's own attention projects, while that layer runs: the query
    rows of the query tokens (q_proj) and all keys (k_proj), detached. Selection then needs
    no second projection of the sequence: the layer already paid for it.

    Used as `with ProjectionCapture(layer.self_attn, query_positions) as captured:` around
    the layer's call; the hooks are gone when the block ends, so a gradient-checkpointing
    recompute in the backward pass does not fire them.
    """

    def __init__(self, attention: nn.Module, query_positions: torch.Tensor) -> None:
        self.attention, self.query_positions = attention, query_positions
        self.query: torch.Tensor | None = None  # (B, H * head_dim), or (B, Q, H * head_dim), before RoPE
        self.keys: torch.Tensor | None = None  # (B, N, H_kv * head_dim) before RoPE
        self._hooks: list = []

    def _keep_query_rows(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # query_positions (B,): one row per sample; (B, Q): Q rows per sample
        rows = torch.arange(output.shape[0], device=output.device).view(-1, *[1] * (self.query_positions.dim() - 1))
        self.query = output.detach()[rows, self.query_positions.to(output.device)]

    def _keep_keys(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.keys = output.detach()

    def __enter__(self) -> "ProjectionCapture":
        self._hooks = [self.attention.q_proj.register_forward_hook(self._keep_query_rows),
                       self.attention.k_proj.register_forward_hook(self._keep_keys)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


@torch.no_grad()
def query_attention_scores(
    captured: ProjectionCapture,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The query token's attention over the sequence in layer K-1, averaged over heads (eq. 4).

    `captured` holds that layer's own projections from its forward (LoRA included, and in
    training its own dropout draw, so the scores are the attention the layer computed);
    RoPE is applied with the model's (cos, sin), key heads shared across query groups (GQA).
    Only one query row per sample is formed: O(N d) memory, no H x N x N matrix, and no
    dependence on the attention implementation. Keys after the query or padded
    (attention_mask == 0) get zero weight. Returns (B, N) float32 scores; where the capture's
    query_positions are (B, Q), the attention of each of those rows: (B, Q, N).
    """
    attn, query_positions = captured.attention, captured.query_positions
    if captured.query is None or captured.keys is None:
        raise RuntimeError("query_attention_scores: layer K-1 did not run inside its ProjectionCapture")
    batch, length, _ = captured.keys.shape
    head_dim = attn.head_dim
    rows = torch.arange(batch, device=captured.keys.device)
    positions = query_positions.to(rows.device).view(batch, -1)  # (B, Q)
    cos, sin = position_embeddings

    query = captured.query.view(batch, positions.shape[1], -1, head_dim)  # (B, Q, H, hd)
    cos_q, sin_q = cos[rows[:, None], positions].unsqueeze(2), sin[rows[:, None], positions].unsqueeze(2)
    query = query * cos_q + rotate_half(query) * sin_q
    keys = captured.keys.view(batch, length, -1, head_dim)  # (B, N, H_kv, hd)
    keys = keys * cos.unsqueeze(2) + rotate_half(keys) * sin.unsqueeze(2)

    num_kv_heads = keys.shape[2]
    query = query.view(batch, positions.shape[1], num_kv_heads, -1, head_dim)  # head h uses key head h // groups
    logits = torch.einsum("bqkgd,bnkd->bqkgn", query.float(), keys.float()) * attn.scaling
    visible = (torch.arange(length, device=rows.device) <= positions[..., None]) & attention_mask.bool()[:, None]
    logits = logits.masked_fill(~visible[:, :, None, None, :], float("-inf"))
    scores = logits.softmax(dim=-1).mean(dim=(2, 3))
    return scores if query_positions.dim() == 2 else scores[:, 0]


@torch.no_grad()
def rotated_keys(captured: ProjectionCapture, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, N, H_kv * head_dim): layer K-1's captured keys with RoPE applied, as its attention used them."""
    batch, length, width = captured.keys.shape
    cos, sin = position_embeddings
    keys = captured.keys.view(batch, length, -1, captured.attention.head_dim)
    return (keys * cos.unsqueeze(2) + rotate_half(keys) * sin.unsqueeze(2)).reshape(batch, length, width)


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A 64-bit generator seed from the config seed and the bytes of one sample's image input
    (its pixel values, or its image features when those are given instead)."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8)
    digest.update(image.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little")


def random_scores(image_mask: torch.Tensor, sample_seeds: Sequence[int]) -> torch.Tensor:
    """Random scores for the control: each sample's visual tokens get uniform draws from a
    generator of their own, seeded with `image_seed` (the config seed and a hash of the
    sample's image input). So the kept slots are a function of the image alone: the same
    image keeps the same slots in any batch, at any row, in every call, and different
    images keep different slots (not one fixed pattern). Text and padding get 0."""
    counts = image_mask.sum(1).tolist()
    draws = [torch.rand(count, generator=torch.Generator().manual_seed(seed))
             for count, seed in zip(counts, sample_seeds, strict=True)]
    scores = torch.zeros(image_mask.shape, device=image_mask.device)
    scores[image_mask] = torch.cat(draws).to(image_mask.device)
    return scores


def select_visual_tokens(scores: torch.Tensor, image_mask: torch.Tensor, tau: float | torch.Tensor,
                         counts: str = "project", of: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the top kept_count(N_i, tau, counts) visual tokens of each sample by score
    (ties go to the earlier token, so selection is deterministic); tau a float or one per sample (B,).
    N_i: the visual tokens in `image_mask`, or `of` (B,) where tau is a share of an earlier count
    (PyramidDrop's later stages)."""
    kept = kept_count(image_mask.sum(1) if of is None else of, tau, counts)
    return image_mask & (score_ranks(scores, image_mask, descending=True) < kept[:, None])


def pooled_visual_tokens(scores: torch.Tensor, image_mask: torch.Tensor, keep_visual: torch.Tensor,
                         tau: float | torch.Tensor, counts: str = "project") -> torch.Tensor:
    """(B, N) bool: the visual tokens averaged into v_p. "project": every one not kept;
    "released": the lowest int((1 - tau) N_i) by score."""
    if counts == "project":
        return image_mask & ~keep_visual
    visual = image_mask.sum(1)
    rate = tau.to(visual.device, torch.float64) if isinstance(tau, torch.Tensor) else tau
    pooled = torch.floor(visual.double() * (1 - rate)).long()
    return image_mask & (score_ranks(scores, image_mask, descending=False) < pooled[:, None])


def mean_of_dropped(hidden: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """v_p: (B, d) float32 mean of each sample's dropped visual tokens (`dropped` (B, N) bool),
    zero when none is dropped. Summed and divided in fp32: in bf16, v_p would keep only 8
    significant bits of an average over hundreds of tokens."""
    weights = dropped.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1, dtype=torch.float32) / dropped.sum(1, keepdim=True).clamp(min=1)


class Compression(NamedTuple):
    """What DiViCo's forward returns."""

    hidden: torch.Tensor  # (B, N, d): v_s + v_c' at the kept visual positions, the rest as it was
    kl: torch.Tensor  # float32 scalar, 0 in modes without a KL
    # Gap-encoder health, detached float32 scalars: "mu_over_vs", the mean over kept tokens of
    # ||mu|| / ||v_s||, and "sigma", the mean of sigma over kept tokens and hidden dims (what
    # divico samples with; point_estimate ignores it). None in modes without a gap encoder.
    gap_stats: dict[str, torch.Tensor] | None
    # The encoder's auxiliary losses (unweighted; the encoder's aux_weights weigh them), {} if none.
    aux_losses: dict[str, torch.Tensor]
    # (keep_ratio (T,), router weights (T, experts)) of the kept tokens, detached; None without a router.
    routing: tuple[torch.Tensor, torch.Tensor] | None


def build_gap_encoder(config: DiViCoConfig, hidden_size: int) -> nn.Module:
    """The encoder `config.encoder` names in GAP_ENCODERS, built for this hidden size."""
    module, name = GAP_ENCODERS[config.encoder].split(":")
    return getattr(importlib.import_module(module), name)(hidden_size, config)


class DiViCo(nn.Module):
    """The compression step on layer K's input: writes v_s + v_c' over the kept visual
    tokens and returns the KL. Dropping the other tokens is the caller's (sequence
    plumbing); in modes without a gap encoder this leaves the hidden states untouched."""

    def __init__(self, config: DiViCoConfig, hidden_size: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.gap_encoder = build_gap_encoder(config, hidden_size) if config.uses_gap_encoder else None

    def select(self, scores: torch.Tensor | None, image_mask: torch.Tensor,
               sample_seeds: Sequence[int] | None = None, keep_ratio: float | torch.Tensor | None = None
               ) -> torch.Tensor:
        """(B, N) bool of the kept visual tokens; `scores` from query_attention_scores.
        Random mode ignores them and draws from `sample_seeds` (one `image_seed` per sample).
        keep_ratio: a float or (B,) rates; config.tau when None."""
        scores = self.config.compression.scores(scores, image_mask, sample_seeds)
        return select_visual_tokens(scores, image_mask, self.config.tau if keep_ratio is None else keep_ratio,
                                    self.config.counts)

    def pooled(self, scores: torch.Tensor | None, image_mask: torch.Tensor, keep_visual: torch.Tensor,
               keep_ratio: float | torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) bool of the visual tokens averaged into v_p (pooled_visual_tokens); every
        dropped one without scores (random mode draws its own)."""
        counts = self.config.counts if scores is not None else "project"
        return pooled_visual_tokens(scores, image_mask, keep_visual,
                                    self.config.tau if keep_ratio is None else keep_ratio, counts)

    def forward(self, hidden: torch.Tensor, image_mask: torch.Tensor, keep_visual: torch.Tensor,
                keep_ratio: float | torch.Tensor | None = None, pooled_visual: torch.Tensor | None = None
                ) -> Compression:
        """hidden (B, N, d) after layer K-1; image_mask and keep_visual (B, N) bool; keep_ratio
        as in select(); pooled_visual (B, N) bool, the tokens averaged into v_p (default: every
        dropped one)."""
        kl = hidden.new_zeros((), dtype=torch.float32)
        if self.gap_encoder is None:
            return Compression(hidden, kl, None, {}, None)
        pooled = mean_of_dropped(hidden, image_mask & ~keep_visual if pooled_visual is None else pooled_visual)
        sample_idx, token_idx = keep_visual.nonzero(as_tuple=True)
        selected = hidden[sample_idx, token_idx]
        rates = torch.as_tensor(self.config.tau if keep_ratio is None else keep_ratio,
                                dtype=torch.float32, device=hidden.device).expand(hidden.shape[0])
        # The encoder may be kept in another dtype than the decoder (e.g. fp32 beside a
        # quantised or bf16 model): it computes in its own. One without parameters computes
        # in the decoder's.
        weight = next(self.gap_encoder.parameters(), None)
        encoder_dtype = hidden.dtype if weight is None else weight.dtype
        estimate = self.gap_encoder(selected.to(encoder_dtype), pooled[sample_idx].to(encoder_dtype),
                                    rates[sample_idx], sample_idx)
        gap = estimate.mu
        if self.config.uses_kl and self.training:
            sigma = (estimate.log_ratio * 0.5).exp() * self.config.sigma0
            gap = gap + torch.randn_like(gap) * sigma
        hidden = hidden.index_put((sample_idx, token_idx), selected + gap.to(hidden.dtype))
        if self.config.uses_kl:
            count = selected.shape[0] if self.config.kl_per_token else int(image_mask.any(1).sum())
            kl = kl_divergence(estimate, count, self.config.sigma0, self.config.kl)
        routing = None
        if estimate.router_weights is not None:
            routing = (rates[sample_idx].detach(), estimate.router_weights.detach().float())
        return Compression(hidden, kl, gap_stats(estimate, selected, self.config.sigma0),
                           estimate.aux_losses or {}, routing)


@torch.no_grad()
def gap_stats(estimate: GapEstimate, selected: torch.Tensor, sigma0: float) -> dict[str, torch.Tensor]:
    """Compression.gap_stats for the kept tokens `selected` (T, d) and their estimate."""
    mu, log_ratio = estimate.mu.float(), estimate.log_ratio.float()
    return {"mu_over_vs": (mu.norm(dim=-1) / selected.float().norm(dim=-1)).mean(),
            "sigma": ((log_ratio * 0.5).exp() * sigma0).mean()}
