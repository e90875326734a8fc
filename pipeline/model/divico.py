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

Modes (`DiViCoConfig.mode`):
- none: the unmodified model.
- fastv: top-tau selection, the rest dropped, nothing learned (the paper's FastV baseline).
- select_only: the same forward as fastv; the name records ablation (a): selection with a
  LoRA fine-tune and no gap encoder.
- point_estimate: ablation (b): v_s + mu, no sampling, no KL.
- divico: the full method.
- random: a seeded random tau of the visual tokens, the rest dropped (the control).

The gap-encoder slot: `DiViCo.gap_encoder` is any module called as
`encoder(selected, pooled, keep_ratio=tau) -> GapEstimate(mu, log_ratio)` with `selected`
and `pooled` of shape (T, d) (one row per kept token, `pooled` repeating its sample's v_p).
A mixture-of-experts encoder (small/medium/large-rate experts and a router reading
`keep_ratio`) replaces `GapEncoder` there without any other change.

Defaults reproduce the released code's numerics: g_theta = Linear(2d, d) -> tanh ->
Linear(d, 2d), output split into mu and l = log(sigma^2 / sigma0^2), sigma0 = 0.075,
sigma = exp(l / 2) * sigma0; KL = mean over samples and hidden dims of the sum over kept
tokens of 0.5 * (-l + exp(l) + mu^2 - 1); xavier-uniform weights, biases truncated
normal with std 0.001; eval uses mu.

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
- `kl="standard"` gives the textbook KL(N(mu, sigma^2) || N(0, I)), summed over hidden
  dims and kept tokens, averaged over samples (beta must then be re-tuned).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

MODES = ("none", "fastv", "divico", "select_only", "point_estimate", "random")
QUERY_RULES = ("first_answer", "last")
KL_VARIANTS = ("released", "standard")


@dataclass
class DiViCoConfig:
    """Settings of the compression. tau is the kept fraction of visual tokens: the paper's
    small / medium / large compression are tau = 1/6, 1/9, 1/15 (576 -> 96, 64, 38)."""

    mode: str = "divico"
    tau: float = 1 / 9
    layer: int = 2  # K: selection uses layer K-1's attention; layers >= K see fewer tokens
    beta: float = 0.02  # weight of the KL term (eq. 9)
    query: str = "first_answer"  # or "last" (the released code's rule)
    sigma0: float = 0.075
    kl: str = "released"  # or "standard"
    seed: int = 0  # random mode: which random subset of visual-token slots is kept

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.mode not in MODES:
            raise ValueError(f"DiViCoConfig.mode={self.mode!r}: expected one of {MODES}")
        if self.query not in QUERY_RULES:
            raise ValueError(f"DiViCoConfig.query={self.query!r}: expected one of {QUERY_RULES}")
        if self.kl not in KL_VARIANTS:
            raise ValueError(f"DiViCoConfig.kl={self.kl!r}: expected one of {KL_VARIANTS}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"DiViCoConfig.tau={self.tau}: the kept fraction must be in (0, 1]")
        if self.beta < 0:
            raise ValueError(f"DiViCoConfig.beta={self.beta}: must be >= 0")
        if self.sigma0 <= 0:
            raise ValueError(f"DiViCoConfig.sigma0={self.sigma0}: must be > 0")
        if self.layer < 1 or (num_layers is not None and self.layer >= num_layers):
            limit = f" and < {num_layers} (the decoder's layer count)" if num_layers is not None else ""
            raise ValueError(f"DiViCoConfig.layer={self.layer}: K must be >= 1{limit}, "
                             "since selection reads layer K-1's attention")

    @property
    def compresses(self) -> bool:
        return self.mode != "none"

    @property
    def uses_gap_encoder(self) -> bool:
        return self.mode in ("divico", "point_estimate")

    @property
    def uses_kl(self) -> bool:
        return self.mode == "divico"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DiViCoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiViCo settings {unknown}; known: {sorted(known)}")
        return cls(**values)


def kept_count(num_visual: int | torch.Tensor, tau: float) -> int | torch.Tensor:
    """N_i' = round(tau * N_i), rounding halves up, at least 1 (0 for a sample without image)."""
    if isinstance(num_visual, torch.Tensor):
        kept = torch.floor(num_visual.double() * tau + 0.5).long().clamp(min=1)
        return torch.where(num_visual > 0, kept, torch.zeros_like(kept))
    return max(1, math.floor(num_visual * tau + 0.5)) if num_visual > 0 else 0


class GapEstimate(NamedTuple):
    """Posterior of the gap v_c' for each kept token: mean and l = log(sigma^2 / sigma0^2)."""

    mu: torch.Tensor
    log_ratio: torch.Tensor


class GapEncoder(nn.Module):
    """g_theta of eq. 6: Linear(2d, d) -> tanh -> Linear(d, 2d), split into (mu, l)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, 2 * hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.trunc_normal_(layer.bias, std=0.001)

    def forward(self, selected: torch.Tensor, pooled: torch.Tensor, keep_ratio: float) -> GapEstimate:
        # keep_ratio is part of the slot's contract (a mixture-of-experts router reads it);
        # a single encoder serves one rate and ignores it.
        out = self.fc2(torch.tanh(self.fc1(torch.cat([selected, pooled], dim=-1))))
        mu, log_ratio = out.chunk(2, dim=-1)
        return GapEstimate(mu, log_ratio)


def kl_divergence(estimate: GapEstimate, num_samples: int, sigma0: float, variant: str) -> torch.Tensor:
    """KL of the gap posterior against its prior, summed over kept tokens, averaged over
    the `num_samples` samples that have an image (and, for "released", over hidden dims)."""
    mu, l = estimate.mu.float(), estimate.log_ratio.float()
    if variant == "released":
        per_entry = 0.5 * (-l + l.exp() + mu.square() - 1)
        return per_entry.sum() / (num_samples * mu.shape[-1])
    log_var = l + 2 * math.log(sigma0)
    per_entry = 0.5 * (-log_var + log_var.exp() + mu.square() - 1)
    return per_entry.sum() / num_samples


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
        self.query: torch.Tensor | None = None  # (B, H * head_dim) before RoPE
        self.keys: torch.Tensor | None = None  # (B, N, H_kv * head_dim) before RoPE
        self._hooks: list = []

    def _keep_query_rows(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        rows = torch.arange(output.shape[0], device=output.device)
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
    (attention_mask == 0) get zero weight. Returns (B, N) float32 scores.
    """
    attn, query_positions = captured.attention, captured.query_positions
    if captured.query is None or captured.keys is None:
        raise RuntimeError("query_attention_scores: layer K-1 did not run inside its ProjectionCapture")
    batch, length, _ = captured.keys.shape
    head_dim = attn.head_dim
    rows = torch.arange(batch, device=captured.keys.device)
    query_positions = query_positions.to(rows.device)
    cos, sin = position_embeddings

    query = captured.query.view(batch, -1, head_dim)  # (B, H, hd)
    cos_q, sin_q = cos[rows, query_positions].unsqueeze(1), sin[rows, query_positions].unsqueeze(1)
    query = query * cos_q + rotate_half(query) * sin_q
    keys = captured.keys.view(batch, length, -1, head_dim)  # (B, N, H_kv, hd)
    keys = keys * cos.unsqueeze(2) + rotate_half(keys) * sin.unsqueeze(2)

    num_kv_heads = keys.shape[2]
    query = query.view(batch, num_kv_heads, -1, head_dim)  # head h uses key head h // groups
    logits = torch.einsum("bkgd,bnkd->bkgn", query.float(), keys.float()) * attn.scaling
    visible = (torch.arange(length, device=rows.device) <= query_positions[:, None]) & attention_mask.bool()
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def random_scores(image_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded random scores: the j-th visual token of every sample gets the same draw, so a
    batch selects exactly as its samples do one by one, and every call selects the same."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(int(image_mask.sum(1).max()), generator=generator).to(image_mask.device)
    slot = (image_mask.long().cumsum(1) - 1).clamp(min=0)
    return torch.where(image_mask, draws[slot], torch.zeros((), device=image_mask.device))


def select_visual_tokens(scores: torch.Tensor, image_mask: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, N) bool: the top round(tau * N_i) visual tokens of each sample by score (ties go
    to the earlier token, so selection is deterministic)."""
    masked = scores.float().masked_fill(~image_mask, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return image_mask & (rank < kept_count(image_mask.sum(1), tau)[:, None])


class DiViCo(nn.Module):
    """The compression step on layer K's input: writes v_s + v_c' over the kept visual
    tokens and returns the KL. Dropping the other tokens is the caller's (sequence
    plumbing); in modes without a gap encoder this leaves the hidden states untouched."""

    def __init__(self, config: DiViCoConfig, hidden_size: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.gap_encoder = GapEncoder(hidden_size) if config.uses_gap_encoder else None

    def select(self, scores: torch.Tensor | None, image_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool of the kept visual tokens; `scores` from query_attention_scores
        (None in random mode, which draws its own)."""
        if self.config.mode == "random":
            scores = random_scores(image_mask, self.config.seed)
        return select_visual_tokens(scores, image_mask, self.config.tau)

    def forward(self, hidden: torch.Tensor, image_mask: torch.Tensor, keep_visual: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, N, d) after layer K-1; image_mask and keep_visual (B, N) bool.
        Returns (hidden with compressed tokens at the kept positions, KL scalar)."""
        kl = hidden.new_zeros((), dtype=torch.float32)
        if self.gap_encoder is None:
            return hidden, kl
        dropped = (image_mask & ~keep_visual).unsqueeze(-1).to(hidden.dtype)
        # v_p: mean of the visual tokens not kept (zero when all are kept).
        pooled = (hidden * dropped).sum(1) / dropped.sum(1).clamp(min=1)
        sample_idx, token_idx = keep_visual.nonzero(as_tuple=True)
        selected = hidden[sample_idx, token_idx]
        # The encoder may be kept in another dtype than the decoder (e.g. fp32 beside a
        # quantised or bf16 model): it computes in its own.
        encoder_dtype = next(self.gap_encoder.parameters()).dtype
        estimate = self.gap_encoder(selected.to(encoder_dtype), pooled[sample_idx].to(encoder_dtype),
                                    keep_ratio=self.config.tau)
        gap = estimate.mu
        if self.config.uses_kl and self.training:
            sigma = (estimate.log_ratio * 0.5).exp() * self.config.sigma0
            gap = gap + torch.randn_like(gap) * sigma
        hidden = hidden.index_put((sample_idx, token_idx), selected + gap.to(hidden.dtype))
        if self.config.uses_kl:
            num_samples = int(image_mask.any(1).sum())
            kl = kl_divergence(estimate, num_samples, self.config.sigma0, self.config.kl)
        return hidden, kl
