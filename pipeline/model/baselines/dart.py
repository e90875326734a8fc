"""DART (Wen et al. 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"; ZichenWen1/DART, read in the xqy1111111/DART fork and llmc): at the
input of decoder layer K (2 in the paper), keep the visual tokens that duplicate each other least.
1. Pivots: the 4 visual tokens and the 4 text tokens after the image whose keys in layer K-1
   (after RoPE, all heads concatenated) have the largest L1 norm. The text runs to the query
   token (the prompt's end, CompressedLlava.query_positions): in training the answers do not
   choose, and generation keeps the prompt's choice however long the answer grows.
2. Duplication: on layer K's input after the decoder's final norm, each pivot in turn adds the
   TOKEN_TOPK not yet kept visual tokens least cosine-similar to it; the text pivots themselves
   are not kept. Kept tokens keep their original position ids (as the official code).
Training-free; the selection reads no attention weights, so any attention kernel serves.

Departures, each for a fixed budget: the official count is 4 + 8 x TOKEN_TOPK with TOKEN_TOPK =
budget // 8 (68 tokens for a budget of 64); here exactly round(tau N) are kept: TOKEN_TOPK =
ceil((k - 4) / pivots) and the picks stop at k (the last pivot's are cut), or the k image pivots
alone when k <= 4. Pivots take their turns in position order (the official code iterates a
Python set). Per sample, so batches of any size (the official code reads sample 0).
Cosine similarities are one matrix product of the pivots against the visual tokens: its
2 x pivots x N x d FLOPs are the selection's cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.model.divico import kept_count
from pipeline.model.modes import CompressionMode, LayerState

IMAGE_PIVOTS = 4
TEXT_PIVOTS = 4


def dart_keep(keys: torch.Tensor, normed: torch.Tensor, visual: torch.Tensor, text_after: torch.Tensor,
              kept: int) -> torch.Tensor:
    """One sample: the indices of the `kept` visual tokens DART keeps. keys (N, w) after RoPE;
    normed (N, d): layer K's input after the final norm; visual, text_after: (N,) bool."""
    visual_index, text_index = visual.nonzero().flatten(), text_after.nonzero().flatten()
    key_norm = keys.float().abs().sum(-1)
    order = key_norm[visual_index].argsort(descending=True, stable=True)
    image_pivots = visual_index[order[:min(IMAGE_PIVOTS, kept)]]
    if kept <= IMAGE_PIVOTS:
        return image_pivots.sort().values
    text_order = key_norm[text_index].argsort(descending=True, stable=True)
    pivots = torch.cat([image_pivots, text_index[text_order[:TEXT_PIVOTS]]]).sort().values
    per_pivot = math.ceil((kept - len(image_pivots)) / len(pivots))
    unit = F.normalize(normed.float(), dim=-1)
    similarity = unit[pivots] @ unit[visual_index].T  # (pivots, visual)
    free = torch.ones(len(visual_index), dtype=torch.bool, device=keys.device)
    free[torch.isin(visual_index, image_pivots)] = False
    chosen = [image_pivots]
    left = kept - len(image_pivots)
    for row in similarity:
        take = min(per_pivot, left)
        picks = row.masked_fill(~free, float("inf")).argsort(stable=True)[:take]  # least similar first
        free[picks] = False
        chosen.append(visual_index[picks])
        left -= take
        if left == 0:
            break
    return torch.cat(chosen).sort().values


class DART(CompressionMode):
    reads_attention = False
    reads_keys = True
    trainable = False

    def select_at_layer(self, state: LayerState, keep_ratio: torch.Tensor) -> torch.Tensor:
        normed = state.norm(state.hidden)
        positions = torch.arange(state.image_mask.shape[1], device=state.image_mask.device)
        last_image = torch.where(state.image_mask, positions, -1).max(1).values
        keep = torch.zeros_like(state.image_mask)
        for sample in range(keep.shape[0]):
            visual = state.image_mask[sample]
            if not bool(visual.any()):
                continue
            text_after = (state.attention_mask[sample] & (positions > last_image[sample])
                          & (positions <= state.query_positions[sample]))
            kept = kept_count(int(visual.sum()), float(keep_ratio[sample]))
            keep[sample, dart_keep(state.keys[sample], normed[sample], visual, text_after, kept)] = True
        return keep

    def scoring_flops(self, hidden: int, num_tokens: int, num_visual: int, num_kept: int) -> int:
        if num_kept <= IMAGE_PIVOTS:  # the image pivots alone: no similarity is computed
            return 0
        pivots = IMAGE_PIVOTS + TEXT_PIVOTS  # a prompt has at least 4 text tokens after its image
        return 2 * pivots * num_visual * hidden


class DiViCoOverDART(DART):
    """divico_dart: DiViCo's gap encoder over DART's selection, the composition none of the two
    papers has: DART's kept tokens + every other visual token averaged into v_p + the variational
    gap encoder and its KL (eq. 9), trained with the LoRA fine-tune as divico is."""

    gap_encoder = True
    variational = True
    trainable = True
