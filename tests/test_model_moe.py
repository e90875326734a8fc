"""The Mixture-of-Experts gap encoder (pipeline/model/moe.py) and the slot it sits in: the
router, the mixed posterior, per-sample rates, one pass per rate, the auxiliary loss, save and
load (format 2, and format 1 files), the supported tau range. On CPU; DIVICO_TEST_DEVICE=cuda
runs them on a GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_helpers import DEVICE, load_llava, prompts_batch, split_samples, training_batch

from pipeline.contract import DIVICO_SETTINGS_FILE
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import DiViCo, GapEncoder, select_visual_tokens
from pipeline.model.moe import MixtureGapEncoder
from pipeline.model.settings import DiViCoConfig, MixtureSettings

CENTRES = MixtureSettings().centres


def moe_config(**changes) -> DiViCoConfig:
    return DiViCoConfig(mode="divico", encoder="moe", kl_per_token=True, **changes)


def tokens(num_samples: int, per_sample: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """selected (T, d), pooled (T, d) repeating each sample's row, sample_index (T,)."""
    generator = torch.Generator().manual_seed(seed)
    sample_index = torch.arange(num_samples).repeat_interleave(per_sample)
    selected = torch.randn(num_samples * per_sample, d, generator=generator)
    pooled = torch.randn(num_samples, d, generator=generator)[sample_index]
    return selected, pooled, sample_index


def test_router_weights_sum_to_one_lead_with_the_nearest_expert_and_follow_tau():
    torch.manual_seed(0)
    encoder = MixtureGapEncoder(16, moe_config())
    selected, pooled, sample_index = tokens(2, 3, 16)
    weights_at = {}
    for tau in [0.05, *CENTRES, 0.25]:
        weights = encoder(selected, pooled, torch.full((6,), tau), sample_index).router_weights
        torch.testing.assert_close(weights.sum(-1), torch.ones(6))
        weights_at[tau] = weights[0]
    for e, centre in enumerate(CENTRES):
        assert int(weights_at[centre].argmax()) == e, (centre, weights_at[centre])
    # The weight on the large-compression expert falls as tau grows, the small one's rises.
    ordered = [weights_at[tau] for tau in sorted(weights_at)]
    assert all(a[0] > b[0] and a[2] < b[2] for a, b in zip(ordered, ordered[1:]))


def test_the_mixed_posterior_is_the_weighted_mean_and_variance_of_the_experts():
    torch.manual_seed(1)
    encoder = MixtureGapEncoder(8, moe_config())
    with torch.no_grad():  # the token summary moves the routing too
        encoder.router[-1].weight.normal_()
    selected, pooled, sample_index = tokens(3, 2, 8)
    rates = torch.tensor([0.06, 0.06, 0.1, 0.1, 0.2, 0.2])
    estimate = encoder(selected, pooled, rates, sample_index)
    experts = [expert(selected, pooled, rates, sample_index) for expert in encoder.experts]
    w = estimate.router_weights
    torch.testing.assert_close(estimate.mu, sum(w[:, e:e + 1] * experts[e].mu for e in range(3)))
    variance = sum(w[:, e:e + 1] * experts[e].log_ratio.exp() for e in range(3))  # in units of sigma0^2
    torch.testing.assert_close(estimate.log_ratio, variance.log())
    # The routing prior: -log of the nearest expert's weight (centres 1/15, 1/9, 1/6 for these rates).
    nearest = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(estimate.aux_losses["routing_prior"], -w.gather(1, nearest[:, None]).log().mean())


def test_one_expert_at_weight_one_is_exactly_that_expert():
    encoder = MixtureGapEncoder(8, moe_config())
    with torch.no_grad():
        encoder.rate_logits.bias.copy_(torch.tensor([0.0, 200.0, 0.0]))
    selected, pooled, sample_index = tokens(2, 2, 8)
    rates = torch.full((4,), 0.1)
    mixed = encoder(selected, pooled, rates, sample_index)
    alone = encoder.experts[1](selected, pooled, rates, sample_index)
    torch.testing.assert_close(mixed.mu, alone.mu, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed.log_ratio, alone.log_ratio, rtol=0, atol=1e-6)


