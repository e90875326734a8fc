"""The vision side of a LLaVA model as the before-the-decoder modes see it: each image's patch
features at the feature layer (before the projector) and that layer's attention from [CLS].

LLaVA-1.5 feeds the language model the output of the CLIP layer `vision_feature_layer` (-2:
hidden_states[-2], the output of encoder layer 22 of 24), [CLS] removed. FasterVLM and VisionZip
rank patches by the attention [CLS] pays them *inside that same layer* (the official code's
`attentions[-2][:, :, 0, 1:]`). Here that row is formed from the q/k projections the layer
computes in its own forward (captured by hooks, as pipeline/model/divico.py does for the
decoder), so the tower runs under sdpa and no N x N attention matrix is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration


@dataclass
class ImageTokens:
    """What the tower gives for n images of N patches each."""

    features: torch.Tensor  # (n, N, d_v): the feature layer's patch outputs, before the projector
    query: torch.Tensor  # (n, d_v): the attention layer's [CLS] query projection
    keys: torch.Tensor  # (n, N + 1, d_v): its key projections, [CLS] first
    heads: int
    scale: float  # the layer's attention scaling (head_dim ** -0.5)
    # For a mode that reads the question (CompressionMode.reads_question), else None:
    question: torch.Tensor | None = None  # (n, d): the question each image comes with, in the decoder's input space
    projected: torch.Tensor | None = None  # (n, N, d): the patches through the projector
    # After a merge in the tower (image_tokens' `merge`): the slots that hold a token; the
    # others' rows of features and keys are zero and get no attention.
    present: torch.Tensor | None = None  # (n, N) bool
    # Set by a mode's compress_images: the patches no later stage may drop (MustDrop's key set).
    protected: torch.Tensor | None = None  # (n, N) bool

    def cls_attention(self, heads: int | None = None) -> torch.Tensor:
        """(n, N) float32: [CLS]'s attention over the patches, averaged over heads (the softmax
        runs over [CLS] and the patches, as in the layer itself). `heads`: split the width into
        that many heads instead of the layer's own, scaled by the new head width (PruMerge reads
        one head over the whole width)."""
        n, length, width = self.keys.shape
        heads = self.heads if heads is None else heads
        scale = self.scale if heads == self.heads else (width // heads) ** -0.5
        query = self.query.view(n, heads, 1, width // heads).float()
        keys = self.keys.view(n, length, heads, width // heads).transpose(1, 2).float()
        logits = query @ keys.transpose(-1, -2) * scale  # (n, H, 1, N + 1)
        if self.present is not None:
            logits = logits.masked_fill(~F.pad(self.present, (1, 0), value=True)[:, None, None], float("-inf"))
        weights = logits.softmax(dim=-1)
        return weights[:, :, 0, 1:].mean(dim=1)

    def key_metric(self) -> torch.Tensor:
        """(n, N, d_v / H): the patches' keys averaged over heads (VisionZip's merge metric)."""
        n, length, width = self.keys.shape
        return self.keys[:, 1:].view(n, length - 1, self.heads, width // self.heads).mean(dim=2)


class _FeatureLayerCapture:
    def __init__(self, attention: nn.Module) -> None:
        self.attention, self.query, self.keys, self._hooks = attention, None, None, []

    def __enter__(self) -> _FeatureLayerCapture:
        def keep_query(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.query = output[:, 0].detach()

        def keep_keys(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.keys = output.detach()

        self._hooks = [self.attention.q_proj.register_forward_hook(keep_query),
                       self.attention.k_proj.register_forward_hook(keep_keys)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()


def image_tokens(llava: LlavaForConditionalGeneration, pixel_values: torch.Tensor,
                 attention_after_features: bool = False, merge: Merge | None = None) -> ImageTokens:
    """Run the vision tower on `pixel_values` (n images) as get_image_features does, keeping
    the feature layer's patch outputs and the [CLS] query and keys of the feature layer or, with
    `attention_after_features`, of the layer after it (whose input the features are). `merge`:
    applied to the patches after the first layer (MustDrop's tower stage), the later layers then
    run on each image's present tokens only."""
    config = llava.config
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise ValueError("the before-the-decoder modes read one CLIP feature layer with [CLS] removed "
                         f"(vision_feature_layer={config.vision_feature_layer!r}, "
                         f"vision_feature_select_strategy={config.vision_feature_select_strategy!r})")
    tower = llava.model.vision_tower
    vision = getattr(tower, "vision_model", tower)  # transformers 5 drops the vision_model level
    layers = vision.encoder.layers
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings).
    layer = config.vision_feature_layer
    index = layer if layer >= 0 else len(layers) + 1 + layer
    if not 1 <= index <= len(layers):
        raise ValueError(f"vision_feature_layer={layer} of a {len(layers)}-layer tower: the features are not "
                         "the output of an attention layer, so there is no [CLS] attention to read")
    if attention_after_features and index == len(layers):
        raise ValueError(f"vision_feature_layer={layer}: the last of {len(layers)} layers has no layer after it "
                         "whose attention reads the features")
    attention_index = index if attention_after_features else index - 1
    if merge is not None and attention_index == 0:
        raise ValueError("a merge after the first vision layer leaves no later layer whose [CLS] attention "
                         "reads the merged tokens")
    attention = layers[attention_index].self_attn
    dtype = next(tower.parameters()).dtype
    with _FeatureLayerCapture(attention) as capture:
        if merge is None:
            outputs = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
            features, keys, present = outputs.hidden_states[layer][:, 1:], capture.keys, None
        else:
            features, keys, present = _merged_tower(vision, pixel_values.to(dtype), merge, index, attention_index,
                                                    capture)
    return ImageTokens(features=features, query=capture.query, keys=keys, heads=attention.num_heads,
                       scale=attention.scale, present=present)


# (patches (n, N, d)) -> (tokens (n, N, d), present (n, N) bool): see image_tokens
Merge = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _merged_tower(vision: nn.Module, pixel_values: torch.Tensor, merge: Merge, feature_index: int,
                  attention_index: int, capture: _FeatureLayerCapture
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tower's forward with `merge` after its first layer, up to the layer `capture` reads:
    (features (n, N, d) and the captured keys (n, N + 1, d) back in their slots, present (n, N))."""
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    mask = features = None
    for index, encoder_layer in enumerate(vision.encoder.layers[:attention_index + 1]):
        hidden = encoder_layer(hidden, mask)
        if index == 0:
            tokens, present = merge(hidden[:, 1:])
            # each image's present tokens first, in slot order; the batch padded to the longest
            order = (~present).to(torch.uint8).argsort(dim=1, stable=True)[:, :int(present.sum(1).max())]
            hidden = torch.cat([hidden[:, :1], tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))], 1)
            valid = F.pad(present.gather(1, order), (1, 0), value=True)
            mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~valid, torch.finfo(hidden.dtype).min)[:, None, None]
        if index + 1 == feature_index:
            features = hidden[:, 1:]

    def in_slots(rows: torch.Tensor) -> torch.Tensor:
        """(n, M, d) in `order` -> (n, N, d) in the slots, zero where absent."""
        slots = torch.zeros(*present.shape, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        slots = slots.scatter(1, order[..., None].expand(-1, -1, rows.shape[-1]), rows)
        return slots * present[..., None]

    keys = torch.cat([capture.keys[:, :1], in_slots(capture.keys[:, 1:])], dim=1)
    return in_slots(features), keys, present
