"""The compression baselines that act before the decoder (pipeline/model/baselines/): the [CLS]
row against the tower's own attention weights, FasterVLM's and VisionZip's choices and merges on
hand-made inputs, and a run through `divico eval`. Batch-vs-single equality, cached generation
and the FLOP count run for every registered mode in test_model_compressed.py and test_model_flops.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_divico
from model_helpers import image, load_llava, prompts_batch, split_samples
from transformers import AutoProcessor

from pipeline.contract import DIVICO_SETTINGS_FILE, TRAIN_SUMMARY_FILE
from pipeline.model.baselines.deco import DeCo
from pipeline.model.baselines.fastervlm import FasterVLM
from pipeline.model.baselines.visionzip import VisionZip, contextual_count, merge_contextual
from pipeline.model.vision import ImageTokens, image_tokens

REPO = Path(__file__).resolve().parents[1]


def hand_made(cls_logits: list[float], features: torch.Tensor, metric: torch.Tensor | None = None) -> ImageTokens:
    """One head of width 1 whose [CLS] attention logits over ([CLS], patches...) are `cls_logits`."""
    keys = torch.tensor(cls_logits)[None, :, None]
    if metric is not None:  # more key dimensions: the merge metric; the first stays the logit
        keys = torch.cat([keys, torch.cat([torch.zeros(1, metric.shape[-1]), metric])[None]], dim=-1)
    query = torch.zeros(1, keys.shape[-1])
    query[0, 0] = 1.0
    return ImageTokens(features=features[None], query=query, keys=keys, heads=1, scale=1.0)


def test_the_cls_row_equals_the_towers_attention_weights(tiny_llava_dir):
    llava = load_llava(tiny_llava_dir, "eager")
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True, True])
    tokens = image_tokens(llava, batch["pixel_values"])
    outputs = llava.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    expected = outputs.attentions[llava.config.vision_feature_layer][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(tokens.cls_attention(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tokens.features, outputs.hidden_states[llava.config.vision_feature_layer][:, 1:])


def test_fastervlm_keeps_the_patches_cls_attends_to_most():
    tokens = hand_made([0.0, 1.0, 5.0, 2.0, 4.0, 3.0, 0.5], torch.arange(6.0)[:, None])
    keep, features = FasterVLM().compress_images(tokens, torch.tensor([0.5]))
    assert keep[0].nonzero().flatten().tolist() == [1, 3, 4]  # logits 5, 4, 3: round(0.5 x 6) = 3 kept
    assert torch.equal(features, tokens.features)  # nothing merged


def test_visionzip_merges_the_rest_into_contextual_tokens():
    assert [contextual_count(k) for k in (1, 2, 11, 38, 64, 96)] == [0, 0, 2, 6, 10, 15]
    features = torch.tensor([[0.0], [10.0], [1.0], [2.0], [3.0], [100.0], [4.0], [5.0]])
    # Metric: patches 0, 2, 4 point one way, 3, 6, 7 the other; 1 and 5 are the dominant ones.
    metric = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 0.2], [1, 1], [0.2, 1], [0, 1]])
    tokens = hand_made([0.0, 0, 9, 0, 0, 0, 8, 0, 0], features, metric)
    # 8 patches at tau 1/2: 4 kept, 1 contextual (round(4 x 10/64) = 1): 3 dominant by [CLS]
    # attention (patches 1, 5, then 0 on the tie), the 5 others merged into 1 token.
    keep, merged = VisionZip().compress_images(tokens, torch.tensor([0.5]))
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2, 5]
    remaining = torch.tensor([2, 3, 4, 6, 7])
    assert merged[0, 2, 0] == pytest.approx(float(features[remaining].mean()))  # one target: all merge into it
    # Two targets at step 2 of the 5 remaining: patches 2 and 4; 3, 6 and 7 join the nearer in cosine.
    targets, two = merge_contextual(features[:, 0:1].clone(), metric, remaining, 2)
    assert targets.tolist() == [2, 4]
    normed = torch.nn.functional.normalize(metric, dim=-1)
    nearest = {int(p): int(targets[(normed[p] @ normed[targets].T).argmax()]) for p in (3, 6, 7)}
    for target in (2, 4):
        members = [target] + [p for p, t in nearest.items() if t == target]
        assert two[target, 0] == pytest.approx(float(features[members].mean())), (target, members)
    assert torch.equal(two[[0, 1, 3, 5, 6, 7]], features[[0, 1, 3, 5, 6, 7]])  # only targets change


@pytest.mark.parametrize("mode", ["fastervlm", "visionzip", "recoverable_budget", "recoverable"])
def test_a_baseline_runs_under_divico_eval(tiny_llava_dir, tmp_path, mode):
    """Recoverable Compression as published reports the count it kept, measured."""
    data = tmp_path / "eval.json"
    images = tmp_path / "images"
    images.mkdir()
    image(0).save(images / "a.png")
    data.write_text(json.dumps([{"id": "q", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}]}]))
    out = tmp_path / "summary.json"
    assert run_divico(["eval", f"model={tiny_llava_dir}", f"data={data}", f"image_root={images}", "max_new_tokens=2",
                "device=cpu", f"divico.mode={mode}", "divico.tau=0.111", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert (summary["mode"], summary["samples"]) == (mode, 1)
    if mode == "recoverable":
        assert 0 < summary["visual_tokens_kept"] < 100 and summary["visual_tokens_kept"] != 11
    else:
        assert summary["visual_tokens_kept"] == 11


def test_deco_pools_the_patch_grid_into_the_first_slots():
    assert [DeCo().kept_tokens(576, tau) for tau in (1 / 15, 1 / 9, 1 / 6)] == [36, 64, 100]
    features = torch.arange(16.0).reshape(16, 1)  # a 4 x 4 grid, raster order
    tokens = hand_made([0.0] * 17, features)
    keep, pooled = DeCo().compress_images(tokens, torch.tensor([0.25]))  # 4 kept: a 2 x 2 grid of 2 x 2 means
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert pooled[0, :4, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def two_rank_fine_tune(model: Path, shards: Path, out: Path, method: str) -> dict:
    """`divico train` on 2 ranks with configs/methods/METHOD.yaml over the tiny recipe: its summary."""
    from train_helpers import run, train_args

    result = run(train_args(model, shards, out, "train.micro_batch_size=2",
                            recipes=(REPO / f"configs/methods/{method}.yaml",)), ranks=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / TRAIN_SUMMARY_FILE).read_text())


def test_deco_trains_on_two_ranks(tiny_llava_dir, make_shard_dir, tmp_path):
    """A trained mode: the LoRA fine-tune with DeCo retrains the projector on the pooled tokens."""
    from train_helpers import final_weights

    out = tmp_path / "deco"
    summary = two_rank_fine_tune(tiny_llava_dir, make_shard_dir(16, 1), out, "deco")
    assert summary["steps"] == 2 and math.isfinite(summary["train/loss"])
    assert summary["perf/visual_tokens_kept"] == 9  # 11 of 100 -> DeCo's 3 x 3 grid
    assert any("multi_modal_projector" in name for name in final_weights(out))  # the projector trains
    saved = json.loads(next(out.rglob(DIVICO_SETTINGS_FILE)).read_text())
    assert saved["config"]["mode"] == "deco"


def test_dart_keeps_the_pivots_and_the_tokens_least_like_them():
    from pipeline.model.baselines.dart import dart_keep

    visual = torch.zeros(10, dtype=torch.bool)
    visual[1:7] = True
    text_after = torch.zeros(10, dtype=torch.bool)
    text_after[7:] = True
    norms = torch.tensor([9.0, 5, 1, 4, 3, 6, 0.5, 2, 2, 2])  # position 0 (text before the image) never counts
    keys = torch.stack([norms, torch.zeros(10)], dim=1)
    hidden = torch.tensor([[0, 1.0], [1, 0], [1, 0.1], [0, 1], [0, 1], [0, 1], [-1, 0], [0, 1], [0, 1], [0, 1]])
    # Image pivots by key L1 norm: 5, 1, 3, 4; the first pivot in position order (1) adds the free
    # visual token least like it: 6 (opposite) rather than 2 (nearly the same direction).
    assert dart_keep(keys, hidden, visual, text_after, kept=5).tolist() == [1, 3, 4, 5, 6]
    assert dart_keep(keys, hidden, visual, text_after, kept=2).tolist() == [1, 5]  # the pivots alone
    assert dart_keep(keys, hidden, visual, text_after, kept=6).tolist() == [1, 2, 3, 4, 5, 6]


def test_the_gap_encoder_over_darts_selection_trains_on_two_ranks(tiny_llava_dir, make_shard_dir, tmp_path):
    from train_helpers import scalars

    out = tmp_path / "divico_dart"
    summary = two_rank_fine_tune(tiny_llava_dir, make_shard_dir(16, 1), out, "divico_dart")
    assert summary["steps"] == 2 and summary["perf/visual_tokens_kept"] == 11
    assert all(kl > 0 for kl in scalars(out)["train/kl"])  # the gap encoder and its KL train


def test_divico_over_mustdrop_trains_on_two_ranks(tiny_llava_dir, make_shard_dir, tmp_path):
    """The gap encoder at MustDrop's filter: round(tau N) tokens kept there, its KL trains."""
    from train_helpers import scalars

    out = tmp_path / "divico_mustdrop"
    summary = two_rank_fine_tune(tiny_llava_dir, make_shard_dir(16, 1), out, "divico_mustdrop")
    assert summary["steps"] == 2 and summary["perf/visual_tokens_kept"] == 11
    assert all(kl > 0 for kl in scalars(out)["train/kl"])


