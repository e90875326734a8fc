"""CompressedLlava on the tiny LLaVA (fp32): equality with transformers, batching, padding,
caching, training gradients, save/load, the query rule, what layer K receives, the KL
divisor, gap stats, init=zero, random draws per image. On CPU; DIVICO_TEST_DEVICE=cuda runs
them on a GPU."""

from __future__ import annotations

import pytest
import torch
from model_helpers import DEVICE, QUESTIONS, image, load_llava, prompt, prompts_batch, split_samples, training_batch
from transformers import DynamicCache

from pipeline.contract import DIVICO_SETTINGS_FILE, DIVICO_WEIGHTS_FILE
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.settings import MODES, DiViCoConfig

COMPRESSING_MODES = [m for m in MODES if m != "none"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llava(request, tiny_llava_dir):
    return load_llava(tiny_llava_dir, request.param)


def test_none_equals_transformers(llava, processor):
    batch = prompts_batch(processor, [True, True, False])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="none"))
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = wrapper(**batch).logits
        reference = llava(**batch, position_ids=position_ids).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-5, rtol=1e-5)


def test_fastv_keeping_everything_equals_none(llava, processor):
    batch = prompts_batch(processor, [True, True])
    with torch.no_grad():
        none = CompressedLlava(llava, DiViCoConfig(mode="none"))(**batch).logits
        fastv = CompressedLlava(llava, DiViCoConfig(mode="fastv", tau=1.0))(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(fastv[valid], none[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", COMPRESSING_MODES)
def test_text_only_batch_passes_unchanged(llava, processor, mode):
    batch = prompts_batch(processor, [False, False])
    with torch.no_grad():
        none = CompressedLlava(llava, DiViCoConfig(mode="none"))(**batch).logits
        out = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))(**batch)
    torch.testing.assert_close(out.logits, none, atol=0, rtol=0)
    assert out.kl == 0


@pytest.mark.parametrize("mode", COMPRESSING_MODES)
def test_sequence_shrinks_by_the_dropped_visual_tokens(llava, processor, mode):
    batch = prompts_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))
    with torch.no_grad():
        out = wrapper(**batch)
    image_token_id = llava.config.image_token_id
    lengths = out.compressed_attention_mask.sum(1)
    # 100 visual tokens -> 11 kept (DeCo: its 3 x 3 pooled grid; Recoverable Compression as
    # published and MustDrop's tower merge: their own count per image); the text-only sample
    # passes unchanged
    kept = wrapper.config.kept_tokens(100)
    own_count = {"recoverable", "mustdrop", "mustdrop_budget", "divico_mustdrop"}
    assert kept == (None if mode in own_count else {"deco": 9}.get(mode, 11))
    visual_kept = []
    for i in range(3):
        positions = out.compressed_positions[i][out.compressed_attention_mask[i]]
        assert torch.all(positions[1:] > positions[:-1]), "kept tokens keep their order"
        visual_kept.append(int((batch["input_ids"][i][positions] == image_token_id).sum()))
    if kept is None:
        assert 0 < visual_kept[0] < 100 and 0 < visual_kept[2] < 100
    else:
        assert visual_kept[0] == visual_kept[2] == kept
    assert visual_kept[1] == 0
    dropped = [100 - visual_kept[0], 0, 100 - visual_kept[2]]
    assert lengths.tolist() == (batch["attention_mask"].sum(1).cpu() - torch.tensor(dropped)).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_samples_one_by_one(llava, processor, mode):
    batch = prompts_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))
    with torch.no_grad():
        batched = wrapper(**batch).logits[:, -1]
        alone = [wrapper(**s).logits[:, -1] for s in split_samples(batch, llava.config.image_token_id)]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_generation_cache_batch_and_recompute_agree(llava, processor, mode):
    batch = prompts_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))
    cached = wrapper.generate(**batch, max_new_tokens=4, eos_token_id=[])
    recomputed = wrapper.generate(**batch, max_new_tokens=4, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, recomputed)
    width = batch["input_ids"].shape[1]
    for i, sample in enumerate(split_samples(batch, llava.config.image_token_id)):
        alone = wrapper.generate(**sample, max_new_tokens=4, eos_token_id=[])
        assert torch.equal(alone[0, sample["input_ids"].shape[1]:], cached[i, width:])



def test_generation_under_the_last_rule(llava, processor):
    """At inference both rules query the last prompt token, and the recompute keeps it while
    the sequence grows (the last token then is a generated one)."""
    batch = prompts_batch(processor, [True, False, True])
    last = CompressedLlava(llava, DiViCoConfig(mode="fastv", tau=1 / 9, query="last"))
    cached = last.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(cached, last.generate(**batch, max_new_tokens=4, eos_token_id=[], use_cache=False))
    first_answer = CompressedLlava(llava, DiViCoConfig(mode="fastv", tau=1 / 9))
    assert torch.equal(cached, first_answer.generate(**batch, max_new_tokens=4, eos_token_id=[]))

