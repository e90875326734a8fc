"""What build.py makes of the tiny recipe: which weights train, in which parameter group, at
which lr (a trainable weight no group claims is refused), and the schedule DeepSpeed gets."""

from __future__ import annotations

import pytest
import torch
from train_helpers import REPO, TINY_RECIPE

from pipeline.config import load_config
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


@pytest.mark.parametrize("warmup_ratio, first_ratios", [(0.0, [1.0, 1.0]), (0.3, [0.0, 1 / 3])])
def test_the_schedule_deepspeed_gets_with_and_without_warmup(tiny_llava_dir, warmup_ratio, first_ratios):
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = load_config([TINY_RECIPE], [f"model.base={tiny_llava_dir}", f"optim.warmup_ratio={warmup_ratio}",
                                      f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"])
    params = deepspeed_config(cfg, total_steps=10, accumulation=1, bf16=False, on_gpu=False)["scheduler"]["params"]
    schedule = WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **params)
    ratios = []
    for _ in range(10):
        schedule.step()
        ratios.append(schedule.get_lr()[0])
    assert ratios[:2] == pytest.approx(first_ratios)
    assert max(ratios) == pytest.approx(1.0, abs=0.05) and ratios[-1] < 0.1  # then the cosine decay
