"""`divico train` end to end on the tiny LLaVA, on CPU: the real deepspeed launcher with 2 gloo
ranks, preemption and resume, a crash during a save, a non-finite loss, TensorBoard output,
the LoRA targets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import env, final_weights, preempt_after_first_checkpoint, run, sample_log, scalars, train_args

from pipeline.train.checkpoint import complete_checkpoints, latest_checkpoint, read_state

pytestmark = pytest.mark.slow

NUM_SAMPLES = 96  # 48 per rank; global batch 8 -> 12 optimizer steps
TOTAL_STEPS = 12
SCALARS = ["train/loss", "train/lm_loss", "train/kl", "train/lr", "train/lr/language_model", "train/lr/projector",
           "train/lr/gap_encoder", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s",
           "perf/visual_tokens_kept", "memory/peak_gib", "divico/mu_over_vs", "divico/sigma"]


@pytest.fixture(scope="module")
def shards(make_shard_dir) -> Path:
    return make_shard_dir(NUM_SAMPLES, 2)


@pytest.fixture(scope="module")
def two_rank_run(tiny_llava_dir, shards, tmp_path_factory) -> Path:
    """One uninterrupted epoch, 2 ranks through the deepspeed launcher (2 micro-batches of 2 per rank)."""
    out = tmp_path_factory.mktemp("two_rank")
    # Overlays of 2 samples' kept tokens at steps 6 and 12 (the end), drawn on rank 0 alone.
    result = run(train_args(tiny_llava_dir, shards, out, "train.micro_batch_size=2", "train.save_every_steps=4",
                            "train.overlay_every_steps=6", f"train.overlay_data={shards}", "train.overlay_images=2"),
                 ranks=2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_two_ranks_through_the_deepspeed_launcher_train_an_epoch_and_the_loss_falls(two_rank_run):
    assert read_state(latest_checkpoint(two_rank_run)).step == TOTAL_STEPS
    logged = scalars(two_rank_run)
    losses = logged["train/loss"]
    assert len(losses) == TOTAL_STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

    # Each rank saw its own half of the epoch, every sample exactly once.
    seen = sample_log(two_rank_run)
    assert list(seen) == ["rank-00000.tsv", "rank-00001.tsv"]
    keys = [key for rank in seen.values() for _, key in rank]
    assert len(keys) == NUM_SAMPLES == len(set(keys))
    assert all(len(rank) == NUM_SAMPLES // 2 for rank in seen.values())


def test_tensorboard_holds_every_scalar_the_config_and_hparams(two_rank_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = scalars(two_rank_run)
    for tag in SCALARS:
        assert len(logged[tag]) == TOTAL_STEPS, tag
    assert logged["perf/visual_tokens_kept"][0] == 11  # round(0.111 * 100)
    # The per-step schedule and each group's lr: test_train_optim.py.
    assert all(value > 0 for value in logged["perf/tokens_per_s"] + logged["memory/peak_gib"])
    (run_dir,) = (two_rank_run / "tensorboard").iterdir()
    assert run_dir.name == "debug"
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert logged["final/loss"] == [pytest.approx(logged["train/loss"][-1])]
    # The kept-token overlays: two samples, at steps 6 and 12, as 336 x 336 pictures.
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["divico/overlay/0", "divico/overlay/1"]
    shots = events.Images("divico/overlay/0")
    assert [shot.step for shot in shots] == [6, 12] and (shots[0].width, shots[0].height) == (336, 336)


def test_checkpoints_hold_adapter_trainables_engine_rng_and_config(two_rank_run):
    newest = latest_checkpoint(two_rank_run)
    for name in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/divico.json",
                 "adapter/divico.safetensors", "trainables.safetensors", "trainer_state.json", "config.yaml",
                 "rng/rank-00000.json", "rng/rank-00001.json"]:
        assert (newest / name).is_file(), name
    assert read_state(newest).samples_per_rank == NUM_SAMPLES // 2
    # Frozen base weights are not written: the whole checkpoint is far smaller than the base model.
    base_bytes = sum(p.stat().st_size for p in Path(json.loads((newest / "adapter/adapter_config.json")
                                                                 .read_text())["base_model_name_or_path"]).glob("*.safetensors"))
    engine_files = list((newest / "engine").glob("*model_states.pt"))
    assert engine_files and all(p.stat().st_size < base_bytes / 2 for p in engine_files)
    assert [p.name for p in complete_checkpoints(two_rank_run)] == ["step-00000008", "step-00000012"]  # keep_last=2


def test_lora_adapts_every_linear_layer_of_the_language_model_only(two_rank_run, tiny_llava_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, LlavaForConditionalGeneration

    text = AutoConfig.from_pretrained(tiny_llava_dir).text_config
    # Llama's linear layers: four in attention, three in the gated MLP, in every decoder layer.
    expected = {f"model.language_model.layers.{i}.{name}" for i in range(text.num_hidden_layers)
                for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    modules = dict(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).named_modules())
    linears = {name for name, module in modules.items() if isinstance(module, torch.nn.Linear)}
    assert expected == {name for name in linears if name.startswith("model.language_model.")}
    for part in ("lm_head", "vision_tower", "multi_modal_projector"):  # linear layers left out
        assert any(part in name for name in linears), part

    adapter = latest_checkpoint(two_rank_run) / "adapter"
    # PEFT saves a long target list shortened to name suffixes; a module is adapted when its
    # name is a target or ends with "." + a target.
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert {name for name in modules if any(name == t or name.endswith(f".{t}") for t in targets)} == expected
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        assert {key.removeprefix("base_model.model.").split(".lora_")[0] for key in weights.keys()} == expected


def test_preempted_then_resumed_run_matches_the_uninterrupted_one(two_rank_run, tiny_llava_dir, shards, tmp_path):
    args = train_args(tiny_llava_dir, shards, tmp_path, "train.micro_batch_size=2", "train.save_every_steps=2")
    stopped = preempt_after_first_checkpoint(args, tmp_path)
    assert "preempted: checkpoint for step" in stopped.stdout, stopped.stdout[-4000:]
    assert stopped.returncode != 0  # the ranks' exit 3 comes out of the launcher as 1 (see test_train_signals.py)
    stopped_at = read_state(latest_checkpoint(tmp_path)).step
    assert 2 <= stopped_at < TOTAL_STEPS

    resumed = run([*args, "--resume", "auto"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {tmp_path}/checkpoints/step-{stopped_at:08d}" in resumed.stderr
    assert read_state(latest_checkpoint(tmp_path)).step == TOTAL_STEPS

    reference, weights = final_weights(two_rank_run), final_weights(tmp_path)
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    # The same samples on the same rank at the same step: none repeated, none missing.
    assert sample_log(tmp_path) == sample_log(two_rank_run)


CRASH_ON_SECOND_SAVE = """
import os, sys
import pipeline.train.checkpoint as checkpoint
real_save_file, saves = checkpoint.save_file, []
def dying_save_file(*args, **kwargs):  # the engine state, adapter and RNG are written by now
    saves.append(1)
    if len(saves) == 2:
        os._exit(9)  # the process dies in the middle of the save, as under SIGKILL
    real_save_file(*args, **kwargs)
