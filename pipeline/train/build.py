"""From a recipe to what DeepSpeed runs: the model (base, LoRA, DiViCo), its parameter groups,
the collator, and the DeepSpeed config with its "auto" fields filled."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import RunConfig, collator_config, divico_config
from pipeline.train.distributed import TrainingError


@dataclass
class BuiltModel:
    model: torch.nn.Module  # what DeepSpeed wraps: the compressed LLaVA
    peft_model: object  # the PeftModel holding the LoRA adapter (None in train_mode=full)
    param_groups: list[dict]
    collator: object
    visual_tokens_kept: int


def attn_implementation(requested: str, on_gpu: bool) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def build_model(cfg: RunConfig, *, dtype: torch.dtype, on_gpu: bool) -> BuiltModel:
    """Load the base, decide what trains (the recipe), wrap it with DiViCo, group parameters by lr."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.data.collator import LlavaCollator
    from pipeline.model.compressed_llava import CompressedLlava
    from pipeline.model.divico import kept_count

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
        # Every linear layer of the language model (LLaVA-1.5's recipe): not lm_head, not the
        # vision tower, not the projector.
        targets = [f"model.language_model.{name}" for name, module in llava.model.language_model.named_modules()
                   if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear4bit")]
        peft_model = get_peft_model(llava, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                      target_modules=targets, bias="none"))
    else:
        llava.model.language_model.requires_grad_(True)
        llava.lm_head.requires_grad_(True)
    llava.model.multi_modal_projector.requires_grad_(m.train_projector)
    llava.model.vision_tower.requires_grad_(m.train_vision_tower)
    if m.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    divico = divico_config(cfg)
    model = CompressedLlava(peft_model or llava, divico)
    model.train()
    # Every LLaVA parameter belongs to the language model unless it is the projector's or the
    # tower's; what is not LLaVA's is DiViCo's gap encoder.
    group_of = {id(p): "language_model" for p in llava.parameters()}
    group_of |= {id(p): "projector" for p in llava.model.multi_modal_projector.parameters()}
    group_of |= {id(p): "vision_tower" for p in llava.model.vision_tower.parameters()}
    groups = {"language_model": (o.lr, []), "projector": (o.projector_lr, []), "vision_tower": (o.projector_lr, []),
              "gap_encoder": (o.encoder_lr, [])}
    for param in model.parameters():
        if param.requires_grad:
            groups[group_of.get(id(param), "gap_encoder")][1].append(param)
    param_groups = [{"name": name, "params": params, "lr": lr, "weight_decay": o.weight_decay}
                    for name, (lr, params) in groups.items() if params]

    processor = AutoProcessor.from_pretrained(m.base)
    collator = LlavaCollator(processor, collator_config(cfg), llava.config)
    kept = kept_count(collator.num_visual_tokens, divico.tau) if divico.compresses else collator.num_visual_tokens
    return BuiltModel(model=model, peft_model=peft_model, param_groups=param_groups, collator=collator,
                      visual_tokens_kept=kept)


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
    if not on_gpu:
        params.setdefault("torch_adam", True)  # FusedAdam is a CUDA kernel
    scheduler = ds.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})["params"]
    for key, value in {"total_num_steps": total_steps,
                       "warmup_num_steps": max(1, math.ceil(o.warmup_ratio * total_steps)) if o.warmup_ratio else 0,
                       "cos_min_ratio": o.min_lr_ratio}.items():
        if scheduler.get(key, "auto") == "auto":
            scheduler[key] = value
    return ds
