"""MustDrop (pipeline/model/baselines/mustdrop.py) on hand-made inputs: which windows merge at the
threshold, the means and where they go, the key set; and the tower run with a merge against the
tower's own forward."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import run_divico
from model_helpers import QUESTIONS, image, load_llava, prompt, prompts_batch, split_samples
from PIL import Image
from transformers import AutoProcessor, DynamicCache

from pipeline.model.baselines.mustdrop import (
    MustDrop,
    MustDropAtBudget,
    dual_attention_filter,
    filter_layers,
    key_set,
    merge_windows,
    window_similarity,
    window_slots,
)
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.modes import StageState
from pipeline.model.settings import DiViCoConfig, MustDropSettings
from pipeline.model.tiny import TinyLlavaConfig, save_tiny_llava
from pipeline.model.vision import image_tokens


def test_windows_tile_the_grid_from_the_top_left():
    assert window_slots(6).tolist() == [[0, 1, 2, 6, 7, 8, 12, 13, 14], [3, 4, 5, 9, 10, 11, 15, 16, 17],
                                        [18, 19, 20, 24, 25, 26, 30, 31, 32], [21, 22, 23, 27, 28, 29, 33, 34, 35]]
    assert window_slots(24).shape == (64, 9)
    assert window_slots(10).max() == 8 * 10 + 8  # the last row and column of a 10 x 10 grid never merge


def window_of(similarity: float, generator: torch.Generator) -> torch.Tensor:
    """Nine unit vectors in 3-d whose mean pairwise cosine similarity is `similarity`: a shared
    direction plus orthogonal parts of equal size, spread evenly in the plane around it."""
    angles = torch.arange(9) * (2 * math.pi / 9)
    spread = torch.stack([angles.cos(), angles.sin(), torch.zeros(9)], dim=1)  # the plane's mean is zero
    shared = torch.tensor([0.0, 0.0, 1.0])
    # cos between two members = s^2 + (1 - s^2) cos(delta); over the 72 ordered pairs the
    # cosines of the angle differences average -1/8, so the mean is s^2 - (1 - s^2) / 8.
    s2 = (similarity + 1 / 8) / (1 + 1 / 8)
    return math.sqrt(s2) * shared + math.sqrt(1 - s2) * spread


def test_the_window_merge_at_the_threshold():
    generator = torch.Generator().manual_seed(0)
    side, slots = 6, window_slots(6)
    patches = torch.randn(1, 36, 3, generator=generator)
    wanted = [0.85, 0.8 + 1e-4, 0.8 - 1e-4, 0.2]  # windows 0 and 1 merge, 2 and 3 do not
    for window, similarity in enumerate(wanted):
        patches[0, slots[window]] = window_of(similarity, generator) * (1 + window)  # lengths do not matter
    torch.testing.assert_close(window_similarity(patches, slots)[0], torch.tensor(wanted), atol=1e-5, rtol=0)

    tokens, present = merge_windows(patches, side)
    for window in (0, 1):  # the mean in the window's last slot, its other eight slots absent
        members = slots[window]
        torch.testing.assert_close(tokens[0, members[-1]], patches[0, members].mean(0))
        assert not present[0, members[:-1]].any() and present[0, members[-1]]
    merged_away = set(slots[:2, :-1].flatten().tolist())
    assert present[0].nonzero().flatten().tolist() == [i for i in range(36) if i not in merged_away]
    unchanged = present[0] & ~torch.isin(torch.arange(36), slots[:2, -1])
    assert torch.equal(tokens[0, unchanged], patches[0, unchanged])
    # each image decides alone: an image whose windows all differ merges nothing beside it
    batch = torch.cat([patches, torch.randn(1, 36, 3, generator=generator)])
    tokens_2, present_2 = merge_windows(batch, side)
    assert torch.equal(tokens_2[0], tokens[0]) and torch.equal(present_2[0], present[0]) and present_2[1].all()


def test_the_key_set_is_the_top_share_of_the_present_tokens():
    present = torch.tensor([[True] * 20 + [False] * 5, [True] * 25])
    attention = torch.arange(25.0).flip(0).expand(2, -1).clone()  # slot 0 highest
    attention[0, 20:] = 100.0  # absent slots never count, whatever their score
    keys = key_set(attention, present)
    assert keys[0].nonzero().flatten().tolist() == [0, 1]  # ceil(0.08 x 20) = 2
    assert keys[1].nonzero().flatten().tolist() == [0, 1]  # ceil(0.08 x 25) = 2
    assert key_set(attention, present, share=0.5).sum(1).tolist() == [10, 13]


def test_the_merged_tower_equals_the_tower_when_nothing_merges(tiny_llava_dir):
    """No window merging: the features and the [CLS] row of the layer after them are the
    tower's; everything merging: the absent slots are zero and get no attention."""
    llava = load_llava(tiny_llava_dir, "sdpa")
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True, True])
    reference = image_tokens(llava, batch["pixel_values"], attention_after_features=True)
    side = int(math.isqrt(reference.features.shape[1]))
    unmerged = image_tokens(llava, batch["pixel_values"], attention_after_features=True,
                            merge=lambda patches: merge_windows(patches, side, threshold=2.0))
    assert unmerged.present.all()
    torch.testing.assert_close(unmerged.features, reference.features)
    torch.testing.assert_close(unmerged.cls_attention(), reference.cls_attention())

    merged = image_tokens(llava, batch["pixel_values"], attention_after_features=True,
                          merge=lambda patches: merge_windows(patches, side, threshold=-2.0))
    windows = window_slots(side)
    assert merged.present.sum(1).tolist() == [side * side - 8 * len(windows)] * 2
    assert not merged.features[~merged.present].any()
    attention = merged.cls_attention()
    assert not attention[~merged.present].any()
    assert attention.sum(1).lt(1).all()  # [CLS] keeps some for itself


