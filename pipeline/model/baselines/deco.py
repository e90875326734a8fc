"""DeCo (Yao et al. 2024, "DeCo: Decoupling Token Compression from Semantic Abstraction in
Multimodal Large Language Models"; yaolinli/DeCo): before the decoder, each image's patch grid
(the CLIP feature layer's outputs, before the projector) is average-pooled to a g x g grid
(torch's AdaptiveAvgPool2d, as the official snippet), and the projector maps the g^2 pooled
tokens; the projector is retrained (here with the LoRA fine-tune: train_projector), so DeCo is
a trained mode like select_only. Nothing is selected: no attention is read.

g = round(sqrt(round(tau N))): the pooled grid is square, so DeCo keeps g^2 tokens, the square
nearest the budget (at LLaVA-1.5's 576: 36, 64, 100 at tau 1/15, 1/9, 1/6; exactly the budget at
1/9). `kept_tokens` says so, and the FLOP count and the summaries use it.

Departure from the official setting: the pooled tokens take the first g^2 image slots of the
prompt, so their position ids run on from the image's start as the official (shorter) prompt's
do; the rest of the image slots are dropped before the decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.model.divico import kept_count
from pipeline.model.modes import CompressionMode
from pipeline.model.vision import ImageTokens


def pooled_side(num_visual: int, tau: float) -> int:
    return max(1, round(math.sqrt(kept_count(num_visual, tau))))


class DeCo(CompressionMode):
    before_decoder = True
    reads_attention = False

    def kept_tokens(self, num_visual: int, tau: float, counts: str = "project") -> int:
        return pooled_side(num_visual, tau) ** 2

    def compress_images(self, tokens: ImageTokens, keep_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, num_patches, width = tokens.features.shape
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"DeCo pools a square patch grid; the tower gives {num_patches} patches")
        grid = tokens.features.transpose(1, 2).reshape(n, width, side, side)
        keep = torch.zeros(n, num_patches, dtype=torch.bool, device=grid.device)
        features = torch.zeros_like(tokens.features)
        for image in range(n):  # each image at its own rate
            pooled_grid = pooled_side(num_patches, float(keep_ratio[image]))
            pooled = F.adaptive_avg_pool2d(grid[image:image + 1].float(), pooled_grid)  # (1, d, g, g)
            features[image, :pooled_grid ** 2] = pooled.flatten(2)[0].T.to(features.dtype)
            keep[image, :pooled_grid ** 2] = True
        return keep, features