def test_pyramiddrop_drops_in_stages_and_decodes_through_them(tiny_llava_dir):
    """Layer 1 keeps half the visual tokens, layers 2-3 a quarter (stages at K = 1 and L/2 = 2 of 4
    layers); batched, alone, cached and recomputed agree; the analytic FLOPs are torch's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model.compressed_llava import CompressedLlava
    from pipeline.model.flops import DecoderGeometry, layer_lengths, prefill_flops
    from pipeline.model.settings import DiViCoConfig
    from transformers import DynamicCache

    llava = load_llava(tiny_llava_dir, "eager")
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True, False, True])
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="pdrop", tau=0.5, layer=1))
    cache = DynamicCache(config=wrapper.decoder.config)
    with torch.no_grad():
        out = wrapper(**batch, past_key_values=cache, logits_to_keep=1)
    width = batch["input_ids"].shape[1]
    assert [first for first, _ in out.cache_groups] == [0, 1, 2]
    assert [cache.get_seq_length(layer) for layer in range(4)] == [width, width - 50, width - 75, width - 75]
    image_id = llava.config.image_token_id
    for i in (0, 2):  # 25 of the 100 visual tokens reach layers 2 and 3
        kept = out.compressed_positions[i][out.compressed_attention_mask[i]]
        assert int((batch["input_ids"][i][kept] == image_id).sum()) == 25
    cached = wrapper.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(cached, wrapper.generate(**batch, max_new_tokens=4, eos_token_id=[], use_cache=False))
    for i, sample in enumerate(split_samples(batch, image_id)):
        alone = wrapper.generate(**sample, max_new_tokens=4, eos_token_id=[])
        assert torch.equal(alone[0, sample["input_ids"].shape[1]:], cached[i, width:])

    visual = torch.full((100,), image_id)
    input_ids = torch.cat([torch.arange(10, 22), visual, torch.arange(30, 50)])[None]
    features = torch.randn(1, 100, llava.config.text_config.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrapper(input_ids, image_features=features, logits_to_keep=1)
    analytic = prefill_flops(DecoderGeometry.from_config(llava.config.text_config), input_ids.shape[1], 100,
                             wrapper.config)
    assert analytic["total"] == counter.get_total_flops()
    first, second = input_ids.shape[1], input_ids.shape[1] - 50  # the sequences each stage ranks
    assert layer_lengths(4, first, 100, wrapper.config) == [first, second, second - 25, second - 25]
    assert analytic["scoring"] == 2 * llava.config.text_config.hidden_size * (first + second)


def test_pyramiddrop_trains_on_two_ranks(tiny_llava_dir, make_shard_dir, tmp_path):
    summary = two_rank_fine_tune(tiny_llava_dir, make_shard_dir(16, 1), tmp_path / "pdrop", "pdrop_trained")
    assert summary["steps"] == 2 and math.isfinite(summary["train/loss"])


def local_outlier_count(scores: torch.Tensor, neighbours: int) -> int:
    """Breunig et al.'s local outlier factor by its definition, for 1-D scores without ties:
    how many exceed scikit-learn's 'auto' threshold of 1.5."""
    x = scores.double()
    k = min(neighbours, len(x) - 1)
    distance = (x[:, None] - x[None]).abs().fill_diagonal_(float("inf"))
    sorted_distance, neighbour = distance.sort(dim=1)
    k_distance = sorted_distance[:, k - 1]
    reach = torch.maximum(k_distance[neighbour[:, :k]], sorted_distance[:, :k])
    density = 1 / (reach.mean(1) + 1e-10)
    factor = density[neighbour[:, :k]].mean(1) / density
    return int((factor > 1.5).sum())


