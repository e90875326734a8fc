"""Run configs: YAML merging, dotlist overrides, and validation errors that name the field."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from pipeline.train.config import ConfigError, default_stage, load_config, save_config, validate
from pipeline.contract import TAUS, run_name, tau_label
from pipeline.model.divico import kept_count
from pipeline.model.settings import DiViCoConfig

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted((REPO / "configs" / "methods").glob("*.yaml"))


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
    assert cfg.divico == DiViCoConfig(mode="divico", tau=0.167)
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
    ("divico.tau=abc", r"divico.tau: Value 'abc' of type 'str' could not be converted to Float"),
    ("divico.layer=2.5", r"divico.layer: Value '2.5' of type 'float' could not be converted to Integer"),
    ("divico.ratio=2", r"divico.ratio: Key 'ratio' not in 'DiViCoConfig'"),
    ("divico.query=first", r"query='first'"),
    ("divico.init=xavier", r"init='xavier'"),
    ("train.global_batch_size=10", r"train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x world size 1"),
    ("model.train_mode=half", r"model.train_mode='half'"),
    ("data.image_aspect_ratio=stretch", r"image_aspect_ratio='stretch'"),
    ("train.deepspeed_config=/nope/zero2.json", r"train.deepspeed_config=/nope/zero2.json: file not found"),
    ("data.shards=/nope", r"data.shards=/nope: no manifest.json"),
    ("model.base=/nope/model", r"model.base=/nope/model: not a model folder"),
    ("optim.warmup_ratio=1.5", r"optim.warmup_ratio=1.5"),
    ("moe.rate_schedule=cosine", r"moe.rate_schedule='cosine'"),
    ("moe.prior_anneal=2", r"moe.prior_anneal=2"),
    ("divico.encoder=moe divico.tau=0.3", r"tau=0.3000: outside .* moe.tau_range=\[0.05, 0.25\]"),
    ("divico.encoder=moe divico.moe.centres=[0.2,0.1]", r"moe.centres=\[0.2, 0.1\]: expected .* ascending"),
    ("moe.init_experts_from=[/a,/b,/c]", r"moe.init_experts_from: needs divico.encoder=moe and one export per centre"),
    ("divico.encoder=moe moe.init_experts_from=[/a,/b,/c]", r"moe.init_experts_from: /a has no divico.json"),
    ("train.overlay_every_steps=5", r"train.overlay_every_steps: needs train.overlay_data \(shards\)"),
    ("train.overlay_every_steps=5 train.overlay_data=/nope", r"train.overlay_data=/nope: no manifest.json"),
    ("train.overlay_every_steps=5 train.overlay_data=/x divico.mode=none", r"a mode that compresses"),
    ("train.overlay_images=0", r"train.overlay_images >= 1"),
])
def test_validation_names_the_bad_field(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_cfg(*override.split()), world_size=1)


def test_divico_section_is_typed(tmp_path):
    """The divico section is a DiViCoConfig: values arrive with their field's type (nan from
    the command line too), and a saved config loads back to the same settings."""
    cfg = load_config([], ["divico.beta=nan", "divico.layer=3", "divico.query=last", "divico.init=zero"])
    assert isinstance(cfg.divico, DiViCoConfig)
    assert math.isnan(cfg.divico.beta) and cfg.divico.layer == 3
    assert (cfg.divico.query, cfg.divico.init, cfg.divico.mode) == ("last", "zero", "divico")
    save_config(cfg, tmp_path / "run.yaml")
    loaded = load_config([tmp_path / "run.yaml"]).divico
    assert math.isnan(loaded.beta)
    assert dataclasses.replace(loaded, beta=0.0) == dataclasses.replace(cfg.divico, beta=0.0)


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
@pytest.mark.parametrize("method", METHODS, ids=[p.stem for p in METHODS])
@pytest.mark.parametrize("tau", TAUS, ids=[tau_label(tau) for tau in TAUS])
def test_each_method_at_each_paper_tau_is_valid_for_4_gpus(model, method, tau):
    """The shipped recipe with each model, method and rate checks out (paths aside: no weights here)."""
    cfg = load_config([REPO / "configs/llava15_lora.yaml", *(REPO / "configs" / name for name in model), method],
                      [f"divico.tau={tau}"])
    validate(cfg, world_size=4, check_paths=False)
    assert cfg.train.global_batch_size == 128
    assert cfg.train.output_dir.endswith(f"/{cfg.train.stage}")


# What each method file trains: its DiViCo mode and the run name it gets at tau 1/9, the
# paper's medium rate (576 -> 64 visual tokens), when the launcher does not name it.
METHOD_ROWS = {"deco": ("deco", "deco-tau111"), "divico": ("divico", "divico-tau111"),
               "divico_dart": ("divico_dart", "divico_dart-tau111"),
               "divico_mustdrop": ("divico_mustdrop", "divico_mustdrop-tau111"),
               "pdrop_trained": ("pdrop", "pdrop-tau111"), "divico_init_zero": ("divico", "divico-tau111"),
               "divico_k1": ("divico", "divico-tau111"), "divico_k4": ("divico", "divico-tau111"),
               "divico_query_last": ("divico", "divico-tau111"), "lora": ("none", "lora"),
               "moe": ("divico", "moe"), "point_estimate": ("point_estimate", "point_estimate-tau111"),
               "random_trained": ("random", "random-tau111"), "select_only": ("select_only", "select_only-tau111")}


def test_each_method_holds_what_its_name_says():
    assert sorted(METHOD_ROWS) == [path.stem for path in METHODS]  # a new file needs a row here
    for path in METHODS:
        mode, stage = METHOD_ROWS[path.stem]
        cfg = load_config([REPO / "configs/llava15_lora.yaml", path])
        assert cfg.divico.mode == mode, path.name
        assert kept_count(576, cfg.divico.tau) == 64, path.name
        assert cfg.train.stage == stage == default_stage(cfg.divico, cfg.model.train_mode), path.name
        assert stage in (path.stem, run_name(mode, cfg.divico.tau), "lora"), path.name


def test_no_config_writes_a_paper_tau():
    """The taus are pipeline/contract.py's: a YAML names them (${paper_taus:}, ${paper_tau:medium})."""
    literals = {f"{tau:.7f}"[:5] for tau in TAUS} | {f"{tau:.3f}" for tau in TAUS}  # 0.066, 0.111, 0.166, 0.167
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        text = path.read_text()
        found = sorted(literal for literal in literals if literal in text)
        assert not found, f"{path.relative_to(REPO)} writes {found}"


@pytest.mark.parametrize("override, message", [
    ("divico.tau=${paper_tau:huge}", r"paper_tau:huge.*large.*medium.*small"),
    ("divico.tau=${paper_tau:large}", None),
])
def test_the_paper_tau_resolver(override, message):
    if message is None:
        assert load_config([], [override]).divico.tau == pytest.approx(TAUS[0], abs=1e-7)
        return
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])
