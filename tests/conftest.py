"""Shared test assets: a tiny LLaVA saved to disk and reloaded like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.model.tiny import TinyLlavaConfig, save_tiny_llava


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny LLaVA folder (model + processor), built once per run."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), TinyLlavaConfig())