def test_recoverable_counts_follow_the_local_outlier_factor():
    """As published: the visual filter keeps its outliers, text recovery floor((N - n_v) c_t / N)
    of the rest, step 3 a centre per outlier of what is left, plus one extra token."""
    from pipeline.model.baselines.recoverable import recover

    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(60, generator=generator) * 0.01
    attention[[3, 20, 41]] = torch.tensor([0.2, 0.15, 0.3])
    text = torch.rand(60, generator=generator) * 0.01
    text[[7, 8, 9, 50, 51]] = torch.tensor([0.5, 0.6, 0.7, 0.55, 0.65])
    keys, features = torch.randn(60, 4, generator=generator), torch.randn(60, 3, generator=generator)
    keep, merged = recover(attention, text, keys, features, budget=None)

    visual = local_outlier_count(attention, 20)
    assert visual == 3 and bool(keep[[3, 20, 41]].all())
    filtered = text.clone()
    filtered[[3, 20, 41]] = text.min()
    flagged = local_outlier_count(filtered, 20)
    recovered = (60 - visual) * flagged // 60
    assert (flagged, recovered) == (5, 4)  # 5 flagged, floor(57 x 5 / 60) = 4 kept: the 4 highest
    assert bool(keep[[8, 9, 50, 51]].all()) and not keep[7]
    rest = torch.tensor([i for i in range(60) if i not in (3, 20, 41, 8, 9, 50, 51)])
    centres = local_outlier_count(attention[rest], 10)
    assert int(keep.sum()) == visual + recovered + centres + 1
    assert torch.equal(merged[[3, 20, 41, 8, 9, 50, 51]], features[[3, 20, 41, 8, 9, 50, 51]])


