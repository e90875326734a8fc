"""From a recipe to what DeepSpeed runs: the model (base, LoRA, DiViCo), its parameter groups,
the collator, and the DeepSpeed config with its "auto" fields filled."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline.train.config import OptimConfig, RunConfig, collator_config
from pipeline.train.distributed import TrainingError
from pipeline.train.schedule import WarmupCosine, warmup_steps


@dataclass
class BuiltModel:
    model: torch.nn.Module  # what DeepSpeed wraps: the compressed LLaVA
    peft_model: object  # the PeftModel holding the LoRA adapter (None in train_mode=full)
    param_groups: list[dict]
    collator: object
    visual_tokens: int  # per image, before compression


def attn_implementation(requested: str, on_gpu: bool) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def lora_targets(llava: torch.nn.Module) -> list[str]:
    """Every linear layer of the language model (LLaVA-1.5's recipe; 4-bit ones under QLoRA):
    not lm_head, not the vision tower, not the projector."""
    return [f"model.language_model.{name}" for name, module in llava.model.language_model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear4bit")]


def build_model(cfg: RunConfig, *, dtype: torch.dtype, on_gpu: bool) -> BuiltModel:
    """Load the base, decide what trains (the recipe), wrap it with DiViCo, group parameters by lr."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.data.collator import LlavaCollator
    from pipeline.model.compressed_llava import CompressedLlava

    m, o = cfg.model, cfg.optim
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation(m.attn_implementation, on_gpu)}
    if m.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    llava = LlavaForConditionalGeneration.from_pretrained(m.base, **kwargs)
    llava.requires_grad_(False)
    peft_model = None
    if m.train_mode == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if m.qlora:
            llava = prepare_model_for_kbit_training(llava, use_gradient_checkpointing=m.gradient_checkpointing)
        peft_model = get_peft_model(llava, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                      target_modules=lora_targets(llava), bias="none"))
    else:
        llava.model.language_model.requires_grad_(True)
        llava.lm_head.requires_grad_(True)
    llava.model.multi_modal_projector.requires_grad_(m.train_projector)
    llava.model.vision_tower.requires_grad_(m.train_vision_tower)
    if m.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    divico = cfg.divico
    model = CompressedLlava(peft_model or llava, divico)
    if cfg.moe.init_experts_from:
        warm_start_experts(model.divico.gap_encoder, cfg.moe.init_experts_from, divico.moe.centres)
    model.train()
    param_groups = parameter_groups(model, llava, o)

    processor = AutoProcessor.from_pretrained(m.base)
    collator = LlavaCollator(processor, collator_config(cfg), llava.config)
    return BuiltModel(model=model, peft_model=peft_model, param_groups=param_groups, collator=collator,
                      visual_tokens=collator.num_visual_tokens)


def warm_start_experts(encoder: torch.nn.Module, exports: list[str], centres: list[float]) -> None:
    """Start each expert of a MixtureGapEncoder from the gap encoder of the specialist trained at
    its centre: `exports[e]` is an exported DiViCo model (divico.json + divico.safetensors) whose
    tau must be centres[e] (to 0.1%) and whose encoder the released single one."""
    from safetensors.torch import load_file

    from pipeline.contract import DIVICO_SETTINGS_FILE, DIVICO_WEIGHTS_FILE

    for expert, export, centre in zip(encoder.experts, exports, centres, strict=True):
        settings_path, weights_path = Path(export) / DIVICO_SETTINGS_FILE, Path(export) / DIVICO_WEIGHTS_FILE
        if not settings_path.is_file() or not weights_path.is_file():
            raise TrainingError(f"moe.init_experts_from: {export} has no {DIVICO_SETTINGS_FILE} and "
                                f"{DIVICO_WEIGHTS_FILE} (an exported DiViCo model is needed)")
        saved = json.loads(settings_path.read_text())["config"]
        if saved.get("encoder", "mlp") != "mlp" or abs(saved["tau"] - centre) > 1e-3 * centre:
            raise TrainingError(f"moe.init_experts_from: {export} was trained at tau {saved['tau']:.4f} with encoder "
                                f"{saved.get('encoder', 'mlp')!r}; the expert for centre {centre:.4f} needs a "
                                "single-encoder specialist at that tau")
        expert.load_state_dict(load_file(str(weights_path), device=str(next(expert.parameters()).device)))


def parameter_groups(model: torch.nn.Module, llava: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """One optimizer group per part of the model, each at its own lr. LLaVA's parts are known by
    where they sit; any other module declares its group by a `param_group` attribute (DiViCo's
    GapEncoder: "gap_encoder"). A trainable parameter no group claims is an error: silently
    training it at some other part's lr is how a new module ends up mistuned."""
    lrs = {"language_model": optim.lr, "projector": optim.projector_lr, "vision_tower": optim.projector_lr,
           "gap_encoder": optim.encoder_lr}
    owners = [("language_model", llava.model.language_model), ("language_model", llava.lm_head),
              ("projector", llava.model.multi_modal_projector), ("vision_tower", llava.model.vision_tower)]
    owners += [(module.param_group, module) for module in model.modules() if hasattr(module, "param_group")]
    group_of = {id(param): group for group, module in owners for param in module.parameters()}
    params: dict[str, list] = {group: [] for group in lrs}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = group_of.get(id(param))
        if group is None:
            raise TrainingError(f"trainable parameter {name}: no parameter group claims it; give its module a "
                                f"`param_group` attribute (one of {list(lrs)})")
        if group not in lrs:
            raise TrainingError(f"trainable parameter {name}: its module declares param_group={group!r}, "
                                f"expected one of {list(lrs)}")
        params[group].append(param)
    return [{"name": group, "params": members, "lr": lrs[group], "weight_decay": optim.weight_decay}
            for group, members in params.items() if members]


def deepspeed_config(cfg: RunConfig, total_steps: int, accumulation: int, bf16: bool, on_gpu: bool) -> dict:
    """The JSON recipe with its "auto" fields filled from the run config."""
    path = Path(cfg.train.deepspeed_config)
    ds = json.loads(path.read_text())
    ds.pop("_comment", None)
    t, o = cfg.train, cfg.optim
    filled = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": o.grad_clip,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise TrainingError(f"{path}: {key}={ds[key]} disagrees with the run config ({value}); set it to \"auto\"")
    ds.setdefault("bf16", {})["enabled"] = bf16
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    params["lr"], params["weight_decay"] = o.lr, o.weight_decay  # defaults; each param group sets its own lr
    if params.get("betas") == "auto":  # Adam's; another optimizer's JSON has none
        params["betas"] = [o.adam_beta1, o.adam_beta2]
    if not on_gpu and optimizer["type"].lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # FusedAdam is a CUDA kernel
    if "scheduler" in ds:
        raise TrainingError(f"{path}: has a \"scheduler\" section; the schedule is the run config's "
                            "(optim.warmup_ratio, optim.min_lr_ratio: pipeline/train/schedule.py), remove it")
    return ds


def lr_scheduler(cfg: RunConfig, total_steps: int) -> Callable[[torch.optim.Optimizer], WarmupCosine]:
    """What deepspeed.initialize(lr_scheduler=...) builds on its optimizer: the run config's schedule."""
    o = cfg.optim
    return partial(WarmupCosine, total_steps=total_steps, warmup=warmup_steps(o.warmup_ratio, total_steps),
                   floor=o.min_lr_ratio)
