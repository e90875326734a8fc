"""Training checkpoints: written complete or not at all, resumed exactly.

Layout of <output_dir>/checkpoints/step-00000120/:

    adapter/                 PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json)
                             and the DiViCo settings + gap encoder (divico.json, divico.safetensors)
    trainables.safetensors   every other trained weight (projector, gap encoder, or the whole
                             language model in train_mode=full), named as in the training model
    engine/                  DeepSpeed engine state (trainable weights, ZeRO optimizer shards,
                             LR schedule); frozen base weights are excluded
    rng/rank-00000.json      python / numpy / torch (/ cuda) RNG states, one file per rank
    trainer_state.json       step, samples consumed per rank, world size, schedule length
    config.yaml              the resolved run configuration

All ranks write into `step-<N>.tmp/`; after a barrier rank 0 renames it to its final
name. A rename is atomic, so a crash at any moment leaves either the new checkpoint complete
or no directory under its final name: the previous one stays the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.durable import fsync_path

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    samples_per_rank: int  # samples each rank consumed this epoch (the loader's start_sample)
    world_size: int
    total_steps: int


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (.tmp) directories never count."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(checkpoint: str | Path) -> TrainerState:
    return TrainerState(**json.loads((Path(checkpoint) / "trainer_state.json").read_text()))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {
        "python": _to_json(random.getstate()),
        "numpy": _to_json(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_from_json(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trained weights that are not LoRA (LoRA goes into the PEFT adapter)."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()
            if p.requires_grad and "lora_" not in name}


def load_trainables(model: torch.nn.Module, checkpoint: str | Path) -> None:
    tensors = load_file(str(Path(checkpoint) / "trainables.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"{checkpoint}/trainables.safetensors holds weights the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save(engine, model: torch.nn.Module, peft_model, *, output_dir: str | Path, state: TrainerState,
         config_yaml: str, keep_last: int, rank: int) -> Path:
    """Write a complete checkpoint for `state.step` on every rank; returns its final path."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    (tmp / "rng" / f"rank-{rank:05d}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        model.save_divico(tmp / "adapter")  # DiViCo settings (+ gap encoder) beside the adapter
        save_file(trainable_state(model), str(tmp / "trainables.safetensors"))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    _barrier()
    if rank == 0:
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        _prune(output_dir, keep_last)
        log.info("checkpoint written: %s", final)
    _barrier()
    return final


def _prune(output_dir: str | Path, keep_last: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)


def resume(engine, checkpoint: str | Path, *, world_size: int) -> TrainerState:
    """Load the engine state of `checkpoint`; returns where the epoch continues."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    if state.world_size != world_size:
        raise RuntimeError(
            f"{checkpoint} was written by {state.world_size} ranks, this job has {world_size}: "
            "each rank's share of the data would change, so samples would repeat or be skipped")
    loaded, _ = engine.load_checkpoint(str(checkpoint), tag=ENGINE_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"{checkpoint}: DeepSpeed could not load the engine state")
    return state


def restore_rng(checkpoint: str | Path, rank: int) -> None:
    set_rng_state(json.loads((Path(checkpoint) / "rng" / f"rank-{rank:05d}.json").read_text()))
