"""MustDrop (Liu et al. 2024, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
Large Language Model"; liuting20/MustDrop@909afa5): training-free, dropping at three stages of a
visual token's life. This file holds its rules as functions on tensors; the stages:

- Tower (clip_encoder.py, local_merge.py): after the first CLIP layer the patch grid is cut into
  non-overlapping 3x3 windows; a window whose nine patches have a mean pairwise cosine
  similarity (self-pairs excluded) of at least 0.8 becomes one token, the size-weighted mean of
  the nine (`merge_windows`); the rest of the tower runs on the merged sequence. At the last CLIP
  layer, the ceil(0.08 M) of the M tokens left that [CLS] attends to most (mean over heads) form
  the key set, which no later stage drops (`key_set`).
- Decoder: after layers 2, 6, 10 and 14 (0-indexed), the dual-attention filter
  (`dual_attention_filter`).

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.model.divico import score_ranks

WINDOW = 3  # the side of a merge window, in patches
MERGE_THRESHOLD = 0.8  # the mean pairwise cosine similarity at which a window merges
KEY_SHARE = 0.08  # the share of the tower's tokens the key set holds


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


def merge_windows(patches: torch.Tensor, side: int, window: int = WINDOW,
                  threshold: float = MERGE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower stage's merge on n images of side x side patches (n, N, d): (tokens (n, N, d),
    present (n, N) bool). A merged window's mean is in the slot of its last patch, its other
    slots are absent; every other patch is unchanged. (All sizes are 1 after the first layer, so
    the official size-weighted mean is the plain mean.)"""
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
