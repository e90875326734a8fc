"""`divico export`: a training checkpoint -> a self-contained Hugging Face model folder.

    divico export runs/llava15-7b/divico-tau111 --out exports/llava15-7b-divico-tau111

The folder holds the LLaVA model with the LoRA adapter merged and the trained projector,
loadable by `LlavaForConditionalGeneration.from_pretrained`, its processor, and beside them
the DiViCo settings and gap encoder (divico.json, divico.safetensors) that
`CompressedLlava.from_saved(model, folder)` reads, plus the training config (train_config.yaml).

The files of the checkpoint that export reads are verified against its checksums first. Exit
status: 0 written; 1 the checkpoint is damaged (the message names the file); 2 bad input: the
source is not a checkpoint or run directory, --out exists, or the base model the checkpoint's
config names cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.contract import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, TRAINABLES_FILE
from pipeline.durable import folder_written_whole
from pipeline.train import checkpoint

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
READS = ("adapter/", TRAINABLES_FILE, "config.yaml")  # what export reads of a checkpoint, verified first


class ExportError(ValueError):
    """Bad input to export; the message names it."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("export", help="merge a checkpoint into a Hugging Face model folder",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a checkpoint directory, or a run's output dir (its newest complete checkpoint)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weights' dtype in the folder (default bf16, as the released LLaVA weights)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        out = export(args.source, args.out, dtype=DTYPES[args.dtype])
    except ExportError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    except checkpoint.CheckpointError as error:
        log.error("%s", error)
        return EXIT_FAILURE
    print(out)
    return EXIT_OK


def resolve_checkpoint(source: str | Path) -> Path:
    source = Path(source)
    if not source.is_dir():
        raise ExportError(f"{source}: no such directory")
    if checkpoint.is_checkpoint(source):
        return source
    newest = checkpoint.latest_checkpoint(source)
    if newest is None:
        raise ExportError(f"{source}: neither a checkpoint nor a run directory with complete checkpoints")
    return newest


def export(source: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.train.config import ConfigError, load_config
    from pipeline.model.compressed_llava import CompressedLlava

    ckpt, out = resolve_checkpoint(source), Path(out)
    if out.exists():
        raise ExportError(f"--out {out} exists; choose a new folder")
    checkpoint.verified(ckpt, READS)
    try:
        cfg = load_config([ckpt / "config.yaml"])
    except ConfigError as error:  # only in a checkpoint without checksums: verify caught it otherwise
        raise checkpoint.CheckpointError(f"{ckpt}: {error}") from error
    base = f"model.base={cfg.model.base} (the base model {ckpt}/config.yaml names)"
    if Path(cfg.model.base).is_absolute() and not Path(cfg.model.base).is_dir():  # training made local paths absolute
        raise ExportError(f"{base}: no such folder")
    try:
        processor = AutoProcessor.from_pretrained(cfg.model.base)
        # Rebuild the training model's structure in fp32, load what was trained, merge.
        llava = LlavaForConditionalGeneration.from_pretrained(cfg.model.base, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as error:  # not on the hub or offline, a damaged file
        raise ExportError(f"{base} cannot be loaded: {error}") from error
    adapter = ckpt / "adapter"
    model = llava
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(llava, str(adapter))
        except (OSError, ValueError, SafetensorError) as error:  # damaged, in a checkpoint without checksums
            raise checkpoint.CheckpointError(f"{adapter}: cannot load the LoRA adapter: {error}") from error
    wrapper = CompressedLlava(model, cfg.divico)
    checkpoint.load_trainables(wrapper, ckpt)  # names as in the training model
    with folder_written_whole(out) as partial:
        wrapper.save_divico(partial)
        merged = model.merge_and_unload() if model is not llava else llava
        merged.to(dtype).save_pretrained(partial)
        processor.save_pretrained(partial)
        shutil.copy(ckpt / "config.yaml", partial / "train_config.yaml")
    log.info("exported %s -> %s", ckpt, out)
    return out
