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
    checksums.json           size and sha256 of every other file, written last

All ranks write into `step-<N>.tmp/`; after a barrier rank 0 records the checksums and renames
it to its final name. A rename is atomic, so a crash at any moment leaves either the new
checkpoint complete or no directory under its final name: the previous one stays the newest
complete checkpoint. The checksums catch what the rename cannot: a file damaged later (bit
rot, a full filesystem, a partial copy). `verify` compares a checkpoint with its record;
resume, export and `divico checkpoint verify DIR` all use it.
"""

from __future__ import annotations

import argparse
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.contract import (
    CHECKPOINTS_DIR,
    CHECKSUMS_FILE,
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    TRAINABLES_FILE,
    TRAINER_STATE_FILE,
)
from pipeline.durable import fsync_path, sha256_file

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is damaged (fails verification, or a file cannot be read); the message names the file."""


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    samples_per_rank: int  # samples each rank consumed this epoch (the loader's start_sample)
    world_size: int
    total_steps: int


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (.tmp) directories never count."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint directory, intact or not: its checksum record names what a damaged one lost."""
    return (Path(path) / TRAINER_STATE_FILE).is_file() or (Path(path) / CHECKSUMS_FILE).is_file()


def read_state(checkpoint: str | Path) -> TrainerState:
    return TrainerState(**json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text()))


def _step(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name)[1])


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
    path = Path(checkpoint) / TRAINABLES_FILE
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:  # a damaged checkpoint that recorded no checksums
        raise CheckpointError(f"{path}: {error}") from error
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise CheckpointError(f"{path} holds weights the model lacks: {missing[:5]}")
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
        save_file(trainable_state(model), str(tmp / TRAINABLES_FILE))
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    _barrier()
    if rank == 0:
        record_checksums(tmp)  # every rank's files are written by now
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        _prune(output_dir, keep_last, state.step)
        log.info("checkpoint written: %s", final)
    _barrier()
    return final


