"""`divico import released`: a folder in the authors' released layout (a PEFT adapter trained on
a liuhaotian-format LLaVA, non_lora_trainables.bin) becomes an export whose logits equal an
independent reference of the released forward, written here from the released code's facts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from cli_helpers import run_divico

from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import pooled_visual_tokens, select_visual_tokens
from pipeline.model.released import PREFIXES, ReleasedFormatError, import_released
from pipeline.model.tiny import TinyLlavaConfig, save_tiny_llava

LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_576(tmp_path_factory) -> Path:
    """A tiny llava-hf LLaVA at 336 px: LLaVA-1.5's 576 visual tokens (where the released counts are exact)."""
    return save_tiny_llava(tmp_path_factory.mktemp("base_576"), TinyLlavaConfig(image_size=336))


def write_released(base: Path, folder: Path, prefix: str = PREFIXES[0]) -> tuple[torch.nn.Module, dict]:
    """The released layout: LoRA trained through PEFT on a liuhaotian-style tree (model.layers.N,
    lm_head) holding the base's language model, and the projector and gap encoder pickled with
    the DeepSpeed engine's key prefix. Returns the PEFT model (unmerged) and the pickled dict."""
    generator = torch.Generator().manual_seed(7)
    llava = LlavaForConditionalGeneration.from_pretrained(base)
    text_config = llava.config.text_config
    text_config._attn_implementation = "eager"
    lm = LlamaForCausalLM(text_config)
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=LINEAR_LAYERS))
    with torch.no_grad():
        for name, parameter in peft_lm.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_lm.save_pretrained(folder)
    d = text_config.hidden_size
    projector = llava.model.multi_modal_projector

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    trainables = {f"{prefix}model.mm_projector.0.weight": randn(*projector.linear_1.weight.shape),
                  f"{prefix}model.mm_projector.0.bias": randn(d), f"{prefix}model.mm_projector.2.weight": randn(d, d),
                  f"{prefix}model.mm_projector.2.bias": randn(d),
                  f"{prefix}model.disen_encoder.0.weight": randn(d, 2 * d), f"{prefix}model.disen_encoder.0.bias": randn(d),
                  f"{prefix}model.disen_encoder.1.weight": randn(2 * d, d),
                  f"{prefix}model.disen_encoder.1.bias": randn(2 * d)}
    torch.save(trainables, folder / "non_lora_trainables.bin")
    return peft_lm.eval(), {key.removeprefix(prefix): value for key, value in trainables.items()}