def test_the_routing_prior_trains_the_router_toward_the_nearest_expert():
    """A few dozen Adam steps on the prior alone raise the nearest expert's weight at every centre."""
    torch.manual_seed(2)
    encoder = MixtureGapEncoder(16, moe_config())
    selected, pooled, sample_index = tokens(4, 5, 16)

    def leads() -> list[float]:
        with torch.no_grad():
            return [float(encoder(selected, pooled, torch.full((20,), c), sample_index).router_weights[:, e].mean())
                    for e, c in enumerate(CENTRES)]

    before = leads()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for step in range(40):
        tau = math.exp(math.log(0.05) + (step % 8) / 7 * (math.log(0.25) - math.log(0.05)))
        loss = encoder(selected, pooled, torch.full((20,), tau), sample_index).aux_losses["routing_prior"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = leads()
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)


def test_selection_and_encoder_take_one_rate_per_sample():
    scores = torch.rand(3, 40)
    image_mask = torch.zeros(3, 40, dtype=torch.bool)
    image_mask[:, 5:35] = True  # 30 visual tokens each
    kept = select_visual_tokens(scores, image_mask, torch.tensor([1 / 15, 1 / 9, 1 / 6])).sum(1)
    assert kept.tolist() == [2, 3, 5]
    for i, tau in enumerate([1 / 15, 1 / 9, 1 / 6]):  # the same slots as that sample alone
        alone = select_visual_tokens(scores[i:i + 1], image_mask[i:i + 1], tau)
        assert torch.equal(alone[0], select_visual_tokens(scores, image_mask, torch.tensor([1 / 15, 1 / 9, 1 / 6]))[i])

    seen = {}

    class Recorder(GapEncoder):
        def forward(self, selected, pooled, keep_ratio, sample_index):
            seen.update(keep_ratio=keep_ratio, sample_index=sample_index)
            return super().forward(selected, pooled, keep_ratio, sample_index)

    module = DiViCo(DiViCoConfig(mode="divico"), hidden_size=8)
    module.gap_encoder = Recorder(8, module.config)
    keep = select_visual_tokens(scores, image_mask, torch.tensor([0.1, 0.2, 0.3]))
    module(torch.randn(3, 40, 8), image_mask, keep, torch.tensor([0.1, 0.2, 0.3]))
    assert seen["sample_index"].tolist() == [0] * 3 + [1] * 6 + [2] * 9
    torch.testing.assert_close(seen["keep_ratio"], torch.tensor([0.1] * 3 + [0.2] * 6 + [0.3] * 9))


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_llava(tiny_llava_dir)


@pytest.fixture()
def moe_model(llava) -> CompressedLlava:
    torch.manual_seed(3)
    model = CompressedLlava(llava, moe_config()).eval()
    with torch.no_grad():  # a router that also reads the tokens, as after training
        model.divico.gap_encoder.router[-1].weight.normal_(std=0.5)
    return model