@pytest.mark.parametrize("mode", ["fastv", "divico"])
def test_cached_decode_logits_equal_recompute(llava, processor, mode):
    """Two decode steps over the split cache (layers < K full, >= K compressed) give the
    logits of a full forward over prompt + new tokens with the same selection."""
    batch = prompts_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))
    mask = batch["attention_mask"].bool()
    queries = wrapper.query_positions(mask, batch["input_ids"] == llava.config.image_token_id)
    cache = DynamicCache(config=wrapper.decoder.config)
    with torch.no_grad():
        out = wrapper(**batch, query_positions=queries, past_key_values=cache, logits_to_keep=1)
        assert cache.get_seq_length(0) == mask.shape[1] > cache.get_seq_length(wrapper.config.layer)
        ids, kept, position = batch["input_ids"], out.compressed_attention_mask, mask.sum(1, keepdim=True)
        for new_token in torch.tensor([[[5], [6], [7]], [[8], [9], [10]]], device=DEVICE):
            ids = torch.cat([ids, new_token], 1)
            ones = torch.ones_like(mask[:, :1])
            mask, kept = torch.cat([mask, ones], 1), torch.cat([kept, ones], 1)
            step = wrapper._decode_step(new_token, [(0, mask), (wrapper.config.layer, kept)], position, cache)
            position = position + 1
            recomputed = wrapper(ids, mask, batch["pixel_values"], query_positions=queries).logits[:, -1]
            torch.testing.assert_close(step, recomputed, atol=1e-5, rtol=1e-5)


def test_none_generation_equals_transformers_generate(llava, processor):
    batch = prompts_batch(processor, [True, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="none"))
    ours = wrapper.generate(**batch, max_new_tokens=5, eos_token_id=[])
    reference = llava.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None,
                               min_new_tokens=5)
    assert torch.equal(ours, reference)


def test_right_padding_matches_left_padding(llava, processor):
    left = prompts_batch(processor, [True, True, False], padding_side="left")
    right = prompts_batch(processor, [True, True, False], padding_side="right")
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9)).eval()
    with torch.no_grad():
        out_left = wrapper(**left)
        out_right = wrapper(**right)
    for i in range(3):
        a = out_left.logits[i][out_left.compressed_attention_mask[i]]
        b = out_right.logits[i][out_right.compressed_attention_mask[i]]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_query_is_the_inference_query(llava, processor):
    train = training_batch(processor, [True, True])
    prompts = prompts_batch(processor, [True, True], padding_side="right")
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="fastv"))
    image_mask = train["input_ids"] == llava.config.image_token_id
    from_labels = wrapper.query_positions(train["attention_mask"].bool(), image_mask, train["labels"])
    at_inference = wrapper.query_positions(prompts["attention_mask"].bool(),
                                           prompts["input_ids"] == llava.config.image_token_id)
    assert from_labels.tolist() == at_inference.tolist()


def _kept_visual(out, batch, image_token_id: int) -> list[list[int]]:
    """Per sample, the input positions of the visual tokens layers >= K see."""
    kept = []
    for i in range(batch["input_ids"].shape[0]):
        positions = out.compressed_positions[i][out.compressed_attention_mask[i]]
        kept.append([p for p in positions.tolist() if batch["input_ids"][i, p] == image_token_id])
    return kept


def test_query_rule_decides_the_selection(tiny_llava_dir, processor):
    """On a right-padded training batch the collator's first-answer positions are passed as
    training passes them; query=first_answer selects by their attention row, query=last by
    the last non-pad token's, and the two selections differ."""
    llava = load_llava(tiny_llava_dir, "eager")
    batch = training_batch(processor, [True, True])
    image_token_id, layer = llava.config.image_token_id, DiViCoConfig().layer
    mask = batch["attention_mask"].bool()
    positions = torch.arange(mask.shape[1], device=DEVICE)
    first_answer = torch.where(batch["labels"] != -100, positions, mask.shape[1]).min(1).values - 1
    last = torch.where(mask, positions, -1).max(1).values
    assert torch.all(first_answer < last)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        attentions = llava(**inputs, output_attentions=True).attentions[layer - 1]
    rows = torch.arange(2, device=DEVICE)
    image_mask = batch["input_ids"] == image_token_id
    kept = {}
    for rule, query in (("first_answer", first_answer), ("last", last)):
        wrapper = CompressedLlava(llava, DiViCoConfig(mode="fastv", tau=1 / 9, query=rule))
        with torch.no_grad():
            out = wrapper(**batch, query_positions=first_answer)
        kept[rule] = _kept_visual(out, batch, image_token_id)
        scores = attentions[rows, :, query].mean(1).masked_fill(~image_mask, -1)
        expected = [sorted(scores[i].topk(11).indices.tolist()) for i in range(2)]
        assert kept[rule] == expected, rule
    assert kept["first_answer"] != kept["last"]


