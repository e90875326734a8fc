"""What the optimizer does in a tiny `divico train` run, read back from TensorBoard and the
per-step checkpoints: each parameter group's lr follows warmup + cosine at its
own base lr (the closed form of pipeline/train/schedule.py), gradients are clipped, the gap encoder trains, its health is logged.

The run uses plain SGD (a torch optimizer through DeepSpeed) so that an update is exactly
-lr * clipped gradient: with every step clipped, sqrt(sum over groups of (||dw|| / lr)^2)
must equal the clip threshold, which no wrong lr in a group that moves can satisfy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, run, scalars, train_args

from pipeline.train.checkpoint import complete_checkpoints, read_state

pytestmark = pytest.mark.slow

NUM_SAMPLES = 64  # one process, global batch 8 (2 micro-batches of 4) -> 8 optimizer steps
TOTAL_STEPS = 8
WARMUP_RATIO = 0.3  # ceil(0.3 * 8) = 3 warmup steps
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1e-3  # below every gradient norm of the run: each step is clipped
BASE_LRS = {"language_model": 1e-2, "projector": 3e-2, "gap_encoder": 1e-1}  # distinct: a mix-up shows


@pytest.fixture(scope="module")
def sgd_run(tiny_llava_dir, make_shard_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sgd_run")
    ds_config = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    ds_config["optimizer"] = {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}}
    ds_config["zero_allow_untested_optimizer"] = True  # ZeRO-2 with a torch optimizer
    ds_path = out / "zero2_sgd.json"
    ds_path.write_text(json.dumps(ds_config))
    args = train_args(tiny_llava_dir, make_shard_dir(NUM_SAMPLES, 1), out / "run",
                      f"optim.lr={BASE_LRS['language_model']}", f"optim.projector_lr={BASE_LRS['projector']}",
                      f"optim.encoder_lr={BASE_LRS['gap_encoder']}", f"optim.warmup_ratio={WARMUP_RATIO}",
                      f"optim.min_lr_ratio={MIN_LR_RATIO}", f"optim.grad_clip={GRAD_CLIP}",
                      "train.save_every_steps=1", f"train.keep_last={TOTAL_STEPS}",
                      f"train.deepspeed_config={ds_path}")
    result = run(args)
    assert result.returncode == 0, result.stderr[-4000:]
    return out / "run"


def warmup_cosine_ratio(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The lr factor optimizer step `step` (1-based) must run at: linear warmup reaching the full
    lr at step `warmup`, then cosine to `min_ratio` at the last step (pipeline/train/schedule.py)."""
    if step <= warmup:
        return step / warmup
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * (step - warmup - 1) / (total - warmup - 1))) / 2


def group_of(name: str) -> str:
    """The parameter group of a weight in a checkpoint (final_weights' names)."""
    if name.startswith("adapter."):
        return "language_model"  # LoRA
    if ".gap_encoder." in name:
        return "gap_encoder"
    if ".multi_modal_projector." in name:
        return "projector"
    raise AssertionError(f"{name}: a trained weight of no expected group")


def weights_by_step(output_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    steps = {}
    for ckpt in complete_checkpoints(output_dir):
        weights = load_file(str(ckpt / "trainables.safetensors"))
        weights |= {f"adapter.{k}": v for k, v in load_file(str(ckpt / "adapter/adapter_model.safetensors")).items()}
        steps[read_state(ckpt).step] = weights
    return steps


def test_every_group_follows_warmup_then_cosine_at_its_own_lr(sgd_run):
    logged = scalars(sgd_run)
    assert {tag.removeprefix("train/lr/") for tag in logged if tag.startswith("train/lr/")} == set(BASE_LRS)
    warmup = math.ceil(WARMUP_RATIO * TOTAL_STEPS)
    ratios = [warmup_cosine_ratio(step, TOTAL_STEPS, warmup, MIN_LR_RATIO) for step in range(1, TOTAL_STEPS + 1)]
    assert ratios[:4] == [1 / 3, 2 / 3, 1, 1] and ratios[-1] == pytest.approx(MIN_LR_RATIO)  # warmup, cosine to the floor
    for group, base in BASE_LRS.items():
        assert logged[f"train/lr/{group}"] == pytest.approx([base * r for r in ratios], rel=1e-6), group
    assert logged["train/lr"] == logged["train/lr/language_model"]


def test_each_update_is_the_clipped_gradient_at_each_groups_lr(sgd_run):
    logged = scalars(sgd_run)
    weights = weights_by_step(sgd_run)
    assert sorted(weights) == list(range(1, TOTAL_STEPS + 1))
    assert all(norm > 10 * GRAD_CLIP for norm in logged["train/grad_norm"])  # the norm before clipping
    lrs = {group: logged[f"train/lr/{group}"] for group in BASE_LRS}
    for step in range(2, TOTAL_STEPS + 1):
        moved = {group: 0.0 for group in BASE_LRS}
        for name, tensor in weights[step].items():
            moved[group_of(name)] += (tensor - weights[step - 1][name]).double().pow(2).sum().item()
        # SGD: dw = -lr * clipped gradient, so dw / lr, over all groups, has the clip's norm.
        per_lr = {group: math.sqrt(moved[group]) / lrs[group][step - 1] for group in BASE_LRS}
        assert math.sqrt(sum(v * v for v in per_lr.values())) == pytest.approx(GRAD_CLIP, rel=1e-3), (step, per_lr)
        # Each group carries a real share of the gradient, so a wrong lr in any of them would show above.
        assert all(value > 0.05 * GRAD_CLIP for value in per_lr.values()), (step, per_lr)


def test_the_gap_encoder_trains_and_its_health_is_logged(sgd_run):
    weights = weights_by_step(sgd_run)
    encoder = [name for name in weights[TOTAL_STEPS] if group_of(name) == "gap_encoder"]
    assert len(encoder) == 4  # fc1, fc2: weight and bias
    for name in encoder:
        assert not torch.equal(weights[TOTAL_STEPS][name], weights[1][name]), name

    logged = scalars(sgd_run)
    # Every step of this run holds images: one point per step, means over its micro-batches.
    assert len(logged["divico/mu_over_vs"]) == len(logged["divico/sigma"]) == TOTAL_STEPS
    assert all(0 < value < 100 for value in logged["divico/mu_over_vs"])
    # sigma = sigma0 * exp(l / 2) with sigma0 = 0.075 and l near 0 at the released init.
    assert all(0.03 < value < 0.2 for value in logged["divico/sigma"])
