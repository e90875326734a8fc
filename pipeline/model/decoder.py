"""The decoder backbone as the layer loops see it: its modules, and the installed name of the
KV-cache argument of its layers. Only this file knows the backbone's attribute names."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.masking_utils import create_causal_mask

# transformers 5.24 renamed the KV-cache argument of create_causal_mask and of the decoder
# layers from past_key_values (removed in 5.40) to cache: pass it under the installed name.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass
class DecoderParts:
    """The modules of a decoder backbone the layer loop touches, and nothing else.

    The scoring additionally reads, on layer K-1: self_attn.{q_proj, k_proj} (hooked while
    the layer runs), head_dim and scaling. Llama, Mistral and Qwen2 decoders in transformers
    share this layout; another backbone needs only its own `decoder_parts`.
    """

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    config: object  # the text config: attention implementation, cache layout


def decoder_parts(llava: LlavaForConditionalGeneration) -> DecoderParts:
    lm = llava.model.language_model
    return DecoderParts(lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb, llava.lm_head, lm.config)
