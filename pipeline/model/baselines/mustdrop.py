"""MustDrop (Liu et al. 2024, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
Large Language Model"; liuting20/MustDrop@909afa5): training-free, dropping at three stages of a
visual token's life.

- Tower (clip_encoder.py, local_merge.py): after the first CLIP layer the patch grid is cut into
  non-overlapping 3x3 windows; a window whose nine patches have a mean pairwise cosine
  similarity (self-pairs excluded) of at least 0.8 becomes one token, the size-weighted mean of
  the nine (`merge_windows`); the rest of the tower runs on the merged sequence. At the last CLIP
  layer, the ceil(0.08 M) of the M tokens left that [CLS] attends to most (mean over heads) form
  the key set, which no later stage drops (`key_set`).
- Decoder (modelling_sparse_llama.py): after layers 2, 6, 10 and 14 (0-indexed, of 32; scaled
  as round(l L / 32) for L layers; divico.mustdrop.filter_layers), the dual-attention filter
  (`dual_attention_filter`) on that layer's attention from the text after the image (mean over
  heads): a visual token is dropped only if the attention all those rows pay it is below gamma x
  what they pay all visual tokens and the most any one row pays it is below alpha. The rows are
  recomputed from the layer's own q/k projections (pipeline/model/divico.py), for the text rows
  only, under any attention kernel.
- Cache: once the prefill is done, the layers from the first filter's to the last one's keep
  only the visual tokens that survive the last filter (layers before keep theirs; text and
  generated tokens are never evicted): CompressionMode.cuts_cache in compressed_llava.py.

Budgets: `mustdrop` runs as published, with the official TextVQA scripts' (gamma, alpha) for
192, 128 and 64 of 576 tokens, the one tau names (round(tau 576)), or divico.mustdrop.gamma and
alpha at any tau; its counts are its own per image, measured. `mustdrop_budget` compares at
equal tokens: one filter, after the first filter layer, keeps exactly round(tau N) tokens, the
key set first (capped by the budget), then the most attended to by the text rows (the filter's
first criterion); later filters would re-rank the same tokens, so it has none.

Departures from the official code, each a choice where the code and llava-hf differ:
- Each image merges every window at or above the threshold; the official code merges the
  r most similar windows of every image, r the fewest any image of the batch has, so an image's
  tokens depend on the batch it came in (it runs at batch 1 only).
- A merged token sits in the slot of its window's last patch (the official merge target) and
  keeps that slot's position; tokens stay in raster order (the official code puts the merged
  tokens first, most similar window first, then the others in raster order).
- Windows tile the grid from the top left; on a grid whose side is not a multiple of 3 (the
  official code asserts it is; LLaVA-1.5's 24 x 24 is), patches of the last partial row and
  column of windows never merge.
- The key set reads [CLS]'s attention in the layer after the feature layer (the last of the
  tower for llava-hf's vision_feature_layer = -2, as the official hook at layer 23 of 24), from
  that layer's own q/k projections (pipeline/model/vision.py).
- The text rows run from after the image to the query (the token before the first answer), not
  to the end of the sequence: the same at inference, where the official code runs, and without
  the answer in a forward with labels.
- Kept tokens keep their original positions, in the filters and in the cut cache, so decode
  queries (at the prompt length, then on) and cached keys agree. The official code renumbers
  positions contiguously after each filter and decodes at the per-layer cache length, so the cut
  caches of layers 2-14 hold keys at positions the decode queries no longer use (an apparent bug,
  not followed). Its 32-layer constant in the cache cut (layers 32-39 of a 13B model would lose
  their cache) is not followed either: the cut covers any depth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.model.divico import kept_count, score_ranks
from pipeline.model.modes import CompressionMode, StageState
from pipeline.model.settings import MustDropSettings
from pipeline.model.vision import ImageTokens

WINDOW = 3  # the side of a merge window, in patches
MERGE_THRESHOLD = 0.8  # the mean pairwise cosine similarity at which a window merges
KEY_SHARE = 0.08  # the share of the tower's tokens the key set holds
# (gamma, alpha) by budget, of 576 tokens: the official TextVQA scripts (textvqa_*.sh), used for
# every benchmark unless divico.mustdrop.gamma and alpha say otherwise (the only other official
# script, VizWiz at 64, uses 0.005 and 0.001).
PUBLISHED_THRESHOLDS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
PUBLISHED_GRID = 576


def window_slots(side: int, window: int = WINDOW) -> torch.Tensor:
    """(W, window^2) the raster indices of the patches of each whole window of a side x side
    grid, windows in raster order, each window's patches in raster order."""
    starts = torch.arange(0, side - window + 1, window)
    offsets = torch.arange(window)
    rows = (starts[:, None, None, None] + offsets[None, None, :, None]).expand(-1, len(starts), -1, window)
    cols = (starts[None, :, None, None] + offsets[None, None, None, :]).expand(len(starts), -1, window, -1)
    return (rows * side + cols).reshape(len(starts) ** 2, window * window)