def test_recoverable_merge_absorbs_the_nearest_by_key_and_text():
    from pipeline.model.baselines.recoverable import CLUSTER_SIZE, TEXT_WEIGHT, absorb

    # Patch 0 is the centre; 1-32 turn away from its key a little more each, 33-39 are orthogonal,
    # but 39's text score (x TEXT_WEIGHT) outweighs any key cosine: it joins, and 32 drops out.
    keys = torch.zeros(40, 2)
    keys[:33, 0] = 1.0
    keys[:33, 1] = torch.arange(33) * 0.01
    keys[33:, 1] = 1.0
    text = torch.zeros(40)
    text[39] = 2.0 / TEXT_WEIGHT
    attention = torch.linspace(0.5, 0.01, 40)
    features = torch.randn(40, 3)
    merged = absorb(torch.tensor([0]), torch.arange(40), attention, text, keys, features)
    members = [39, *range(1, CLUSTER_SIZE)]
    expected = features[0] + (attention[members, None] * features[members]).sum(0)
    torch.testing.assert_close(merged[0], expected)


def test_recoverable_at_a_budget_keeps_round_tau_n():
    from pipeline.model.baselines.recoverable import recover

    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(60, generator=generator) * 0.01
    attention[[3, 20, 41]] = torch.tensor([0.2, 0.15, 0.3])
    text = torch.randperm(60, generator=generator) / 60  # evenly spread: no outlier
    keys, features = torch.randn(60, 4, generator=generator), torch.randn(60, 3, generator=generator)
    assert local_outlier_count(attention, 20) == 3
    for budget in (1, 2, 3, 7, 20):
        keep, merged = recover(attention, text, keys, features, budget=budget)
        assert int(keep.sum()) == budget
        assert bool(keep[[41, 3, 20][:budget]].all())  # the visual filter first, highest attention first
    # At 5: the 3 visual outliers, no text outlier (uniform scores), then 1 centre (the highest
    # [CLS] attention left) and the extra token in the place of the next, summing all the others.
    filtered = text.clone()
    filtered[[3, 20, 41]] = text.min()
    assert local_outlier_count(filtered, 20) == 0
    keep, merged = recover(attention, text, keys, features, budget=5)
    rest = torch.tensor([i for i in range(60) if i not in (3, 20, 41)])
    centre, extra = rest[attention[rest].argsort(descending=True)[:2]].tolist()
    assert keep.nonzero().flatten().tolist() == sorted([3, 20, 41, centre, extra])
    others = rest[rest != centre]
    torch.testing.assert_close(merged[extra], (attention[others, None] * features[others]).sum(0))
    # The dynamic count has no fixed number: the analytic FLOPs need the measured one.
    with pytest.raises(ValueError, match="decides per image"):
        from pipeline.model.flops import DecoderGeometry, prefill_flops
        from pipeline.model.settings import DiViCoConfig

        prefill_flops(DecoderGeometry(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=10), 20, 10,
                      DiViCoConfig(mode="recoverable"))


