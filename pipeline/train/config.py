"""Run configuration: dataclasses, YAML + dotlist loading, and validation before any model loads.

A recipe is a YAML file with the sections below; later files and `key=value` overrides win:

    divico train --config configs/llava15_lora.yaml --config configs/methods/divico.yaml 'divico.tau=${paper_tau:large}'

`validate` checks everything that can be checked without loading weights (paths, batch
arithmetic, tau and K against the model's config.json) so a bad sweep entry fails in seconds,
not after the model is on the GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline.contract import DIVICO_SETTINGS_FILE, run_name
from pipeline.data.shard_format import MANIFEST_FILE
from pipeline.data.settings import CollatorSettings
from pipeline.model.settings import DiViCoConfig
from pipeline.resolvers import register_resolvers
from pipeline.train.rates import RATE_SCHEDULES

register_resolvers()  # recipes may write ${paper_tau:medium}

TRAIN_MODES = ("lora", "full")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    base: str = "llava-hf/llava-1.5-7b-hf"  # hub id or local folder
    # "lora": base frozen, PEFT LoRA on the language model's linear layers (the DiViCo stages).
    # "full": the language model is trained in full (the demo's "base" stage).
    train_mode: str = "lora"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    train_projector: bool = True
    # The CLIP tower stays frozen in LLaVA-1.5; the demo's base stage trains its random tiny one.
    train_vision_tower: bool = False
    qlora: bool = False  # 4-bit base weights through bitsandbytes (GPU only)
    gradient_checkpointing: bool = True
    # "auto": flash_attention_2 when flash-attn is installed and a GPU is used, else sdpa.
    attn_implementation: str = "auto"
    # Resume LoRA-tuning from an exported folder (a "base" stage's export) works by pointing
    # `base` at it; nothing else is needed.


@dataclass
class DataConfig(CollatorSettings):  # + template, model_max_length, image_aspect_ratio
    shards: str = "data/shards"  # a directory written by `divico prep shard`
    num_workers: int = 2
    seed: int = 0  # data order
    # Batches of one modality and similar length (LLaVA-1.5's group_by_modality_length): less padding.
    group_by_modality_length: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-4  # LoRA (or the full language model in train_mode=full)
    projector_lr: float = 2e-5
    encoder_lr: float = 2e-4  # the DiViCo gap encoder
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999  # LLaVA's (transformers' default); a from-scratch tiny model wants 0.98
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's lr
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    # Names the TensorBoard run, unique per stage and tau; default_stage() when not set.
    stage: str | None = None
    output_dir: str = "outputs/run"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    global_batch_size: int = 128
    micro_batch_size: int = 16
    precision: str = "auto"  # bf16 on GPU, fp32 on CPU
    seed: int = 0
    save_every_steps: int = 500
    keep_last: int = 2  # newest complete checkpoints kept; older ones are deleted
    log_every_steps: int = 1
    # Stop after this many optimizer steps (checkpointing first) although the schedule spans
    # the whole epoch: a job slice for clusters with short time limits. null = whole epoch.
    max_steps: int | None = None
    dist_timeout_minutes: int = 30  # a dead rank ends the job after this long, not never
    tensorboard_dir: str | None = None  # root for all stages; default: <output_dir>/tensorboard
    # Append "step<TAB>sample key" per consumed sample to <output_dir>/samples/rank-N.tsv (and
    # "<TAB>keep ratio" when a MoE step drew one): an audit trail that shows which samples each
    # rank trained on, at which rate, across resumes.
    log_sample_keys: bool = False
    # Every this many optimizer steps (0: never) and at the end, rank 0 draws the visual tokens the
    # model keeps for the first overlay_images samples with an image in overlay_data (shards,
    # e.g. held-out) into TensorBoard, divico/overlay/<i> (pipeline/report/overlay.py).
    overlay_every_steps: int = 0
    overlay_data: str | None = None
    overlay_images: int = 4


@dataclass
class MoETrainConfig:
    """How the Mixture-of-Experts stage trains (divico.encoder=moe; the model's own settings
    are divico.moe). pipeline/train/rates.py has the schedules."""

    # Each step's rate: "log_uniform" or "uniform" on divico.moe.tau_range (the same on every
    # rank, a function of train.seed and the step), or "all_centres" (every centre each step).
    rate_schedule: str = "log_uniform"
    # The routing prior's weight decays linearly to 0 over this fraction of the epoch (0: constant).
    prior_anneal: float = 0.5
    # Warm start: the specialists' exports, one per divico.moe.centres entry and in its order;
    # each expert starts from the gap encoder of the specialist trained at its centre. The LoRA
    # starts from whatever model.base is (the base model, or one specialist's export).
    init_experts_from: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    divico: DiViCoConfig = field(default_factory=DiViCoConfig)  # mode, tau, layer, beta, ...
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)


Config = TypeVar("Config")


def load_config(paths: list[str | Path], overrides: list[str] | None = None,
                schema: type[Config] = RunConfig) -> Config:
    """Merge YAML files in order, then `key=value` overrides, into the dataclass `schema`
    (a training recipe unless told otherwise); unknown keys, wrong types and required
    (`???`) keys left unset are errors."""
    merged = OmegaConf.structured(schema)
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except Exception as error:  # omegaconf names the key and the type problem
            raise ConfigError(f"config file {path}: {_one_line(error)}") from error
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as error:
        raise ConfigError(f"override {overrides}: {_one_line(error)}") from error
    try:
        if schema is RunConfig and merged.train.stage is None:  # before ${train.stage} is read
            merged.train.stage = default_stage(OmegaConf.to_object(merged.divico), merged.model.train_mode)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key}: required, not set (pass {error.full_key}=...)") from error
    except Exception as error:  # a resolver's message (${paper_tau:huge}) names the problem
        raise ConfigError(f"config {[str(path) for path in paths]} {overrides or []}: {_one_line(error)}") from error


def default_stage(divico: DiViCoConfig, train_mode: str) -> str:
    """The run's name when train.stage is not set: the method at its rate (`divico-tau111`),
    `moe` for a Mixture-of-Experts model (it serves every rate), the training mode (`lora`,
    `full`) without compression. The launcher names each task's run itself."""
    if divico.encoder == "moe":
        return "moe"
    return run_name(divico.mode, divico.tau) if divico.compresses else train_mode