def window_similarity(patches: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(n, W) float32: the mean cosine similarity over the ordered pairs of distinct patches of
    each window; patches (n, N, d), slots from window_slots."""
    members = F.normalize(patches[:, slots].float(), dim=-1)  # (n, W, k, d)
    pairs = members @ members.transpose(-1, -2)
    k = slots.shape[1]
    return (pairs.sum((-1, -2)) - pairs.diagonal(dim1=-2, dim2=-1).sum(-1)) / (k * (k - 1))


def merge_windows(patches: torch.Tensor, side: int | None = None, window: int = WINDOW,
                  threshold: float = MERGE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower stage's merge on n images of side x side patches (n, N, d) (side: sqrt N unless
    given): (tokens (n, N, d), present (n, N) bool). A merged window's mean is in the slot of its
    last patch, its other slots are absent; every other patch is unchanged. (All sizes are 1
    after the first layer, so the official size-weighted mean is the plain mean.)"""
    side = math.isqrt(patches.shape[1]) if side is None else side
    if side * side != patches.shape[1]:
        raise ValueError(f"MustDrop's window merge needs a square patch grid: {patches.shape[1]} patches")
    slots = window_slots(side, window).to(patches.device)
    merging = window_similarity(patches, slots) >= threshold  # (n, W)
    image, which = merging.nonzero(as_tuple=True)
    members = slots[which]  # (R, k)
    means = patches[image[:, None], members].float().mean(1).to(patches.dtype)
    tokens = patches.clone()
    tokens[image, members[:, -1]] = means
    present = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    present[image[:, None], members[:, :-1]] = False
    return tokens, present


def key_set(cls_attention: torch.Tensor, present: torch.Tensor, share: float = KEY_SHARE) -> torch.Tensor:
    """(n, N) bool: of each image's present tokens (M of them), the ceil(share M) that [CLS]
    attends to most (`cls_attention` (n, N); ties to the earlier slot)."""
    counts = torch.tensor([math.ceil(share * int(m)) for m in present.sum(1)], device=present.device)
    return present & (score_ranks(cls_attention, present, descending=True) < counts[:, None])


def dual_attention_filter(attention: torch.Tensor, rows: torch.Tensor, image_mask: torch.Tensor, gamma: float,
                          alpha: float) -> torch.Tensor:
    """(B, N) bool: the visual tokens the filter keeps. attention (B, Q, N): each text row's
    attention (mean over heads); rows (B, Q) bool: which rows are real. A visual token is dropped
    only if both the attention all text rows pay it is below gamma x the attention they pay all
    visual tokens, and the most any one row pays it is below alpha."""
    text = attention.float() * rows[..., None]
    column = text.sum(1)
    total = (column * image_mask).sum(1, keepdim=True)
    dropped = (column < gamma * total) & (text.amax(1) < alpha)
    return image_mask & ~dropped


def filter_layers(num_layers: int, settings: MustDropSettings) -> list[int]:
    """settings.filter_layers scaled to a decoder of `num_layers`, distinct, each before the last layer."""
    scaled = (round(layer * num_layers / settings.reference_depth) for layer in settings.filter_layers)
    return sorted({layer for layer in scaled if layer < num_layers - 1})


def published_budget(tau: float) -> int | None:
    """The published budget (of PUBLISHED_GRID tokens) tau names (round(tau 576)), or None."""
    budget = round(tau * PUBLISHED_GRID)
    return budget if budget in PUBLISHED_THRESHOLDS else None


class MustDrop(CompressionMode):
    """mustdrop: as published, the filter's thresholds at the budget tau names (192, 128 or 64 of
    576 tokens); every count after the tower is the image's own."""

    before_decoder = True
    attention_after_features = True
    tower_merge = staticmethod(merge_windows)
    reads_attention = False
    reads_text_rows = True
    cuts_cache = True
    trainable = False
    at_budget = False

    @property
    def settings(self) -> MustDropSettings:
        return MustDropSettings() if self.config is None else self.config.mustdrop

    def thresholds(self, tau: float) -> tuple[float, float]:
        """The filter's (gamma, alpha): the settings', else the published ones tau names."""
        if self.settings.gamma is not None:
            return self.settings.gamma, self.settings.alpha
        return PUBLISHED_THRESHOLDS[published_budget(tau)]

    def tau_problem(self, tau: float) -> str | None:
        if self.at_budget or self.settings.gamma is not None or published_budget(tau) is not None:
            return None
        taus = ", ".join(f"{budget}/{PUBLISHED_GRID}" for budget in PUBLISHED_THRESHOLDS)
        return (f"MustDrop's thresholds are published for tau = {taus} only; set divico.mustdrop.gamma and "
                "alpha, or run mustdrop_budget")

    def kept_tokens(self, num_visual: int, tau: float, counts: str = "project") -> int | None:
        return None  # what the window merge leaves, per image

    def compress_images(self, tokens: ImageTokens, keep_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens.protected = key_set(tokens.cls_attention(), tokens.present)
        return tokens.present, tokens.features

    def later_stages(self, num_layers: int, layer: int, tau: float) -> list[tuple[int, float]]:
        stages = [(filtered + 1, tau) for filtered in filter_layers(num_layers, self.settings) if filtered + 1 > layer]
        return stages[:1] if self.at_budget else stages

    def stage_kept(self, num_visual: int, rate: float) -> int | None:
        return kept_count(num_visual, rate) if self.at_budget else None

    def keep_at_stage(self, state: StageState) -> torch.Tensor:
        protected = state.protected & state.image_mask
        gamma, alpha = self.thresholds(state.rate)
        return dual_attention_filter(state.attention, state.rows, state.image_mask, gamma, alpha) | protected


class MustDropAtBudget(MustDrop):
    """mustdrop_budget: one filter, after the first filter layer, keeping round(tau N) tokens: the
    key set first, then the most attended to by the text rows (the filter's first criterion)."""

    at_budget = True

    def keep_at_stage(self, state: StageState) -> torch.Tensor:
        text = state.attention.float() * state.rows[..., None]
        column = text.sum(1)
        scores = column + state.protected * (column.amax(1, keepdim=True) + 1)  # the key set ranks first
        kept = kept_count(state.visual, state.rate)
        return state.image_mask & (score_ranks(scores, state.image_mask, descending=True) < kept[:, None])


class DiViCoOverMustDrop(MustDropAtBudget):
    """divico_mustdrop: DiViCo's gap encoder over MustDrop's selection, the composition neither
    paper has: the window merge, the key set and the filter's round(tau N) tokens, every other
    visual token the filter drops averaged into v_p, the variational gap encoder and its KL at
    the filter (the input of the layer after it), trained with the LoRA fine-tune as divico is."""

    gap_encoder = True
    variational = True
    trainable = True
    encodes_at_stage = True