def test_eval_feeds_layer_k_v_s_plus_mu(llava, processor):
    """Inside the full model, layer K receives v_s + mu (mu from the gap encoder on v_s and
    the mean of the dropped visual tokens of layer K-1's output) and the text unchanged."""
    batch = prompts_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9)).eval()
    layers, layer = wrapper.decoder.layers, wrapper.config.layer
    seen = {}
    hooks = [layers[layer - 1].register_forward_hook(lambda module, args, out: seen.update(before=out)),
             layers[layer].register_forward_pre_hook(lambda module, args: seen.update(after=args[0]))]
    try:
        with torch.no_grad():
            out = wrapper(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    image_mask = batch["input_ids"] == llava.config.image_token_id
    for i in range(3):
        slots = out.compressed_attention_mask[i]
        source = out.compressed_positions[i][slots]
        received, before = seen["after"][i][slots], seen["before"][i]
        visual = image_mask[i][source]
        torch.testing.assert_close(received[~visual], before[source[~visual]], atol=0, rtol=0)
        if not visual.any():
            continue
        kept = source[visual]
        dropped = image_mask[i].clone()
        dropped[kept] = False
        v_s, v_p = before[kept], before[dropped].double().mean(0).float()
        with torch.no_grad():
            mu = wrapper.divico.gap_encoder(v_s, v_p.expand_as(v_s), torch.full((len(v_s),), 1 / 9),
                                            torch.zeros(len(v_s), dtype=torch.long)).mu
        assert mu.norm(dim=-1).min() > 0.1 * v_s.norm(dim=-1).max(), "mu is not negligible here"
        torch.testing.assert_close(received[visual], v_s + mu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
def test_kl_averages_over_image_samples_and_gap_stats(llava, processor, per_token):
    """In a batch of two image samples and a text-only one the KL sum is divided by 2 (and
    the hidden size), or with kl_per_token by the 22 kept tokens; gap_stats are those of the
    kept tokens the encoder saw."""
    batch = training_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9, kl_per_token=per_token)).eval()
    seen = {}
    hook = wrapper.divico.gap_encoder.register_forward_hook(
        lambda module, args, out: seen.update(selected=args[0], estimate=out))
    try:
        with torch.no_grad():
            out = wrapper(**batch)
    finally:
        hook.remove()
    mu, l = seen["estimate"][:2]
    assert mu.shape[0] == 2 * 11, "11 kept tokens in each image sample"
    total = (0.5 * (-l + l.exp() + mu**2 - 1)).sum()
    hidden_size = mu.shape[-1]
    torch.testing.assert_close(out.kl, total / ((22 if per_token else 2) * hidden_size))
    assert not torch.allclose(out.kl, total / (3 * hidden_size))
    ratio = (mu.norm(dim=-1) / seen["selected"].norm(dim=-1)).mean()
    torch.testing.assert_close(out.gap_stats["mu_over_vs"], ratio)
    torch.testing.assert_close(out.gap_stats["sigma"], ((0.5 * l).exp() * 0.075).mean())
    with torch.no_grad():
        assert CompressedLlava(llava, DiViCoConfig(mode="fastv"))(**batch).gap_stats is None


def test_zero_init_starts_at_select_only(llava, processor):
    batch = prompts_batch(processor, [True, False, True])
    with torch.no_grad():
        select_only = CompressedLlava(llava, DiViCoConfig(mode="select_only")).eval()(**batch).logits
        zero = CompressedLlava(llava, DiViCoConfig(mode="divico", init="zero")).eval()(**batch).logits
        released = CompressedLlava(llava, DiViCoConfig(mode="divico")).eval()(**batch).logits
    torch.testing.assert_close(zero, select_only, atol=0, rtol=0)
    assert not torch.allclose(released, select_only, atol=1e-3)


def test_random_mode_draws_per_image(llava, processor):
    """The same image keeps the same token slots at another row, beside other images and
    after another question; different images keep different slots."""
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="random", tau=1 / 9, seed=1))
    image_token_id = llava.config.image_token_id

    def kept_slots(images: list, questions: list[str]) -> list[list[int]]:
        texts = [prompt(question, True) for question in questions]
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True).to(DEVICE)
        with torch.no_grad():
            out = wrapper(**batch)
        slots = []
        for i, kept in enumerate(_kept_visual(out, batch, image_token_id)):
            first_image_token = int((batch["input_ids"][i] == image_token_id).nonzero()[0])
            slots.append([p - first_image_token for p in kept])
        return slots

    a = kept_slots([image(0), image(1), image(2)], QUESTIONS)
    b = kept_slots([image(2), image(0)], QUESTIONS[1:])
    assert b == [a[2], a[0]]
    assert a[0] != a[1] and a[1] != a[2] and a[0] != a[2]


