"""A compression mode is a class plus one registration line: a toy mode registered here runs
through CompressedLlava's forward, cached generation and the analytic FLOP count."""

from __future__ import annotations

import pytest
import torch
from model_helpers import load_llava, prompts_batch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoProcessor

from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.flops import DecoderGeometry, prefill_flops
from pipeline.model.modes import CompressionMode
from pipeline.model.settings import MODES, DiViCoConfig


class KeepTheLastTokens(CompressionMode):
    """Each image's last round(tau N) tokens, by position: no attention read, nothing added."""

    reads_attention = False
    trainable = False

    def scores(self, attention, image_mask, sample_seeds):
        return image_mask.cumsum(1).float() * image_mask


@pytest.fixture
def keep_last(monkeypatch):
    monkeypatch.setitem(MODES, "keep_last", f"{__name__}:KeepTheLastTokens")


def test_a_registered_mode_runs_forward_generation_and_flops(keep_last, tiny_llava_dir):
    llava = load_llava(tiny_llava_dir, "eager")
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    batch = prompts_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="keep_last", tau=1 / 9))
    with torch.no_grad():
        out = wrapper(**batch)
    image_mask = batch["input_ids"] == llava.config.image_token_id
    for i in (0, 2):  # 100 visual tokens -> the last 11 kept
        kept = out.compressed_positions[i][out.compressed_attention_mask[i]]
        visual = image_mask[i].nonzero().flatten()
        assert kept[image_mask[i][kept]].tolist() == visual[-11:].tolist()
    cached = wrapper.generate(**batch, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(cached, wrapper.generate(**batch, max_new_tokens=3, eos_token_id=[], use_cache=False))

    # FLOPs: the analytic count of the decoder's prefill equals torch's count of the same forward.
    visual = torch.full((100,), llava.config.image_token_id)
    input_ids = torch.cat([torch.arange(10, 22), visual, torch.arange(30, 50)])[None]
    features = torch.randn(1, 100, llava.config.text_config.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapper(input_ids, image_features=features, logits_to_keep=1)
    geometry = DecoderGeometry.from_config(llava.config.text_config)
    analytic = prefill_flops(geometry, input_ids.shape[1], 100, wrapper.config)
    assert analytic["scoring"] == 0 and analytic["encoder"] == 0
    assert analytic["total"] == counter.get_total_flops()


def test_a_training_free_mode_is_refused_by_training(keep_last):
    from pipeline.train.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match="keep_last is a training-free baseline"):
        validate(load_config([], ["divico.mode=keep_last"]), world_size=1, check_paths=False)