checkpoint.save_file = dying_save_file
from pipeline.cli import main
main(sys.argv[1:])
"""


def test_crash_during_save_keeps_the_previous_checkpoint_and_a_nan_loss_stops_naming_the_step(
        tiny_llava_dir, shards, tmp_path):
    args = train_args(tiny_llava_dir, shards, tmp_path, "train.save_every_steps=2")
    crashed = subprocess.run([sys.executable, "-c", CRASH_ON_SECOND_SAVE, *args], env=env(),
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode == 9, crashed.stderr[-4000:]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002"]
    assert (tmp_path / "checkpoints" / "step-00000004.tmp").is_dir()  # the partial save, never counted

    # A non-finite loss stops the run at the step it happens, naming it; the checkpoint stays intact.
    diverged = run([*args, "divico.beta=nan", "--resume", "auto"])
    assert diverged.returncode == 1
    assert "non-finite loss at step 3" in diverged.stderr
    assert "step-00000002" in diverged.stderr
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002"]

    resumed = run([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert read_state(latest_checkpoint(tmp_path)).step == TOTAL_STEPS
    assert not (tmp_path / "checkpoints" / "step-00000004.tmp").exists()


def test_an_output_dir_with_checkpoints_needs_resume(two_rank_run, tiny_llava_dir, shards):
    result = run(train_args(tiny_llava_dir, shards, two_rank_run))
    assert result.returncode == 2
    assert "--resume auto" in result.stderr
    assert "Loading weights" not in result.stderr


def test_invalid_config_stops_before_the_model_loads(tiny_llava_dir, shards, tmp_path):
    started = time.perf_counter()
    result = run(train_args(tiny_llava_dir, shards, tmp_path, "divico.layer=4"))
    assert result.returncode == 2
    assert "divico.layer=4" in result.stderr and "[1, 3]" in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout
    assert not any(tmp_path.iterdir())
    assert time.perf_counter() - started < 60
