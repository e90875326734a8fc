"""The DiViCo module: token counts, selection scores (from captured projections, under sdpa
and eager) against eager attention weights, selection, gap encoder numerics, KL, config
validation."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import DEVICE, load_llava

from pipeline.model.divico import (
    DiViCo,
    DiViCoConfig,
    GapEncoder,
    GapEstimate,
    ProjectionCapture,
    kept_count,
    kl_divergence,
    query_attention_scores,
    random_scores,
    select_visual_tokens,
)


def test_kept_count_matches_the_paper():
    assert [kept_count(576, tau) for tau in (1 / 6, 1 / 9, 1 / 15)] == [96, 64, 38]
    assert [kept_count(100, tau) for tau in (1 / 6, 1 / 9, 1 / 15)] == [17, 11, 7]
    assert kept_count(5, 0.01) == 1 and kept_count(0, 0.5) == 0
    counts = kept_count(torch.tensor([576, 0, 100]), 1 / 9)
    assert counts.tolist() == [64, 0, 11]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_scores_equal_eager_attention_weights(tiny_llava_dir, padding_side, attn):
    """Scores from the projections captured while the model runs under `attn` equal the
    head-averaged rows of eager attention's weights."""
    llava = load_llava(tiny_llava_dir, "eager")
    torch.manual_seed(0)
    lengths = [30, 22, 27]
    width, vocab = max(lengths), llava.config.text_config.vocab_size
    input_ids = torch.randint(10, vocab, (3, width))
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if padding_side == "left":
            attention_mask[i, width - n:] = 1
        else:
            attention_mask[i, :n] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    # queries anywhere in the sample (not only its last token): the causal range matters
    first = (attention_mask.argmax(1)).tolist()
    queries = torch.tensor([first[0] + 25, first[1] + 10, first[2] + 26], device=DEVICE)
    lm = llava.model.language_model
    with torch.no_grad():
        reference = llava(**inputs, output_attentions=True).attentions
        llava.set_attn_implementation(attn)
        with ProjectionCapture(lm.layers[0].self_attn, queries) as layer_1, \
                ProjectionCapture(lm.layers[2].self_attn, queries) as layer_3:
            llava(**inputs)
    position_embeddings = lm.rotary_emb(torch.zeros(1, device=DEVICE), inputs["position_ids"])
    for layer_index, captured in ((0, layer_1), (2, layer_3)):  # K = 1 and K = 3
        ours = query_attention_scores(captured, position_embeddings, inputs["attention_mask"].bool())
        expected = reference[layer_index][torch.arange(3, device=DEVICE), :, queries].mean(1)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
        assert torch.all(ours.sum(1) - 1 < 1e-5)
    assert not lm.layers[0].self_attn.q_proj._forward_hooks, "the capture removes its hooks"


def test_scores_need_the_layer_to_have_run(tiny_llava_dir):
    attention = load_llava(tiny_llava_dir).model.language_model.layers[1].self_attn
    with pytest.raises(RuntimeError, match="did not run inside its ProjectionCapture"):
        query_attention_scores(ProjectionCapture(attention, torch.tensor([3])), (None, None),
                               torch.ones(1, 5, dtype=torch.bool))


def test_selection_keeps_top_scores_in_order_per_sample():
    image_mask = torch.zeros(2, 12, dtype=torch.bool)
    image_mask[0, 2:11] = True  # 9 visual tokens
    image_mask[1, 1:10] = True
    scores = torch.rand(2, 12)
    scores[:, 0] = 10.0  # a high-scoring text token is never "selected"
    keep = select_visual_tokens(scores, image_mask, tau=1 / 3)  # 3 of 9
    assert keep.sum(1).tolist() == [3, 3]
    for i in range(2):
        top = scores[i].masked_fill(~image_mask[i], -1).topk(3).indices
        assert set(top.tolist()) == set(keep[i].nonzero().flatten().tolist())
    ties = select_visual_tokens(torch.zeros(2, 12), image_mask, tau=1 / 3)
    assert ties[0].nonzero().flatten().tolist() == [2, 3, 4]


def test_random_scores_are_seeded_and_the_same_for_every_sample():
    image_mask = torch.zeros(2, 10, dtype=torch.bool)
    image_mask[0, 1:7] = True
    image_mask[1, 3:9] = True
    a, b = random_scores(image_mask, seed=3), random_scores(image_mask, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(a[0, 1:7], a[1, 3:9])
    assert not torch.equal(a, random_scores(image_mask, seed=4))
    assert torch.all(a[~image_mask] == 0)


def test_gap_encoder_shape_and_init():
    torch.manual_seed(0)
    encoder = GapEncoder(64)
    assert encoder.fc1.weight.shape == (64, 128) and encoder.fc2.weight.shape == (128, 64)
    bound = math.sqrt(6 / (64 + 128))
    assert encoder.fc1.weight.abs().max() <= bound
    assert encoder.fc1.bias.abs().max() < 0.01 and 0 < encoder.fc2.bias.std() < 0.003
    estimate = encoder(torch.randn(5, 64), torch.randn(5, 64), keep_ratio=1 / 9)
    assert estimate.mu.shape == estimate.log_ratio.shape == (5, 64)


def test_kl_released_and_standard():
    mu, l = torch.randn(6, 8), torch.randn(6, 8) * 0.3
    released = kl_divergence(GapEstimate(mu, l), num_samples=2, sigma0=0.075, variant="released")
    torch.testing.assert_close(released, (0.5 * (-l + l.exp() + mu**2 - 1)).sum() / (2 * 8))
    standard = kl_divergence(GapEstimate(mu, l), num_samples=2, sigma0=0.075, variant="standard")
    posterior = torch.distributions.Normal(mu, (l / 2).exp() * 0.075)
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(standard, torch.distributions.kl_divergence(posterior, prior).sum() / 2)


def test_divico_writes_compressed_tokens_only_at_kept_positions():
    torch.manual_seed(0)
    module = DiViCo(DiViCoConfig(mode="point_estimate", tau=0.5), hidden_size=16).eval()
    hidden = torch.randn(2, 8, 16)
    image_mask = torch.zeros(2, 8, dtype=torch.bool)
    image_mask[0, 2:6] = True
    keep = select_visual_tokens(torch.rand(2, 8), image_mask, tau=0.5)
    out, kl = module(hidden, image_mask, keep)
    assert kl == 0
    assert torch.equal(out[~keep], hidden[~keep])
    dropped = image_mask & ~keep
    pooled = hidden[0][dropped[0]].mean(0)
    selected = hidden[0][keep[0]]
    mu = module.gap_encoder(selected, pooled.expand_as(selected), keep_ratio=0.5).mu
    torch.testing.assert_close(out[0][keep[0]], selected + mu)


@pytest.mark.parametrize("field, value", [("mode", "fast"), ("query", "first"), ("kl", "x"), ("tau", 0.0),
                                          ("tau", 1.2), ("beta", -1.0), ("sigma0", 0.0), ("layer", 0)])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DiViCoConfig(**{field: value}).validate()


def test_config_round_trip_and_unknown_keys():
    config = DiViCoConfig(mode="random", tau=0.25, seed=7)
    assert DiViCoConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="ratio"):
        DiViCoConfig.from_dict({"ratio": 0.1})
