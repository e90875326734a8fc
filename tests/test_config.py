"""Run configs: YAML merging, dotlist overrides, and validation errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, validate

REPO = Path(__file__).resolve().parents[1]
SWEEP = sorted((REPO / "configs" / "sweep").glob("*.yaml"))


@pytest.fixture
def tiny_cfg(tiny_llava_dir, make_shard_dir):
    return lambda *overrides: load_config(
        [REPO / "configs/debug/tiny.yaml"],
        [f"model.base={tiny_llava_dir}", f"data.shards={make_shard_dir(16, 1)}",
         f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}", *overrides])


def test_files_merge_in_order_and_overrides_win(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("divico: {mode: divico, tau: 0.111}\ntrain: {micro_batch_size: 4}\n")
    second.write_text("divico: {tau: 0.167}\n")
    cfg = load_config([first, second], ["train.micro_batch_size=8", "optim.lr=1e-4"])
    assert cfg.divico == {"mode": "divico", "tau": 0.167}
    assert cfg.train.micro_batch_size == 8 and cfg.optim.lr == 1e-4
    assert cfg.model.lora_r == 128 and cfg.model.lora_alpha == 256 and cfg.model.lora_dropout == 0.05  # LLaVA-1.5


@pytest.mark.parametrize("overrides, field", [
    (["train.micro_batch_sise=4"], "micro_batch_sise"),  # a typo is an error, not ignored
    (["train.micro_batch_size=four"], "micro_batch_size"),
])
def test_unknown_or_mistyped_keys_name_the_key(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config([], overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        load_config([tmp_path / "nope.yaml"])


@pytest.mark.parametrize("override, message", [
    ("divico.tau=0", r"tau=0.*\(0, 1\]"),
    ("divico.tau=1.5", r"tau=1.5"),
    ("divico.layer=0", r"layer=0"),
    ("divico.layer=4", r"divico.layer=4: K must be in \[1, 3\]"),  # the tiny model has 4 layers
    ("divico.mode=fast", r"mode='fast'"),
    ("divico.mode=fastv", r"training-free"),
    ("divico.tau=abc", r"divico.tau='abc': expected float"),
    ("divico.ratio=2", r"unknown DiViCo settings \['ratio'\]"),
    ("train.global_batch_size=10", r"train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x world size 1"),
    ("model.train_mode=half", r"model.train_mode='half'"),
    ("data.image_aspect_ratio=stretch", r"image_aspect_ratio='stretch'"),
    ("train.deepspeed_config=/nope/zero2.json", r"train.deepspeed_config=/nope/zero2.json: file not found"),
    ("data.shards=/nope", r"data.shards=/nope: no manifest.json"),
    ("model.base=/nope/model", r"model.base=/nope/model: not a model folder"),
    ("optim.warmup_ratio=1.5", r"optim.warmup_ratio=1.5"),
])
def test_validation_names_the_bad_field(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(override), world_size=1)


def test_batch_must_divide_over_the_world(tiny_cfg):
    cfg = tiny_cfg("train.global_batch_size=8", "train.micro_batch_size=4")
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="world size 3"):
        validate(cfg, world_size=3)


def test_qlora_needs_lora_and_bitsandbytes(tiny_cfg):
    with pytest.raises(ConfigError, match="model.qlora"):
        validate(tiny_cfg("model.qlora=true", "model.train_mode=full"), world_size=1)


def test_the_debug_recipe_is_valid(tiny_cfg):
    validate(tiny_cfg(), world_size=1)


@pytest.mark.parametrize("model", [[], ["llava15_13b.yaml"]], ids=["7b", "13b"])
@pytest.mark.parametrize("sweep", SWEEP, ids=[p.stem for p in SWEEP])
def test_sweep_configs_are_valid_for_4_gpus(model, sweep):
    """The shipped recipe with each model and sweep file checks out (paths aside: no weights here)."""
    cfg = load_config([REPO / "configs/llava15_lora.yaml", *(REPO / "configs" / name for name in model), sweep])
    validate(cfg, world_size=4, check_paths=False)
    assert cfg.train.global_batch_size == 128
    assert cfg.train.output_dir.endswith(f"/{cfg.train.stage}") and cfg.train.stage in sweep.read_text()
