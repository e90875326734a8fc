"""FasterVLM (Zhang et al. 2024, "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning"; Theia-4869/FasterVLM): training-free, before the decoder. Each image keeps the
round(tau N) patches that [CLS] attends to most in the CLIP feature layer (the official
`attentions[-2][:, :, 0, 1:]`, averaged over heads), in their original order; the rest never
reach the language model, so every decoder layer sees the short sequence.

Departures from the official code: the kept tokens keep their original position ids (as llmc's
Hugging Face path does; the official LLaVA code renumbers them contiguously), and the [CLS] row
comes from the layer's own q/k projections (pipeline/model/vision.py) instead of eager attention
with output_attentions: the same numbers, under any attention implementation.
"""

from __future__ import annotations

import torch

from pipeline.model.divico import select_visual_tokens
from pipeline.model.modes import CompressionMode
from pipeline.model.vision import ImageTokens


class FasterVLM(CompressionMode):
    before_decoder = True
    reads_attention = False
    trainable = False

    def compress_images(self, tokens: ImageTokens, keep_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = tokens.cls_attention()
        patches = torch.ones_like(scores, dtype=torch.bool)
        return select_visual_tokens(scores, patches, keep_ratio), tokens.features