@torch.no_grad()
def released_logits(peft_lm: torch.nn.Module, trainables: dict, base: LlavaForConditionalGeneration,
                    pixel_values: torch.Tensor, input_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """The released forward, from its facts: CLIP layer -2 without CLS through their projector;
    layers < K = 2 on everything; layer 1's attention averaged over heads, from the last position,
    over the image columns; the top int(V tau) kept in position order, the mean of the lowest
    int(V (1 - tau)) pooled; g = Linear(2d, d) -> tanh -> Linear(d, 2d) on [kept, mean], mu
    added to the kept tokens; the kept tokens keep their position ids; the last position's logits."""
    t = trainables
    vision = base.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    features = F.linear(F.gelu(F.linear(vision, t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"])),
                        t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"])
    lm = peft_lm.base_model.model
    image = (input_ids[0] == base.config.image_token_id).nonzero()[:, 0]
    hidden = lm.model.embed_tokens(input_ids)
    hidden[0, image] = features[0]
    n, start, visual = input_ids.shape[1], int(image[0]), len(image)

    def run(layers, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        embeddings = lm.model.rotary_emb(hidden, positions[None])
        for layer in layers:
            hidden = layer(hidden, attention_mask=causal, position_embeddings=embeddings)
        return hidden

    positions = torch.arange(n)
    hidden = run(lm.model.layers[:1], hidden, positions)
    layer = lm.model.layers[1]
    attention, config = layer.self_attn, lm.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    x = layer.input_layernorm(hidden)
    q = attention.q_proj(x).view(1, n, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(1, n, kv_heads, head_dim).transpose(1, 2)
    cos, sin = lm.model.rotary_emb(hidden, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    weights = (q @ repeat_kv(k, heads // kv_heads).transpose(2, 3) / math.sqrt(head_dim)
               + torch.full((n, n), float("-inf")).triu(1)).softmax(-1)
    score = weights.mean(1)[0, -1, start:start + visual]
    hidden = run([layer], hidden, positions)
    keep = score.topk(int(visual * tau)).indices.sort().values
    pooled = (-score).topk(int(visual * (1 - tau))).indices
    kept = hidden[0, start + keep]
    mean = hidden[0, start + pooled].mean(0).expand_as(kept)
    g = F.linear(torch.tanh(F.linear(torch.cat([kept, mean], -1), t["model.disen_encoder.0.weight"],
                                     t["model.disen_encoder.0.bias"])),
                 t["model.disen_encoder.1.weight"], t["model.disen_encoder.1.bias"])
    mu = g[:, :g.shape[1] // 2]
    compressed = torch.cat([hidden[0, :start], kept + mu, hidden[0, start + visual:]])[None]
    compressed_positions = torch.cat([torch.arange(start), start + keep, torch.arange(start + visual, n)])
    hidden = run(lm.model.layers[2:], compressed, compressed_positions)
    return lm.lm_head(lm.model.norm(hidden))[0, -1]


def prompt(base: LlavaForConditionalGeneration, visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    image_id = base.config.image_token_id
    text = lambda length: torch.randint(3, 200, (length,), generator=generator)  # noqa: E731
    input_ids = torch.cat([torch.tensor([1]), text(12), torch.full((visual,), image_id), text(9)])[None]
    size = base.config.vision_config.image_size
    return input_ids, torch.randn(1, 3, size, size, generator=generator)


def test_the_imported_model_computes_the_released_forward(base_576, tmp_path):
    peft_lm, trainables = write_released(base_576, tmp_path / "released")
    out = import_released(tmp_path / "released", str(base_576), tmp_path / "export", dtype=torch.float32)
    saved, _ = CompressedLlava.read_saved(out)
    assert (saved.mode, saved.layer, saved.query, saved.kl, saved.sigma0) == ("divico", 2, "last", "released", 0.075)
    assert saved.tau == pytest.approx(1 / 9)
    imported = CompressedLlava.from_saved(LlavaForConditionalGeneration.from_pretrained(out), out).eval()
    base = LlavaForConditionalGeneration.from_pretrained(base_576).eval()
    input_ids, pixel_values = prompt(base, 576)
    with torch.no_grad():
        ours = imported(input_ids, pixel_values=pixel_values, logits_to_keep=1).logits[0, -1]
    reference = released_logits(peft_lm, trainables, base, pixel_values, input_ids, 1 / 9)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()
    # The comparison has teeth: the same tokens kept without the gap encoder's mu are far off.
    select_only = CompressedLlava.from_saved(LlavaForConditionalGeneration.from_pretrained(out), out,
                                             mode="select_only").eval()
    with torch.no_grad():
        without_gap = select_only(input_ids, pixel_values=pixel_values, logits_to_keep=1).logits[0, -1]
    assert (without_gap - reference).abs().max() > 1e-3


def test_the_released_counts_leave_the_best_dropped_token_out_of_the_pool(tiny_llava_dir, tmp_path):
    """100 visual tokens at tau 1/9: the released code keeps int(11.1) = 11 and averages the
    lowest int(88.9) = 88, so one token is in neither set; counts=released reproduces that and
    the project's rule (every dropped token averaged) does not."""
    peft_lm, trainables = write_released(tiny_llava_dir, tmp_path / "released")
    out = import_released(tmp_path / "released", str(tiny_llava_dir), tmp_path / "export", dtype=torch.float32)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    input_ids, pixel_values = prompt(base, 100)
    reference = released_logits(peft_lm, trainables, base, pixel_values, input_ids, 1 / 9)
    logits = {}
    for counts in ("released", "project"):
        model = CompressedLlava.from_saved(LlavaForConditionalGeneration.from_pretrained(out), out, counts=counts)
        with torch.no_grad():
            logits[counts] = model.eval()(input_ids, pixel_values=pixel_values, logits_to_keep=1).logits[0, -1]
    assert torch.allclose(logits["released"], reference, atol=1e-5, rtol=0)
    assert (logits["project"] - reference).abs().max() > 1e-6


def test_pooled_tokens_by_rule():
    scores = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0, 9.0]])
    image = torch.tensor([[False, True, True, True, True, True, False]])  # five visual tokens
    keep = select_visual_tokens(scores, image, 0.3, "released")  # int(1.5) = 1 kept: score 5
    assert keep.tolist() == [[False, True, False, False, False, False, False]]
    assert pooled_visual_tokens(scores, image, keep, 0.3, "released").tolist() == [  # int(3.5) = 3 lowest: 1, 2, 3
        [False, False, True, False, True, True, False]]
    assert pooled_visual_tokens(scores, image, keep, 0.3, "project").tolist() == [
        [False, False, True, True, True, True, False]]
    assert select_visual_tokens(scores, image, 0.3).sum() == 2  # round(1.5) = 2


def test_folders_not_in_the_released_layout_exit_1(tiny_llava_dir, tmp_path, caplog):
    folder = tmp_path / "released"
    write_released(tiny_llava_dir, folder, prefix=PREFIXES[1])
    args = ["import", "released", "--lora", str(folder), "--base", str(tiny_llava_dir)]
    assert run_divico([*args, "--out", str(tmp_path / "ok"), "--dtype", "fp32"]) == 0  # the final save's prefix too
    state = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    torch.save({**state, "base_model.model.model.disen_decoder.0.weight": torch.zeros(1)}, folder / "non_lora_trainables.bin")
    assert run_divico([*args, "--out", str(tmp_path / "a")]) == 1
    assert "keys that are neither the projector nor the gap encoder: ['base_model.model.model.disen_decoder.0.weight']" \
        in caplog.text
    torch.save({**state, "base_model.model.model.disen_encoder.0.bias": "zeros"}, folder / "non_lora_trainables.bin")
    assert run_divico([*args, "--out", str(tmp_path / "b")]) == 1
    assert "'base_model.model.model.disen_encoder.0.bias' holds a str, not a tensor" in caplog.text
    torch.save({k: v for k, v in state.items() if "disen_encoder.1.bias" not in k}, folder / "non_lora_trainables.bin")
    assert run_divico([*args, "--out", str(tmp_path / "c")]) == 1 and "the gap_encoder lacks ['fc2.bias']" in caplog.text
    torch.save(state, folder / "non_lora_trainables.bin")
    (folder / "adapter_config.json").unlink()
    assert run_divico([*args, "--out", str(tmp_path / "d")]) == 1 and "adapter_config.json: not found" in caplog.text
    with pytest.raises(ReleasedFormatError, match="exists; choose a new folder"):
        import_released(folder, str(tiny_llava_dir), tmp_path / "ok")


def test_weights_of_another_model_size_exit_1(tiny_llava_dir, tmp_path, caplog):
    wider = save_tiny_llava(tmp_path / "wider", TinyLlavaConfig(hidden=192, intermediate=512))
    write_released(wider, tmp_path / "released")
    args = ["import", "released", "--lora", str(tmp_path / "released"), "--base", str(tiny_llava_dir)]
    assert run_divico([*args, "--out", str(tmp_path / "out")]) == 1
    assert "does not fit" in caplog.text and not (tmp_path / "out").exists()