def _prune(output_dir: str | Path, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step`. A newer one is left from before
    this run resumed from an older checkpoint (it was damaged, or --resume named an older one):
    this run redoes those steps, and keeping it would let it push out the checkpoints just written."""
    found = complete_checkpoints(output_dir)
    upto = [p for p in found if _step(p) <= step]
    for newer in (p for p in found if _step(p) > step):
        log.info("removing %s: newer than step %d, from before this run resumed", newer, step)
        shutil.rmtree(newer)
    for old in upto[:-keep_last]:
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


# ----------------------------------------------------------------------------- integrity


@dataclass(frozen=True)
class Problem:
    file: str  # path inside the checkpoint
    reason: str  # missing / a size or sha256 different from the record / not in the record


@dataclass
class Verification:
    checkpoint: Path
    problems: list[Problem]
    recorded: bool  # False: no CHECKSUMS_FILE (written by an older version); nothing could be compared

    @property
    def intact(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.problems:
            return f"{self.checkpoint}: DAMAGED: " + "; ".join(f"{p.file}: {p.reason}" for p in self.problems)
        if not self.recorded:
            return f"{self.checkpoint}: not verified: no {CHECKSUMS_FILE} (written by a version that recorded none)"
        return f"{self.checkpoint}: OK"


def _files(checkpoint: Path) -> list[str]:
    """Every file of the checkpoint but the record, as paths inside it."""
    names = (p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    return sorted(name for name in names if name != CHECKSUMS_FILE)


def record_checksums(checkpoint: Path) -> None:
    """Write CHECKSUMS_FILE: the size and sha256 of every other file of `checkpoint`.

    Rank 0 hashes the whole tree after every rank has written its files: one pass, no need to
    know which files DeepSpeed writes on which rank. Measured on the 2-core development machine:
    0.74 s per GB on one core (a file just written, read from the page cache in 16 MiB blocks),
    where writing costs 4.3 s per GB (torch.save + sync); so ~4 s for a 7B LoRA r=128 checkpoint
    (~5.5 GB with every rank's ZeRO-2 optimizer shard), once per train.save_every_steps. Splitting
    the files over the ranks would be up to world-size times faster, at the price of two object
    collectives in every save.
    """
    files = {name: {"bytes": (checkpoint / name).stat().st_size, "sha256": sha256_file(checkpoint / name)}
             for name in _files(checkpoint)}
    (checkpoint / CHECKSUMS_FILE).write_text(json.dumps({"files": files}, indent=1))


def verify(checkpoint: str | Path, scope: tuple[str, ...] = ()) -> Verification:
    """Compare `checkpoint` with its CHECKSUMS_FILE: every recorded file present with its size
    and sha256, and no other file (nothing writes into a checkpoint after its save, so a stray
    file means it was changed since: files of another step copied in, a hand edit). `scope`
    limits the check to some paths inside the checkpoint (a folder with a trailing '/'); empty:
    all of them.

    A checkpoint without the record was written before checksums were recorded: it is reported
    as not verified and accepted, so runs started with an older version still resume.
    """
    checkpoint = Path(checkpoint)

    def in_scope(name: str) -> bool:
        return not scope or any(name == s or (s.endswith("/") and name.startswith(s)) for s in scope)

    record_path = checkpoint / CHECKSUMS_FILE
    if not record_path.is_file():
        return Verification(checkpoint, [], recorded=False)
    try:
        recorded = json.loads(record_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Verification(checkpoint, [Problem(CHECKSUMS_FILE, f"unreadable: {error!r}")], recorded=True)
    problems = []
    for name, expected in recorded.items():
        if not in_scope(name):
            continue
        path = checkpoint / name
        if not path.is_file():
            problems.append(Problem(name, "missing"))
        elif path.stat().st_size != expected["bytes"]:
            problems.append(Problem(name, f"{path.stat().st_size} bytes, recorded {expected['bytes']}"))
        elif sha256_file(path) != expected["sha256"]:
            problems.append(Problem(name, "sha256 differs from the record"))
    problems += [Problem(name, "not in the record") for name in _files(checkpoint)
                 if in_scope(name) and name not in recorded]
    return Verification(checkpoint, problems, recorded=True)


def verified(checkpoint: str | Path, scope: tuple[str, ...] = ()) -> Path:
    """`checkpoint` if `verify` finds it intact; CheckpointError naming the damaged files otherwise."""
    result = verify(checkpoint, scope)
    if not result.intact:
        raise CheckpointError(str(result))
    if not result.recorded:
        log.warning("%s", result)
    return Path(checkpoint)


def newest_intact(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that `verify` finds intact, logging each newer one skipped and why.
    None when there is no checkpoint; CheckpointError when there are some but none is intact."""
    found = complete_checkpoints(output_dir)
    for candidate in reversed(found):
        try:
            return verified(candidate)
        except CheckpointError as error:
            log.warning("skipping %s", error)
    if found:
        raise CheckpointError(f"{checkpoint_root(output_dir)}: none of the {len(found)} checkpoints is intact "
                              "(each one's problems are logged above)")
    return None


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """`divico checkpoint verify DIR`."""
    parser = commands.add_parser("verify", help="check checkpoints against their recorded sizes and sha256",
                                 description="Check one checkpoint (step-N/) or every checkpoint of a run's "
                                             "output dir; one line each. Exit 0: all intact, 1: any damaged, "
                                             "2: DIR is neither.")
    parser.add_argument("dir", type=Path, help="a checkpoint directory, or a run's output dir")
    parser.set_defaults(func=_verify_command)


def _verify_command(args: argparse.Namespace) -> int:
    checkpoints = [args.dir] if is_checkpoint(args.dir) else complete_checkpoints(args.dir)
    if not checkpoints:
        log.error("%s: neither a checkpoint nor a run's output dir with checkpoints", args.dir)
        return EXIT_BAD_INPUT
    results = [verify(c) for c in checkpoints]
    for result in results:
        print(result)
    return EXIT_OK if all(r.intact for r in results) else EXIT_FAILURE