def test_a_merge_needs_a_later_layer_to_read(tiny_llava_dir):
    """The tiny tower's features are its first layer's output: only the layer after them reads
    the merged tokens."""
    llava = load_llava(tiny_llava_dir, "sdpa")
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True])
    with pytest.raises(ValueError, match="no later layer"):
        image_tokens(llava, batch["pixel_values"], merge=lambda patches: merge_windows(patches, 10))


def test_the_dual_filter_drops_only_what_both_conditions_drop():
    """gamma 0.05, alpha 0.015; four text rows and a padding row over four visual tokens and one
    text token. Token 1 is kept by its total attention alone, token 2 by one row's alone."""
    attention = torch.tensor([[
        [0.2, 0.014, 0.02, 0.001, 0.5],
        [0.2, 0.014, 0.0, 0.001, 0.5],
        [0.2, 0.014, 0.0, 0.001, 0.5],
        [0.2, 0.014, 0.0, 0.001, 0.5],
        [0.0, 0.0, 0.0, 0.9, 0.0],  # padding: not a text row
    ]])
    rows = torch.tensor([[True, True, True, True, False]])
    image_mask = torch.tensor([[True, True, True, True, False]])
    # totals over the text rows: 0.8, 0.056, 0.02, 0.004 (visual: 0.88, so gamma x total = 0.044)
    keep = dual_attention_filter(attention, rows, image_mask, gamma=0.05, alpha=0.015)
    assert keep.tolist() == [[True, True, True, False, False]]
    # either threshold lower keeps token 3 too; both higher drop tokens 1 and 2
    assert dual_attention_filter(attention, rows, image_mask, gamma=0.004, alpha=0.015)[0, 3]
    assert dual_attention_filter(attention, rows, image_mask, gamma=0.05, alpha=0.001)[0, 3]
    assert dual_attention_filter(attention, rows, image_mask, gamma=0.07, alpha=0.03).tolist() == [
        [True, False, False, False, False]]


def test_the_budget_keeps_the_key_set_first():
    attention = torch.tensor([[[0.5, 0.3, 0.1, 0.05, 0.01, 0.0]]])
    state = StageState(attention=attention, rows=torch.tensor([[True]]), image_mask=torch.ones(1, 6, dtype=torch.bool),
                       visual=torch.tensor([6]), rate=0.5, protected=torch.tensor([[False] * 4 + [True, False]]))
    assert MustDropAtBudget().keep_at_stage(state).tolist() == [[True, True, False, False, True, False]]
    published = MustDrop().keep_at_stage(StageState(**{**state.__dict__, "rate": 1 / 9}))
    assert published[0, 4]  # the key set survives a filter that would drop it (gamma 0.011, alpha 0.01)
    assert published.tolist() == [[True, True, True, True, True, False]]


