"""The analytic FLOPs agree with torch's FlopCounterMode on the same forward, part by part
(everything counted is a matmul, so exactly); the layers-only ratio of LLaVA-1.5-7B."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.flops import DecoderGeometry, layer_lengths, prefill_flops, theory_ratio
from pipeline.model.settings import MODES, DiViCoConfig


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


def _counted_parts(counter: FlopCounterMode, num_layers: int) -> dict[str, int]:
    """FlopCounterMode's totals by part of CompressedLlava: decoder layers, gap encoder,
    lm_head, and the scoring, which runs outside any module (the rest of the total)."""
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    layers = sum(by_module.get(f"CompressedLlava.model.model.language_model.layers.{i}", 0)
                 for i in range(num_layers))
    parts = {"layers": layers, "encoder": by_module.get("CompressedLlava.divico.gap_encoder", 0),
             "lm_head": by_module["CompressedLlava.model.lm_head"]}
    parts["scoring"] = counter.get_total_flops() - sum(parts.values())
    parts["total"] = counter.get_total_flops()
    return parts


DECODER_MODES = [mode for mode in MODES if not DiViCoConfig(mode=mode).compression.before_decoder]
VISION_MODES = [mode for mode in MODES if mode not in DECODER_MODES]


@pytest.mark.parametrize("mode", [*DECODER_MODES, "divico+moe"])
@pytest.mark.parametrize("logits", ["prefill", "training"])
def test_analytic_flops_match_flop_counter(eager_llava, mode, logits):
    """divico+moe: the Mixture-of-Experts encoder (three experts and the router)."""
    config = (DiViCoConfig(mode="divico", encoder="moe", tau=1 / 9) if mode == "divico+moe"
              else DiViCoConfig(mode=mode, tau=1 / 9))
    wrapper = CompressedLlava(eager_llava, config)
    input_ids, features = _prompt(eager_llava)
    keep = 1 if logits == "prefill" else 0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        wrapper(input_ids, image_features=features, logits_to_keep=keep)
    geometry = DecoderGeometry.from_config(eager_llava.config.text_config)
    analytic = prefill_flops(geometry, input_ids.shape[1], 100, config, num_logits=keep or input_ids.shape[1])
    assert analytic == _counted_parts(counter, geometry.layers)
    assert (analytic["encoder"] > 0) == config.uses_gap_encoder
    assert (analytic["scoring"] > 0) == (mode not in ("none", "random"))


@pytest.mark.parametrize("mode", VISION_MODES)
def test_a_mode_before_the_decoder_shortens_every_layer(eager_llava, tiny_llava_dir, mode):
    """Counted per decoder layer: every layer runs on the short sequence (shorter again after a
    later stage, MustDrop's); the vision side (tower, [CLS] row, merge, projector) is not part of
    the analytic count. Counts a mode decides per image are measured, cut by cut."""
    from model_helpers import prompts_batch
    from transformers import AutoProcessor

    from pipeline.model.vision import image_tokens

    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True])
    wrapper = CompressedLlava(eager_llava, DiViCoConfig(mode=mode, tau=1 / 9))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = wrapper(**batch, logits_to_keep=1)
    geometry = DecoderGeometry.from_config(eager_llava.config.text_config)
    num_tokens = batch["input_ids"].shape[1]
    counts = [int(mask.sum()) - (num_tokens - 100) for _, mask in out.cache_groups]
    assert wrapper.config.kept_tokens(100) in (counts[0], None)  # None: the mode decides per image
    image = (batch["input_ids"][0] == eager_llava.config.image_token_id).nonzero()
    text_rows = num_tokens - 1 - int(image.max())  # after the image, up to the query (the last token)
    analytic = prefill_flops(geometry, num_tokens, 100, wrapper.config, num_kept=counts, text_rows=text_rows)
    counted = _counted_parts(counter, geometry.layers)
    assert (analytic["layers"], analytic["lm_head"], analytic["encoder"]) == (
        counted["layers"], counted["lm_head"], counted["encoder"])
    mode_ = wrapper.config.compression
    if not mode_.later_stages(geometry.layers, 0, wrapper.config.tau):
        assert analytic["scoring"] == 0
        return
    # The later stages' scoring: what is counted outside the decoder's modules less the vision side
    # (the tower, the mode's choice on it, the projector), run again alone.
    with torch.no_grad(), FlopCounterMode(display=False) as vision:
        tokens = image_tokens(eager_llava, batch["pixel_values"], mode_.attention_after_features, mode_.tower_merge)
        _, features = mode_.compress_images(tokens, torch.tensor([1 / 9]))
        eager_llava.model.multi_modal_projector(features)
    assert len(counts) == 1 + len(mode_.later_stages(geometry.layers, 0, wrapper.config.tau))
    assert analytic["scoring"] == counted["scoring"] - vision.get_total_flops() > 0


def test_theory_ratio_of_the_paper_geometry():
    llava_7b = DecoderGeometry(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
    # 100 text + 576 visual tokens, 64 kept, K = 2 (K = 1 or 3 give 0.262 / 0.309; 65 kept 0.287)
    lengths = layer_lengths(32, 676, 576, DiViCoConfig(mode="divico", tau=1 / 9, layer=2))
    assert lengths == [676] * 2 + [164] * 30
    ratio = theory_ratio(llava_7b, 676, lengths)
    assert ratio == pytest.approx(0.28535, abs=5e-5)
    # The full count adds the encoder (2 * 64 * 4 d^2), the scoring (2 * 676 * d) and the lm_head (2 d V).
    none = prefill_flops(llava_7b, 676, 576, DiViCoConfig(mode="none"))
    divico = prefill_flops(llava_7b, 676, 576, DiViCoConfig(mode="divico", tau=1 / 9))
    assert (divico["encoder"], divico["scoring"], divico["lm_head"]) == (2 * 64 * 4 * 4096**2, 2 * 676 * 4096,
                                                                           2 * 4096 * 32000)
    assert divico["layers"] / none["layers"] == pytest.approx(ratio, rel=1e-12)
