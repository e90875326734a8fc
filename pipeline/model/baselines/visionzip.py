"""VisionZip (Yang et al. 2024, "Longer is Better but Not Necessary"; dvlab-research/VisionZip):
training-free, before the decoder. Of each image's k = round(tau N) kept tokens:
- dominant: the k - c patches [CLS] attends to most in the CLIP feature layer (heads summed;
  the order is the same averaged);
- contextual: c tokens merged from the rest. c targets are taken at a uniform step among the
  remaining patches (in raster order); every other remaining patch joins the target whose key
  (the feature layer's keys averaged over heads, L2-normalised) is most cosine-similar; a
  contextual token is the mean of its target and its members, before the projector.
c = round(k x 10 / 64), VisionZip's 54 dominant + 10 contextual at 64 tokens, at most k - 1.

Departures from the official code:
- [CLS] is not kept: llava-hf's prompt has one slot per patch (the official code sends [CLS]
  through the projector as one of the 54 dominant tokens), so all k tokens here are patches.
- Tokens stay in their places with their original position ids: a contextual token sits at
  its target's position (the official code appends the contextual tokens after the dominant
  ones and renumbers positions contiguously).
- The [CLS] row and the keys come from the layer's own projections (pipeline/model/vision.py),
  not eager attention with output_attentions: the same numbers under any attention kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.divico import kept_count
from pipeline.model.modes import CompressionMode
from pipeline.model.vision import ImageTokens

CONTEXTUAL_SHARE = 10 / 64


def contextual_count(kept: int) -> int:
    return min(round(kept * CONTEXTUAL_SHARE), kept - 1)


def merge_contextual(features: torch.Tensor, metric: torch.Tensor, remaining: torch.Tensor,
                     contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: (targets, features) where `targets` are `contextual` of the `remaining`
    patch indices at a uniform step and each target's row of `features` (N, d) is replaced by
    the mean of itself and the remaining patches whose `metric` row is nearest it in cosine."""
    step = max(1, len(remaining) // contextual)
    is_target = torch.zeros(len(remaining), dtype=torch.bool, device=remaining.device)
    is_target[torch.arange(0, len(remaining), step, device=remaining.device)[:contextual]] = True
    targets, others = remaining[is_target], remaining[~is_target]
    normed = F.normalize(metric.float(), dim=-1)
    assigned = (normed[others] @ normed[targets].T).argmax(dim=-1)
    sums = features[targets].float().index_add(0, assigned, features[others].float())
    counts = 1 + torch.bincount(assigned, minlength=len(targets)).to(sums.dtype)
    merged = features.clone()
    merged[targets] = (sums / counts[:, None]).to(features.dtype)
    return targets, merged


class VisionZip(CompressionMode):
    before_decoder = True
    reads_attention = False
    trainable = False

    def compress_images(self, tokens: ImageTokens, keep_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, metric = tokens.cls_attention(), tokens.key_metric()
        n, num_patches = scores.shape
        keep = torch.zeros_like(scores, dtype=torch.bool)
        features = []
        for image in range(n):  # each image at its own rate
            kept = kept_count(num_patches, float(keep_ratio[image]))
            contextual = contextual_count(kept)
            order = scores[image].argsort(descending=True, stable=True)  # ties: the earlier patch
            keep[image, order[:kept - contextual]] = True
            merged = tokens.features[image]
            if contextual:
                remaining = (~keep[image]).nonzero().flatten()
                targets, merged = merge_contextual(merged, metric[image], remaining, contextual)
                keep[image, targets] = True
            features.append(merged)
        return keep, torch.stack(features)