def test_a_batch_mixing_rates_equals_its_samples_run_one_by_one(moe_model, processor, llava):
    batch = prompts_batch(processor, [True, True, True])
    rates = torch.tensor([0.06, 0.2, 0.12], device=DEVICE)
    with torch.no_grad():
        mixed = moe_model(**batch, keep_ratio=rates, logits_to_keep=1).logits[:, -1]
        for i, sample in enumerate(split_samples(batch, llava.config.image_token_id)):
            alone = moe_model(**sample, keep_ratio=float(rates[i]), logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        # and the rate matters: the same samples at one rate give other logits
        assert not torch.allclose(moe_model(**batch, keep_ratio=0.06, logits_to_keep=1).logits[:, -1], mixed)


def test_one_pass_per_rate_equals_the_rates_run_apart(moe_model, processor):
    """branch_rates: layers < K once, layers >= K once per rate; the same logits and (equal
    targets per rate) the mean of the per-rate losses."""
    batch = training_batch(processor, [True, False, True])
    rates = (1 / 15, 1 / 9, 1 / 6)
    with torch.no_grad():
        branched = moe_model(**batch, branch_rates=rates)
        apart = [moe_model(**batch, keep_ratio=rate) for rate in rates]
    size = batch["input_ids"].shape[0]
    for r, out in enumerate(apart):
        length = out.logits.shape[1]
        rows = branched.logits[r * size:(r + 1) * size]
        torch.testing.assert_close(rows[:, -length:][out.compressed_attention_mask],
                                   out.logits[out.compressed_attention_mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(branched.lm_loss, sum(out.lm_loss for out in apart) / 3, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="branch_rates"):
        moe_model(**batch, branch_rates=rates, keep_ratio=0.1)


def test_the_loss_adds_the_weighted_auxiliary_loss(moe_model, processor):
    batch = training_batch(processor, [True, True])
    with torch.no_grad():
        default = moe_model(**batch, keep_ratio=0.09)
        heavier = moe_model(**batch, keep_ratio=0.09, aux_weights={"routing_prior": 2.0})
    prior = default.aux_losses["routing_prior"]
    assert prior > 0
    torch.testing.assert_close(default.loss, default.lm_loss + 0.02 * default.kl + 0.1 * prior)
    torch.testing.assert_close(heavier.loss, default.lm_loss + 0.02 * default.kl + 2.0 * prior)
    rates, weights = default.routing
    assert weights.shape == (rates.shape[0], 3) and torch.all(rates == torch.tensor(0.09))


def test_save_and_load_round_trip_and_the_range(moe_model, llava, processor, tmp_path):
    moe_model.save_divico(tmp_path)
    saved = json.loads((tmp_path / DIVICO_SETTINGS_FILE).read_text())
    assert saved["format_version"] == 2
    assert saved["config"]["encoder"] == "moe" and saved["config"]["moe"]["centres"] == CENTRES
    loaded = CompressedLlava.from_saved(llava, tmp_path, tau=0.08).eval()
    assert isinstance(loaded.divico.gap_encoder, MixtureGapEncoder) and loaded.config.kl_per_token
    batch = prompts_batch(processor, [True, True])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, moe_model(**batch, keep_ratio=0.08).logits, rtol=0, atol=0)
    for tau in (0.3, 0.04):
        with pytest.raises(ValueError, match=r"tau=.*outside the rates this mixture-of-experts model is trained "
                                             r"for, moe.tau_range=\[0.05, 0.25\]"):
            CompressedLlava.from_saved(llava, tmp_path, tau=tau)


def test_a_format_1_file_still_loads(llava, processor, tmp_path):
    """Format 1 (before the encoder settings) means the released single encoder, KL summed."""
    torch.manual_seed(4)
    model = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9)).eval()
    model.save_divico(tmp_path)
    settings = json.loads((tmp_path / DIVICO_SETTINGS_FILE).read_text())
    format_1 = {"format_version": 1, "hidden_size": settings["hidden_size"],
                "config": {"mode": "divico", "tau": 1 / 9, "layer": 2, "beta": 0.02, "query": "first_answer",
                           "sigma0": 0.075, "kl": "released", "init": "released", "encoder": "mlp", "seed": 0}}
    (tmp_path / DIVICO_SETTINGS_FILE).write_text(json.dumps(format_1))
    loaded = CompressedLlava.from_saved(llava, tmp_path).eval()
    assert loaded.config == DiViCoConfig(mode="divico", tau=1 / 9)
    batch = prompts_batch(processor, [True])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    (tmp_path / DIVICO_SETTINGS_FILE).write_text(json.dumps({**format_1, "format_version": 3}))
    with pytest.raises(ValueError, match=r"format_version 3, this code reads \(1, 2\)"):
        CompressedLlava.from_saved(llava, tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"tau_range": [0.2, 0.1]}, "tau_range"), ({"centres": [0.1, 0.05, 0.2]}, "ascending"),
    ({"centres": [0.01, 0.1]}, "outside tau_range"), ({"router_hidden": 0}, "router_hidden"),
    ({"prior_weight": -1.0}, "prior_weight")])
def test_bad_mixture_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        DiViCoConfig(encoder="moe", moe=MixtureSettings(**changes)).validate()
    with pytest.raises(ValueError, match="unknown DiViCo moe settings"):
        DiViCoConfig.from_dict({"encoder": "moe", "moe": {"experts": 3}})
