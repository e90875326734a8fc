"""What build.py makes of the tiny recipe: which weights train, in which parameter group, at
which lr (a trainable weight no group claims is refused), and the lr every step runs at."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import REPO, TINY_RECIPE

from pipeline.train.config import load_config
from pipeline.train.build import build_model, deepspeed_config, parameter_groups
from pipeline.train.distributed import TrainingError

LRS = ["optim.lr=1e-3", "optim.projector_lr=2e-3", "optim.encoder_lr=3e-3"]


@pytest.fixture(scope="module")
def built(tiny_llava_dir):
    cfg = load_config([TINY_RECIPE], [f"model.base={tiny_llava_dir}", *LRS])
    return cfg, build_model(cfg, dtype=torch.float32, on_gpu=False)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_each_part_trains_in_its_own_group_at_its_own_lr(built):
    _, b = built
    groups = {group["name"]: group for group in b.param_groups}
    assert {name: group["lr"] for name, group in groups.items()} == {
        "language_model": 1e-3, "projector": 2e-3, "gap_encoder": 3e-3}
    llava = b.model.llava
    assert ids(groups["gap_encoder"]["params"]) == ids(b.model.divico.gap_encoder.parameters())
    assert ids(groups["projector"]["params"]) == ids(llava.model.multi_modal_projector.parameters())
    lora = [p for name, p in b.model.named_parameters() if "lora_" in name]
    assert lora and ids(groups["language_model"]["params"]) == ids(lora)  # LoRA only: the base is frozen
    trainable = [p for p in b.model.parameters() if p.requires_grad]
    assert sum(len(group["params"]) for group in b.param_groups) == len(trainable)
    assert not any(p.requires_grad for p in llava.model.vision_tower.parameters())


def test_a_trainable_weight_no_group_claims_is_an_error(built):
    cfg, b = built
    b.model.extra = torch.nn.Linear(2, 2)  # a new trainable module that declares no group
    try:
        with pytest.raises(TrainingError, match=r"trainable parameter extra\.weight: no parameter group claims it"):
            parameter_groups(b.model, b.model.llava, cfg.optim)
        b.model.extra.param_group = "adapter"
        with pytest.raises(TrainingError, match=r"extra\.weight: its module declares param_group='adapter'"):
            parameter_groups(b.model, b.model.llava, cfg.optim)
        b.model.extra.param_group = "gap_encoder"  # declared: it joins that group
        groups = {g["name"]: g["params"] for g in parameter_groups(b.model, b.model.llava, cfg.optim)}
        assert ids(b.model.extra.parameters()) <= ids(groups["gap_encoder"])
    finally:
        del b.model.extra


def test_full_mode_trains_the_language_model_and_tower_in_their_groups(tiny_llava_dir):
    # The demo's base stage: the whole language model (lm_head included) and the tower train.
    cfg = load_config([TINY_RECIPE], [f"model.base={tiny_llava_dir}", "model.train_mode=full",
                                      "model.train_vision_tower=true", "divico.mode=none", *LRS])
    b = build_model(cfg, dtype=torch.float32, on_gpu=False)
    groups = {group["name"]: group for group in b.param_groups}
    assert {name: group["lr"] for name, group in groups.items()} == {
        "language_model": 1e-3, "projector": 2e-3, "vision_tower": 2e-3}
    llava = b.model.llava
    language = [*llava.model.language_model.parameters(), *llava.lm_head.parameters()]
    assert ids(groups["language_model"]["params"]) == ids(language)
    assert ids(groups["vision_tower"]["params"]) == ids(llava.model.vision_tower.parameters())


def closed_form(step: int, total: int, warmup: int, floor: float) -> float:
    """The lr factor of optimizer step `step` (1-based), as pipeline/train/schedule.py states it."""
    if step <= warmup:
        return step / warmup
    return floor + (1 - floor) * (1 + math.cos(math.pi * (step - warmup - 1) / (total - warmup - 1))) / 2


@pytest.mark.parametrize("total, warmup_ratio, floor", [(8, 0.3, 0.1), (10, 0.0, 0.0), (1000, 0.03, 0.0), (4, 0.5, 0.2)])
def test_every_step_runs_at_the_closed_form_lr(total, warmup_ratio, floor):
    from pipeline.train.schedule import WarmupCosine, warmup_steps

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupCosine(optimizer, total_steps=total, warmup=warmup_steps(warmup_ratio, total), floor=floor)
    warmup = math.ceil(warmup_ratio * total)
    used = []
    for _ in range(total):  # the order DeepSpeed's engine keeps: the optimizer step, then the scheduler's
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert used == pytest.approx([2.0 * closed_form(k, total, warmup, floor) for k in range(1, total + 1)], rel=1e-12)
    assert min(used[:-1]) > 0 and used[-1] == pytest.approx(2.0 * floor)  # no step at lr 0 before the last, at the floor
    assert max(used) == pytest.approx(2.0)


def test_a_restored_schedule_runs_the_next_step_at_its_lr():
    from pipeline.train.schedule import WarmupCosine

    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, WarmupCosine(optimizer, total_steps=20, warmup=4, floor=0.1)

    optimizer, schedule = fresh()
    for _ in range(7):
        optimizer.step()
        schedule.step()
    resumed_optimizer, resumed = fresh()  # a new process: the optimizer's lr is the first step's
    resumed.load_state_dict(schedule.state_dict())
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(closed_form(8, 20, 4, 0.1))


def test_a_deepspeed_scheduler_section_is_refused(tiny_llava_dir, tmp_path):
    ds = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_config([TINY_RECIPE], [f"model.base={tiny_llava_dir}", f"train.deepspeed_config={tmp_path / 'ds.json'}"])
    with pytest.raises(TrainingError, match="scheduler"):
        deepspeed_config(cfg, total_steps=10, accumulation=1, bf16=False, on_gpu=False)


def test_adam_betas_come_from_the_run_config(tiny_llava_dir):
    cfg = load_config([TINY_RECIPE], [f"model.base={tiny_llava_dir}", "optim.adam_beta2=0.98",
                                      f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"])
    params = deepspeed_config(cfg, total_steps=10, accumulation=1, bf16=False, on_gpu=False)["optimizer"]["params"]
    assert params["betas"] == [0.9, 0.98]
