"""The DiViCo module: token counts, selection scores (from captured projections, under sdpa
and eager) against eager attention weights, selection, random draws, gap encoder init and
numerics (v_p, sigma, health stats, a parameter-free encoder in the slot), KL, config
validation."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import DEVICE, load_llava
from torch import nn

from pipeline.model.divico import (
    DiViCo,
    GapEncoder,
    GapEstimate,
    ProjectionCapture,
    image_seed,
    kept_count,
    kl_divergence,
    mean_of_dropped,
    query_attention_scores,
    random_scores,
    select_visual_tokens,
)
from pipeline.model.settings import GAP_ENCODERS, DiViCoConfig


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


def test_random_scores_are_drawn_per_image():
    image_mask = torch.zeros(3, 10, dtype=torch.bool)
    image_mask[0, 1:7] = True
    image_mask[1, 3:9] = True  # sample 1 holds the same image as sample 0, elsewhere in its row
    image_mask[2, 2:8] = True
    images = [torch.rand(2, 3), torch.rand(2, 3)]
    seeds = [image_seed(5, images[0]), image_seed(5, images[0].clone()), image_seed(5, images[1])]
    assert seeds[0] == seeds[1] != seeds[2]
    assert image_seed(6, images[0]) != seeds[0], "the config seed changes the draw"
    scores = random_scores(image_mask, seeds)
    assert torch.equal(scores[0, 1:7], scores[1, 3:9]), "the same image draws the same"
    assert not torch.equal(scores[0, 1:7], scores[2, 2:8]), "another image draws differently"
    assert torch.all(scores[~image_mask] == 0)
    # Batch-invariant: a sample draws the same alone, at another row, or beside other samples.
    alone = random_scores(image_mask[2:], seeds[2:])
    torch.testing.assert_close(alone[0], scores[2], atol=0, rtol=0)
    swapped = random_scores(image_mask[[2, 0]], [seeds[2], seeds[0]])
    torch.testing.assert_close(swapped, scores[[2, 0]], atol=0, rtol=0)


def test_random_mode_needs_seeds():
    module = DiViCo(DiViCoConfig(mode="random"), hidden_size=8)
    with pytest.raises(ValueError, match="sample_seeds"):
        module.select(None, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("init", ["released", "zero"])
def test_gap_encoder_init(init):
    """Xavier-uniform weights: each layer spans its bound, with the uniform's std of
    bound / sqrt(3) (PyTorch's default init has a smaller bound, 1 / sqrt(fan_in)); biases
    truncated normal with std 0.001. init=zero zeroes exactly the mu half of fc2."""
    torch.manual_seed(0)
    d = 256
    encoder = GapEncoder(d, DiViCoConfig(init=init))
    assert encoder.fc1.weight.shape == (d, 2 * d) and encoder.fc2.weight.shape == (2 * d, d)
    bound = math.sqrt(6 / (d + 2 * d))  # fan_in + fan_out, the same for both layers
    fc2_weight, fc2_bias = encoder.fc2.weight, encoder.fc2.bias
    if init == "zero":
        assert torch.all(fc2_weight[:d] == 0) and torch.all(fc2_bias[:d] == 0)
        fc2_weight, fc2_bias = fc2_weight[d:], fc2_bias[d:]  # the log-ratio half keeps the released init
    for weight in (encoder.fc1.weight, fc2_weight):
        assert 0.99 * bound < weight.abs().max() <= bound
        assert abs(weight.std() / (bound / math.sqrt(3)) - 1) < 0.02
    for bias in (encoder.fc1.bias, fc2_bias):
        assert abs(bias.std() / 0.001 - 1) < 0.15 and bias.abs().max() < 0.01
    estimate = encoder(torch.randn(5, d), torch.randn(5, d), torch.full((5,), 1 / 9), torch.zeros(5, dtype=torch.long))
    assert estimate.mu.shape == estimate.log_ratio.shape == (5, d)
    assert bool(torch.all(estimate.mu == 0)) == (init == "zero")


def test_v_p_is_averaged_in_fp32():
    """bf16 tokens whose mean needs more than bf16's 8 significant bits: v_p is that mean
    in fp32 (a bf16 average would be off by up to 2**-9 relative)."""
    hidden = (1 + torch.arange(12, dtype=torch.float64).reshape(1, 12, 1) * 2**-7).expand(1, 12, 3)
    hidden = hidden.to(torch.bfloat16)
    dropped = torch.zeros(1, 12, dtype=torch.bool)
    dropped[0, [1, 2, 4]] = True  # mean 1 + 7/3 * 2**-7
    pooled = mean_of_dropped(hidden, dropped)
    assert pooled.dtype == torch.float32
    expected = hidden[0, [1, 2, 4]].double().mean(0, keepdim=True)
    torch.testing.assert_close(pooled.double(), expected, atol=1e-7, rtol=0)
    assert not torch.allclose(expected.to(torch.bfloat16).double(), expected, atol=1e-7, rtol=0)
    assert torch.all(mean_of_dropped(hidden, torch.zeros_like(dropped)) == 0), "nothing dropped: zero"


class FixedGap(nn.Module):
    """A gap encoder without parameters: the same (mu, l) rows for every sample."""

    def __init__(self, mu: torch.Tensor, log_ratio: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.log_ratio = mu, log_ratio

    def forward(self, selected: torch.Tensor, pooled: torch.Tensor, keep_ratio: torch.Tensor,
                sample_index: torch.Tensor) -> GapEstimate:
        return GapEstimate(self.mu.to(selected.dtype), self.log_ratio.to(selected.dtype))


def _two_kept_tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample, d = 4: visual tokens at 1..4, of which 1 and 3 are kept; ||v_s|| = 10 and 5."""
    hidden = torch.randn(1, 6, 4)
    hidden[0, 1] = torch.tensor([6.0, 8.0, 0.0, 0.0])
    hidden[0, 3] = torch.tensor([0.0, 0.0, 3.0, 4.0])
    image_mask = torch.zeros(1, 6, dtype=torch.bool)
    image_mask[0, 1:5] = True
    keep = torch.zeros_like(image_mask)
    keep[0, [1, 3]] = True
    return hidden, image_mask, keep


def test_parameter_free_encoder_in_the_slot_and_sigma():
    """Training samples v_s + mu + eps * sigma with sigma = sigma0 * exp(l / 2); eval gives
    v_s + mu; the slot takes an encoder without parameters (it computes in the decoder's dtype)."""
    hidden, image_mask, keep = _two_kept_tokens()
    mu = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    log_ratio = torch.tensor([[0.0, 2 * math.log(2), -2.0, 1.0], [4.0, 0.0, 0.0, -1.0]])
    module = DiViCo(DiViCoConfig(mode="divico", tau=0.5, sigma0=0.1), hidden_size=4)
    module.gap_encoder = FixedGap(mu, log_ratio)
    torch.manual_seed(3)
    sampled = module.train()(hidden, image_mask, keep).hidden
    torch.manual_seed(3)
    eps = torch.randn(2, 4)
    sigma = 0.1 * torch.tensor([[1.0, 2.0, math.exp(-1), math.exp(0.5)], [math.exp(2), 1.0, 1.0, math.exp(-0.5)]])
    torch.testing.assert_close(sampled[0, [1, 3]], hidden[0, [1, 3]] + mu + eps * sigma)
    evaluated = module.eval()(hidden, image_mask, keep).hidden
    torch.testing.assert_close(evaluated[0, [1, 3]], hidden[0, [1, 3]] + mu, atol=0, rtol=0)
    assert torch.equal(evaluated[~keep], hidden[~keep])


class HalfToken(nn.Module):
    """A registered encoder (one line in GAP_ENCODERS): mu = -v_s / 2, sigma = sigma0."""

    def __init__(self, hidden_size: int, config: DiViCoConfig) -> None:
        super().__init__()

    def forward(self, selected: torch.Tensor, pooled: torch.Tensor, keep_ratio: torch.Tensor,
                sample_index: torch.Tensor) -> GapEstimate:
        return GapEstimate(-selected / 2, torch.zeros_like(selected))


def test_a_registered_encoder_is_built_by_name(monkeypatch):
    monkeypatch.setitem(GAP_ENCODERS, "half", f"{__name__}:HalfToken")
    module = DiViCo(DiViCoConfig(mode="divico", tau=0.5, encoder="half"), hidden_size=4)
    assert isinstance(module.gap_encoder, HalfToken)
    hidden, image_mask, keep = _two_kept_tokens()
    torch.testing.assert_close(module.eval()(hidden, image_mask, keep).hidden[0, [1, 3]], hidden[0, [1, 3]] / 2)
    assert isinstance(DiViCo(DiViCoConfig(mode="divico"), hidden_size=4).gap_encoder, GapEncoder)
    with pytest.raises(ValueError, match=r"encoder='mixture': expected one of \('mlp', 'moe', 'half'\)"):
        DiViCoConfig(encoder="mixture").validate()


@pytest.mark.parametrize("mode", ["divico", "point_estimate"])
def test_gap_stats_by_hand(mode):
    hidden, image_mask, keep = _two_kept_tokens()
    mu = torch.tensor([[3.0, 4.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]])  # ||mu|| = 5: ratios 0.5 and 1
    log_ratio = torch.zeros(2, 4)
    log_ratio[1] = 2 * math.log(3)  # sigma = sigma0 on the first kept token, 3 * sigma0 on the second
    module = DiViCo(DiViCoConfig(mode=mode, tau=0.5, sigma0=0.1), hidden_size=4)
    module.gap_encoder = FixedGap(mu, log_ratio.requires_grad_())
    stats = module.train()(hidden, image_mask, keep).gap_stats
    assert sorted(stats) == ["mu_over_vs", "sigma"]
    torch.testing.assert_close(stats["mu_over_vs"], torch.tensor(0.75))
    torch.testing.assert_close(stats["sigma"], torch.tensor(0.2))
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert DiViCo(DiViCoConfig(mode="select_only"), hidden_size=4)(hidden, image_mask, keep).gap_stats is None


def test_kl_released_and_standard():
    mu, l = torch.randn(6, 8), torch.randn(6, 8) * 0.3
    released = kl_divergence(GapEstimate(mu, l), count=2, sigma0=0.075, variant="released")
    torch.testing.assert_close(released, (0.5 * (-l + l.exp() + mu**2 - 1)).sum() / (2 * 8))
    standard = kl_divergence(GapEstimate(mu, l), count=2, sigma0=0.075, variant="standard")
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
    out, kl = module(hidden, image_mask, keep)[:2]
    assert kl == 0
    assert torch.equal(out[~keep], hidden[~keep])
    dropped = image_mask & ~keep
    pooled = hidden[0][dropped[0]].mean(0)
    selected = hidden[0][keep[0]]
    tokens = selected.shape[0]
    mu = module.gap_encoder(selected, pooled.expand_as(selected), torch.full((tokens,), 0.5),
                            torch.zeros(tokens, dtype=torch.long)).mu
    torch.testing.assert_close(out[0][keep[0]], selected + mu)


@pytest.mark.parametrize("field, value", [("mode", "fast"), ("query", "first"), ("kl", "x"), ("init", "xavier"), ("tau", 0.0),
                                          ("tau", 1.2), ("beta", -1.0), ("sigma0", 0.0), ("layer", 0)])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DiViCoConfig(**{field: value}).validate()


def test_config_round_trip_and_unknown_keys():
    config = DiViCoConfig(mode="random", tau=0.25, seed=7)
    assert DiViCoConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="ratio"):
        DiViCoConfig.from_dict({"ratio": 0.1})
