"""MustDrop (pipeline/model/baselines/mustdrop.py) on hand-made inputs: which windows merge at the
threshold, the means and where they go, the key set; and the tower run with a merge against the
tower's own forward."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import load_llava, prompts_batch
from transformers import AutoProcessor

from pipeline.model.baselines.mustdrop import key_set, merge_windows, window_similarity, window_slots
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
