"""The analytic FLOPs agree with torch's FlopCounterMode on the same forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import MODES, DiViCoConfig
from pipeline.model.flops import DecoderGeometry, prefill_flops, theory_ratio


@pytest.fixture(scope="module")
def eager_llava(tiny_llava_dir):
    # eager attention: its matmuls are counted on CPU (the CPU sdpa kernel is not)
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def _prompt(llava, num_text_before: int = 12, num_visual: int = 100, num_text_after: int = 20):
    torch.manual_seed(0)
    vocab = llava.config.text_config.vocab_size
    image = torch.full((num_visual,), llava.config.image_token_id)
    ids = torch.cat([torch.randint(10, vocab, (num_text_before,)), image, torch.randint(10, vocab, (num_text_after,))])
    features = torch.randn(1, num_visual, llava.config.text_config.hidden_size)
    return ids[None], features


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("logits", ["prefill", "training"])
def test_analytic_flops_match_flop_counter(eager_llava, mode, logits):
    config = DiViCoConfig(mode=mode, tau=1 / 9)
    wrapper = CompressedLlava(eager_llava, config)
    input_ids, features = _prompt(eager_llava)
    keep = 1 if logits == "prefill" else 0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        wrapper(input_ids, image_features=features, logits_to_keep=keep)
    geometry = DecoderGeometry.from_config(eager_llava.config.text_config)
    analytic = prefill_flops(geometry, input_ids.shape[1], 100, config,
                             num_logits=keep or input_ids.shape[1])["total"]
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.05


def test_theory_ratio_of_the_paper_geometry():
    llava_7b = DecoderGeometry(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
    ratio = theory_ratio(llava_7b, num_tokens=676, num_visual=576, tau=1 / 9, layer=2)
    assert 0.2 < ratio < 0.35
    # The analytic count with compression stays within a point of the layers-only theory.
    none = prefill_flops(llava_7b, 676, 576, DiViCoConfig(mode="none"))["total"]
    divico = prefill_flops(llava_7b, 676, 576, DiViCoConfig(mode="divico", tau=1 / 9))["total"]
    assert abs(divico / none - ratio) < 0.01
