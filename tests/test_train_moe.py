"""The Mixture-of-Experts stage through `divico train` on the tiny LLaVA, on CPU: 2 ZeRO-2 ranks
through the deepspeed launcher drawing the same rate each step, TensorBoard's routing scalars,
kill + resume, export and eval at any rate in the range (and a clear error outside it), the
all_centres schedule, and the warm start from specialists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import load_llava, prompts_batch
from train_helpers import (
    REPO,
    final_weights,
    preempt_after_first_checkpoint,
    run,
    sample_log,
    sample_log_rows,
    scalars,
    train_args,
)
from safetensors.torch import save_file
from transformers import AutoProcessor

from pipeline.contract import DIVICO_WEIGHTS_FILE
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.divico import DiViCo
from pipeline.model.settings import DiViCoConfig, MixtureSettings
from pipeline.train.build import warm_start_experts
from pipeline.train.checkpoint import latest_checkpoint, read_state
from pipeline.train.distributed import TrainingError
from pipeline.train.rates import step_rate

NUM_SAMPLES = 96  # 48 per rank; global batch 8 -> 12 optimizer steps
TOTAL_STEPS = 12
MOE_RECIPE = REPO / "configs" / "methods" / "moe.yaml"
CENTRES = MixtureSettings().centres


@pytest.fixture(scope="module")
def shards(make_shard_dir) -> Path:
    return make_shard_dir(NUM_SAMPLES, 2)


def moe_args(model_dir: Path, shards: Path, output_dir: Path, *overrides: str) -> list[str]:
    return train_args(model_dir, shards, output_dir, "train.micro_batch_size=2", "divico.beta=0.22", *overrides,
                      recipes=(MOE_RECIPE,))


@pytest.fixture(scope="module")
def moe_run(tiny_llava_dir, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe_two_rank")
    result = run(moe_args(tiny_llava_dir, shards, out, "train.save_every_steps=4"), ranks=2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_both_ranks_train_each_step_at_the_same_drawn_rate(moe_run):
    assert read_state(latest_checkpoint(moe_run)).step == TOTAL_STEPS
    drawn = [step_rate("log_uniform", 0, step, [0.05, 0.25]) for step in range(TOTAL_STEPS)]
    assert 0.05 <= min(drawn) and max(drawn) <= 0.25 and len(set(drawn)) == TOTAL_STEPS
    rows = sample_log_rows(moe_run)
    assert list(rows) == ["rank-00000.tsv", "rank-00001.tsv"]
    for rank_rows in rows.values():
        per_step = {}
        for step, _key, rate in rank_rows:
            per_step.setdefault(step, set()).add(rate)
        assert per_step == {step + 1: {rate} for step, rate in enumerate(drawn)}

    logged = scalars(moe_run)
    torch.testing.assert_close(torch.tensor(logged["moe/tau"]), torch.tensor(drawn))
    assert len(logged["train/aux/routing_prior"]) == TOTAL_STEPS
    # The prior's weight anneals linearly from 0.1 to 0 over the first half (moe.prior_anneal 0.5).
    torch.testing.assert_close(torch.tensor(logged["train/aux_weight/routing_prior"]),
                               torch.tensor([0.1 * max(0.0, 1 - step / 6) for step in range(TOTAL_STEPS)]))
    labels = ["tau067", "tau111", "tau167"]
    for bucket in labels:  # every bucket a drawn rate fell in has its three weights, summing to 1
        tags = [f"moe/router_weight/bucket_{bucket}/expert_{expert}" for expert in labels]
        if tags[0] in logged:
            totals = torch.tensor([logged[tag] for tag in tags]).sum(0)
            torch.testing.assert_close(totals, torch.ones_like(totals))
    assert sum(tag.startswith("moe/router_weight/") for tag in logged) >= 6


@pytest.mark.slow
def test_killed_and_resumed_moe_run_ends_with_the_uninterrupted_weights(moe_run, tiny_llava_dir, shards, tmp_path):
    args = moe_args(tiny_llava_dir, shards, tmp_path, "train.save_every_steps=2")
    stopped = preempt_after_first_checkpoint(args, tmp_path)
    assert "preempted: checkpoint for step" in stopped.stdout, stopped.stdout[-4000:]
    stopped_at = read_state(latest_checkpoint(tmp_path)).step
    assert 2 <= stopped_at < TOTAL_STEPS

    resumed = run([*args, "--resume", "auto"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reference, weights = final_weights(moe_run), final_weights(tmp_path)
    assert reference.keys() == weights.keys()
    assert any("experts.2" in name for name in reference) and any("router" in name for name in reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert sample_log_rows(tmp_path) == sample_log_rows(moe_run)  # the same samples at the same rates


@pytest.mark.slow
def test_the_exported_model_runs_at_any_rate_in_its_range_and_refuses_others(moe_run, tiny_llava_dir, shards):
    export = moe_run / "model"
    result = run(["export", str(moe_run), "--out", str(export), "--dtype", "fp32"])
    assert result.returncode == 0, result.stderr[-3000:]
    llava = load_llava(export)
    model = CompressedLlava.from_saved(llava, export).eval()
    batch = prompts_batch(AutoProcessor.from_pretrained(tiny_llava_dir), [True, True])
    with torch.no_grad():
        for e, centre in enumerate(CENTRES):  # after training the nearest expert still leads
            _rates, weights = model(**batch, keep_ratio=centre).routing
            assert int(weights.mean(0).argmax()) == e, (centre, weights.mean(0))

    evaluate = ["eval", f"model={export}", f"data={shards}", "max_new_tokens=2", "batch_size=16", "device=cpu"]
    inside = run([*evaluate, "tau=0.0889", "--json"])
    assert inside.returncode == 0, inside.stderr[-3000:]
    summary = json.loads(inside.stdout)
    assert summary["tau"] == pytest.approx(0.0889) and summary["visual_tokens_kept"] == 9  # of 100
    routed = summary["router_weights"]  # the mean over every kept token the prompts had
    assert list(routed) == ["tau067", "tau111", "tau167"] and sum(routed.values()) == pytest.approx(1)
    outside = run([*evaluate, "tau=0.3", "--json"])
    assert outside.returncode == 2
    assert "tau=0.3000: outside the rates this mixture-of-experts model is trained for, " \
           "moe.tau_range=[0.05, 0.25]" in outside.stderr


@pytest.mark.slow
def test_the_all_centres_schedule_trains_every_centre_each_step(tiny_llava_dir, shards, tmp_path):
    result = run(moe_args(tiny_llava_dir, shards, tmp_path, "moe.rate_schedule=all_centres", "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(tmp_path)
    assert "moe/tau" not in logged and len(logged["train/loss"]) == 2
    # Each step fed every bucket: the router weights of all three were logged at both steps.
    for bucket in ("tau067", "tau111", "tau167"):
        assert len(logged[f"moe/router_weight/bucket_{bucket}/expert_tau111"]) == 2
    assert all(len(rows[0]) == 2 for rows in sample_log_rows(tmp_path).values())  # no single rate to record
    assert sample_log(tmp_path)


def test_warm_start_copies_each_specialist_into_its_expert(tmp_path):
    specialists = []
    for i, centre in enumerate(CENTRES):
        torch.manual_seed(i)
        module = DiViCo(DiViCoConfig(mode="divico", tau=centre), hidden_size=8)
        folder = tmp_path / f"specialist{i}"
        folder.mkdir()
        save_file(module.gap_encoder.state_dict(), str(folder / DIVICO_WEIGHTS_FILE))
        (folder / "divico.json").write_text(json.dumps({"format_version": 1, "hidden_size": 8,
                                                        "config": {"mode": "divico", "tau": centre}}))
        specialists.append((folder, module.gap_encoder))
    mixture = DiViCo(DiViCoConfig(mode="divico", encoder="moe"), hidden_size=8).gap_encoder
    warm_start_experts(mixture, [str(folder) for folder, _ in specialists], CENTRES)
    for expert, (_, specialist) in zip(mixture.experts, specialists):
        for name, tensor in specialist.state_dict().items():
            assert torch.equal(expert.state_dict()[name], tensor)
    with pytest.raises(TrainingError, match=r"trained at tau 0.1111 .* centre 0.0667"):
        warm_start_experts(mixture, [str(specialists[1][0])] * 3, CENTRES)
    with pytest.raises(TrainingError, match="an exported DiViCo model is needed"):
        warm_start_experts(mixture, [str(tmp_path)] * 3, CENTRES)