def test_the_filter_layers_scale_with_the_depth():
    official = MustDropSettings()
    assert filter_layers(32, official) == [2, 6, 10, 14]
    assert filter_layers(40, official) == [2, 8, 12, 18]  # round(l x 40 / 32), half to even
    assert filter_layers(4, official) == [0, 1, 2]
    assert MustDrop().later_stages(32, 0, 1 / 9) == [(3, 1 / 9), (7, 1 / 9), (11, 1 / 9), (15, 1 / 9)]
    assert MustDropAtBudget().later_stages(32, 0, 1 / 9) == [(3, 1 / 9)]
    chosen = DiViCoConfig(mode="mustdrop", mustdrop=MustDropSettings(filter_layers=[4, 12], reference_depth=16))
    assert chosen.compression.later_stages(32, 0, 1 / 9) == [(9, 1 / 9), (25, 1 / 9)]


def test_the_published_mode_runs_at_its_published_budgets_or_given_thresholds():
    for tau in (1 / 3, 2 / 9, 1 / 9, 0.1111111):
        DiViCoConfig(mode="mustdrop", tau=tau).validate()
    with pytest.raises(ValueError, match=r"divico.tau=0.1666.*mustdrop.gamma.*mustdrop_budget"):
        DiViCoConfig(mode="mustdrop", tau=0.1666667).validate(prefix="divico.")
    DiViCoConfig(mode="mustdrop_budget", tau=0.1666667).validate()
    vizwiz = DiViCoConfig(mode="mustdrop", tau=0.1666667, mustdrop=MustDropSettings(gamma=0.005, alpha=0.001))
    vizwiz.validate()
    assert vizwiz.compression.thresholds(vizwiz.tau) == (0.005, 0.001)
    assert DiViCoConfig(mode="mustdrop").compression.thresholds(1 / 9) == (0.011, 0.01)
    assert DiViCoConfig.from_dict(vizwiz.to_dict()) == vizwiz  # saved beside a model, read back
    for bad, named in ((MustDropSettings(gamma=0.01), "set both"),
                       (MustDropSettings(filter_layers=[6, 2]), "ascending"),
                       (MustDropSettings(filter_layers=[2, 32]), "reference_depth=32")):
        with pytest.raises(ValueError, match=named):
            DiViCoConfig(mode="mustdrop", mustdrop=bad).validate()


def half_flat(seed: int) -> Image.Image:
    """Noise below, one flat grey above: the tiny tower's 10 x 10 grid has six 3 x 3 windows in
    the top six patch rows, which merge (mean similarity ~0.92 after the first layer; the noisy
    ones ~0.2)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (140, 140, 3), dtype=np.uint8)
    pixels[:84] = 120
    return Image.fromarray(pixels)


def test_mustdrop_in_the_model_merges_filters_and_keeps_the_key_set(tiny_llava_dir):
    """A half-flat image enters the decoder as 100 - 6 x 8 = 52 tokens; the key set is in every
    stage's sequence; in a batch beside a noise image (no merge, so the tower pads) and a
    text-only sample, each sample's logits are its own."""
    llava = load_llava(tiny_llava_dir, "sdpa")
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    processor.tokenizer.padding_side = "left"
    texts = [prompt(QUESTIONS[0], True), prompt(QUESTIONS[1], True), prompt(QUESTIONS[2], False)]
    batch = processor(images=[half_flat(0), image(1)], text=texts, return_tensors="pt", padding=True)
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="mustdrop", tau=1 / 9))
    with torch.no_grad():
        out = wrapper(**batch)
        alone = [wrapper(**sample).logits[:, -1] for sample in split_samples(batch, llava.config.image_token_id)]
    torch.testing.assert_close(out.logits[:, -1], torch.cat(alone), atol=1e-4, rtol=1e-4)

    image_id = llava.config.image_token_id
    slots = (batch["input_ids"][0] == image_id).nonzero().flatten()
    tokens = image_tokens(llava, batch["pixel_values"][:1], attention_after_features=True, merge=merge_windows)
    keys = slots[key_set(tokens.cls_attention(), tokens.present)[0]]
    assert tokens.present.sum() == 52 and len(keys) == math.ceil(0.08 * 52)
    assert [first for first, _ in out.cache_groups] == [0, 1, 2, 3]
    text = int(batch["attention_mask"][0].sum()) - 100
    visual_by_stage = [int(mask[0].sum()) - text for _, mask in out.cache_groups]
    assert visual_by_stage[0] == 52 and visual_by_stage == sorted(visual_by_stage, reverse=True)
    final = out.compressed_positions[0][out.compressed_attention_mask[0]]
    assert torch.isin(keys, final).all()


