"""Loading the tiny LLaVA for the model tests, on CPU or, with DIVICO_TEST_DEVICE=cuda, a GPU."""

from __future__ import annotations

import os

import torch
from transformers import LlavaForConditionalGeneration

DEVICE = torch.device(os.environ.get("DIVICO_TEST_DEVICE", "cpu"))


def load_llava(path, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.to(DEVICE).eval()
