"""The one "auto" rule for device and precision: the GPU in bf16 when there is one, else the CPU in fp32."""

from __future__ import annotations

import torch


def resolve_device(requested: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is passed through."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU (LLaVA-1.5's training precision), fp32 on the CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