def test_mustdrop_at_the_13b_depth(tmp_path):
    """40 decoder layers: the filters after layers 2, 8, 12 and 18; after a cached prefill,
    layers 0-1 hold the tower's tokens and layers 2-39 the last filter's (every layer of all 40);
    the cached generation equals the recomputed one."""
    directory = save_tiny_llava(tmp_path / "deep", TinyLlavaConfig(layers=40, hidden=64, intermediate=128))
    llava = load_llava(directory, "sdpa")
    batch = prompts_batch(AutoProcessor.from_pretrained(directory), [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="mustdrop", tau=1 / 9))
    with torch.no_grad():
        out = wrapper(**batch)
        cache = DynamicCache(config=wrapper.decoder.config)
        cut = wrapper(**batch, past_key_values=cache, logits_to_keep=1)
    assert [first for first, _ in out.cache_groups] == [0, 3, 9, 13, 19]
    assert [first for first, _ in cut.cache_groups] == [0, 2]
    tower, final = out.cache_groups[0][1].shape[1], out.compressed_attention_mask.shape[1]
    assert final < tower
    assert [cache.get_seq_length(layer) for layer in range(40)] == [tower] * 2 + [final] * 38
    torch.testing.assert_close(cut.logits[:, -1], out.logits[:, -1])
    cached = wrapper.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(cached, wrapper.generate(**batch, max_new_tokens=4, eos_token_id=[], use_cache=False))


def test_divico_over_mustdrop_encodes_at_the_filter(tiny_llava_dir):
    """With the gap encoder's mean starting at zero (init=zero) the composition answers as
    mustdrop_budget does; in training it samples a gap for the filter's tokens and has a KL."""
    llava = load_llava(tiny_llava_dir, "sdpa")
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True, False, True])
    budget = CompressedLlava(llava, DiViCoConfig(mode="mustdrop_budget", tau=1 / 9))
    composed = CompressedLlava(llava, DiViCoConfig(mode="divico_mustdrop", tau=1 / 9, init="zero"))
    with torch.no_grad():
        expected, out = budget(**batch), composed(**batch)
    torch.testing.assert_close(out.logits, expected.logits)
    assert torch.equal(out.compressed_positions, expected.compressed_positions)
    composed.train()
    trained = composed(**batch)
    assert trained.kl > 0 and trained.gap_stats is not None


def test_divico_eval_takes_mustdrop_thresholds(tiny_llava_dir, tmp_path, caplog):
    """`divico eval` at a tau with no published thresholds is bad input, named; with
    divico.mustdrop.gamma and alpha (as a training recipe spells them) it runs."""
    images = tmp_path / "images"
    images.mkdir()
    half_flat(0).save(images / "a.png")
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"id": "q", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}]}]))
    args = ["eval", f"model={tiny_llava_dir}", f"data={data}", f"image_root={images}", "max_new_tokens=2", "device=cpu",
            "divico.mode=mustdrop", "divico.tau=0.1666667"]
    out = ["--out", str(tmp_path / "summary.json")]
    assert run_divico([*args, *out]) == 2 and "divico.mustdrop.gamma" in caplog.text
    assert run_divico([*args, "divico.mustdrop.gamma=0.005", "divico.mustdrop.alpha=0.001", *out]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["mode"], summary["samples"]) == ("mustdrop", 1)
    assert summary["visual_tokens_kept"] == 52  # what the tower's merge leaves (its first cut)