def test_training_forward_labels_stay_aligned(llava, processor):
    """The compressed forward's loss equals a hand-computed loss on the kept tokens."""
    batch = training_batch(processor, [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="fastv", tau=1 / 9))
    with torch.no_grad():
        out = wrapper(**batch)
    losses = []
    for i in range(3):
        kept = out.compressed_positions[i][out.compressed_attention_mask[i]]
        logits = out.logits[i][out.compressed_attention_mask[i]]
        labels = batch["labels"][i][kept]
        supervised = labels[1:] != -100
        losses.append(torch.nn.functional.cross_entropy(logits[:-1][supervised], labels[1:][supervised],
                                                        reduction="sum"))
        assert supervised.sum() == (batch["labels"][i] != -100).sum()
    expected = sum(losses) / (batch["labels"] != -100).sum()
    torch.testing.assert_close(out.lm_loss, expected)


@pytest.fixture(scope="module")
def lora_llava(tiny_llava_dir):
    from peft import LoraConfig, get_peft_model

    model = load_llava(tiny_llava_dir, "sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=rf".*language_model.*\.({'|'.join(targets)})")
    peft_model = get_peft_model(model, config)
    for p in peft_model.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    peft_model.gradient_checkpointing_enable()
    return peft_model


@pytest.mark.parametrize("with_image", [[True, False], [False, False]], ids=["mixed", "text_only"])
def test_training_gradients_reach_lora_and_encoder(lora_llava, processor, with_image):
    batch = training_batch(processor, with_image)
    wrapper = CompressedLlava(lora_llava, DiViCoConfig(mode="divico", tau=1 / 9)).train()
    wrapper.zero_grad()
    out = wrapper(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in wrapper.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    lora = [p.grad for n, p in trainable.items() if "lora_" in n]
    assert any(g.abs().sum() > 0 for g in lora)
    encoder = [p.grad for n, p in trainable.items() if "gap_encoder" in n]
    assert len(encoder) == 4
    if any(with_image):
        assert all(g.abs().sum() > 0 for g in encoder)
        assert out.kl > 0
    else:
        assert all(g.abs().sum() == 0 for g in encoder)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.02 * out.kl)


def test_gradient_checkpointing_gives_the_same_gradients(lora_llava, processor):
    batch = training_batch(processor, [True, True])
    wrapper = CompressedLlava(lora_llava, DiViCoConfig(mode="point_estimate", tau=1 / 9)).train()
    grads = []
    for enabled in (True, False):
        if enabled:
            lora_llava.gradient_checkpointing_enable()
        else:
            lora_llava.gradient_checkpointing_disable()
        wrapper.zero_grad()
        wrapper(**batch).loss.backward()
        grads.append([p.grad.clone() for p in wrapper.parameters() if p.requires_grad])
    lora_llava.gradient_checkpointing_enable()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_divico_samples_in_training_and_uses_mu_in_eval(llava, processor):
    batch = prompts_batch(processor, [True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9))
    with torch.no_grad():
        wrapper.train()
        torch.manual_seed(0)
        first = wrapper(**batch).logits
        second = wrapper(**batch).logits
        wrapper.eval()
        eval_a, eval_b = wrapper(**batch).logits, wrapper(**batch).logits
    assert not torch.allclose(first, second)
    torch.testing.assert_close(eval_a, eval_b, atol=0, rtol=0)


def test_save_load_round_trip(llava, processor, tmp_path):
    batch = prompts_batch(processor, [True, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 6, beta=0.05)).eval()
    with torch.no_grad():
        for p in wrapper.divico.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    wrapper.save_divico(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([DIVICO_SETTINGS_FILE, DIVICO_WEIGHTS_FILE])
    loaded = CompressedLlava.from_saved(llava, tmp_path).eval()
    assert loaded.config == wrapper.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, wrapper(**batch).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="tau"):
        CompressedLlava.from_saved(llava, tmp_path, tau=1.5)


def test_bad_inputs_are_named(llava, processor):
    batch = prompts_batch(processor, [True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="fastv"))
    with pytest.raises(ValueError, match="pixel_values"):
        wrapper(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="left-padded"):
        right = prompts_batch(processor, [True, False], padding_side="right")
        wrapper.generate(**right, max_new_tokens=2)
    with pytest.raises(ValueError, match="layer"):
        CompressedLlava(llava, DiViCoConfig(layer=4))