def test_prumerges_cls_row_reads_the_layer_after_the_features(tiny_llava_dir):
    """One head over the whole width of the next layer's q/k (the official hooks on layer 23),
    computed from that layer's own input: the feature layer's output."""
    llava = load_llava(tiny_llava_dir, "sdpa")
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True])
    tokens = image_tokens(llava, batch["pixel_values"], attention_after_features=True)
    tower = llava.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[llava.config.vision_feature_layer]
    after = layers[len(layers) + llava.config.vision_feature_layer + 1]
    normed = after.layer_norm1(hidden)
    query, keys = after.self_attn.q_proj(normed)[:, :1], after.self_attn.k_proj(normed)
    expected = (query @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5).softmax(-1)[:, 0, 1:]
    torch.testing.assert_close(tokens.cls_attention(heads=1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tokens.features, hidden[:, 1:])


def test_the_question_is_the_text_between_the_image_and_the_query():
    from pipeline.model.compressed_llava import question_vectors

    embeddings = torch.arange(8.0)[None, :, None].expand(2, 8, 2)
    image_mask = torch.zeros(2, 8, dtype=torch.bool)
    image_mask[:, 2:4] = True
    attention_mask = torch.ones(2, 8, dtype=torch.bool)
    attention_mask[1, :1] = False
    vectors = question_vectors(embeddings, image_mask, attention_mask, torch.tensor([6, 4]))
    assert vectors[:, 0].tolist() == [5.0, 4.0]  # mean of positions 4-6; position 4 alone