def _one_line(error: Exception) -> str:
    """omegaconf's message without its context lines: the key, then the problem."""
    key, lines = getattr(error, "full_key", None), str(error).splitlines()
    return f"{key}: {lines[0]}" if key and lines else " ".join(lines)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def model_config_json(base: str) -> dict[str, Any]:
    """The base model's config.json, local or from the hub, without loading weights."""
    if Path(base).is_dir():
        path = Path(base) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.base={base}: no config.json in that folder")
        return json.loads(path.read_text())
    if Path(base).exists() or base.startswith((".", "/")) or base.count("/") != 1:
        raise ConfigError(f"model.base={base}: not a model folder or a hub id (owner/name)")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(base, "config.json")).read_text())
    except Exception as error:
        raise ConfigError(f"model.base={base}: cannot read config.json from the hub ({error})") from error


def num_decoder_layers(model_json: dict[str, Any]) -> int:
    return int(model_json.get("text_config", model_json)["num_hidden_layers"])


def validate(cfg: RunConfig, world_size: int | None = None, *, check_paths: bool = True) -> None:
    """Raise ConfigError naming the first bad field. Reads only small JSON files."""
    world_size = world_size or world_size_from_env()
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data

    if m.train_mode not in TRAIN_MODES:
        raise ConfigError(f"model.train_mode={m.train_mode!r}: expected one of {TRAIN_MODES}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}: expected one of {PRECISIONS}")
    if m.lora_r < 1 or m.lora_alpha <= 0 or not 0 <= m.lora_dropout < 1:
        raise ConfigError(f"model.lora_r/lora_alpha/lora_dropout = {m.lora_r}/{m.lora_alpha}/"
                          f"{m.lora_dropout}: need r >= 1, alpha > 0, 0 <= dropout < 1")
    if m.qlora and m.train_mode != "lora":
        raise ConfigError("model.qlora=true needs model.train_mode=lora (4-bit weights cannot be trained in full)")
    if m.qlora:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("model.qlora=true: bitsandbytes is not installed (pip install 'divico[qlora]')")
    for name in ("lr", "projector_lr", "encoder_lr"):
        if getattr(o, name) < 0:
            raise ConfigError(f"optim.{name}={getattr(o, name)}: must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}={getattr(o, name)}: must be in [0, 1)")
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio={o.warmup_ratio}: must be in [0, 1)")

    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x world size {world_size}")
    for name in ("save_every_steps", "log_every_steps", "dist_timeout_minutes"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps}: must be >= 1 or null")
    if t.overlay_every_steps < 0 or t.overlay_images < 1:
        raise ConfigError("train.overlay_every_steps must be >= 0 and train.overlay_images >= 1")
    if t.overlay_every_steps and not (t.overlay_data and cfg.divico.compresses):
        raise ConfigError("train.overlay_every_steps: needs train.overlay_data (shards) and a mode that compresses "
                          f"(divico.mode={cfg.divico.mode})")

    try:
        collator_config(cfg)
    except ValueError as error:
        raise ConfigError(f"data: {error}") from error
    divico = cfg.divico
    try:
        divico.validate(prefix="divico.")  # typed by load_config; the choices and ranges are validate's
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.moe.rate_schedule not in RATE_SCHEDULES:
        raise ConfigError(f"moe.rate_schedule={cfg.moe.rate_schedule!r}: expected one of {RATE_SCHEDULES}")
    if not 0 <= cfg.moe.prior_anneal <= 1:
        raise ConfigError(f"moe.prior_anneal={cfg.moe.prior_anneal}: must be in [0, 1]")
    if cfg.moe.init_experts_from and (divico.encoder != "moe"
                                      or len(cfg.moe.init_experts_from) != len(divico.moe.centres)):
        raise ConfigError(f"moe.init_experts_from: needs divico.encoder=moe and one export per centre "
                          f"({len(divico.moe.centres)}), got {len(cfg.moe.init_experts_from)}")
    if not divico.compression.trainable:
        raise ConfigError(f"divico.mode={divico.mode} is a training-free baseline: evaluate it with `divico eval "
                          f"divico.mode={divico.mode} divico.tau=T` on the base model (fastv's trained counterpart is "
                          "mode select_only)")

    if not check_paths:
        return
    if not Path(t.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config}: file not found")
    if not (Path(d.shards) / MANIFEST_FILE).is_file():
        raise ConfigError(f"data.shards={d.shards}: no {MANIFEST_FILE} (run `divico prep shard` first)")
    if t.overlay_every_steps and not (Path(t.overlay_data) / MANIFEST_FILE).is_file():
        raise ConfigError(f"train.overlay_data={t.overlay_data}: no {MANIFEST_FILE} (a shard directory)")
    for export in cfg.moe.init_experts_from:
        if not (Path(export) / DIVICO_SETTINGS_FILE).is_file():
            raise ConfigError(f"moe.init_experts_from: {export} has no {DIVICO_SETTINGS_FILE} (an exported DiViCo "
                              "model, `divico export`, is needed)")
    try:
        divico.validate(num_decoder_layers(model_config_json(m.base)), prefix="divico.")
    except ValueError as error:
        raise ConfigError(f"{error} (model.base={m.base})") from error


def collator_config(cfg: RunConfig):
    from pipeline.data.collator import CollatorConfig

    return CollatorConfig.from_settings(cfg.data, padding_side="right")
