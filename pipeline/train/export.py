"""`divico export`: a training checkpoint -> a self-contained Hugging Face model folder.

    divico export runs/llava15_7b/divico_tau111 --out exports/llava15_7b_divico_tau111

The folder holds the LLaVA model with the LoRA adapter merged and the trained projector,
loadable by `LlavaForConditionalGeneration.from_pretrained`, its processor, and beside them
the DiViCo settings and gap encoder (divico.json, divico.safetensors) that
`CompressedLlava.from_saved(model, folder)` reads, plus the training config (train_config.yaml).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from pipeline.train import checkpoint

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    except (FileNotFoundError, FileExistsError) as error:
        log.error("%s", error)
        return 2
    print(out)
    return 0


def resolve_checkpoint(source: str | Path) -> Path:
    source = Path(source)
    if (source / "trainer_state.json").is_file():
        return source
    newest = checkpoint.latest_checkpoint(source)
    if newest is None:
        raise FileNotFoundError(f"{source}: neither a checkpoint nor a run directory with complete checkpoints")
    return newest


def export(source: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.config import divico_config, load_config
    from pipeline.model.compressed_llava import CompressedLlava

    ckpt, out = resolve_checkpoint(source), Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder")
    cfg = load_config([ckpt / "config.yaml"])
    # Rebuild the training model's structure in fp32, load what was trained, merge.
    llava = LlavaForConditionalGeneration.from_pretrained(cfg.model.base, dtype=torch.float32)
    adapter = ckpt / "adapter"
    model = llava
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(llava, str(adapter))
    wrapper = CompressedLlava(model, divico_config(cfg))
    checkpoint.load_trainables(wrapper, ckpt)  # names as in the training model
    partial = out.with_name(out.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    wrapper.save_divico(partial)
    merged = model.merge_and_unload() if model is not llava else llava
    merged.to(dtype).save_pretrained(partial)
    AutoProcessor.from_pretrained(cfg.model.base).save_pretrained(partial)
    shutil.copy(ckpt / "config.yaml", partial / "train_config.yaml")
    partial.rename(out)
    log.info("exported %s -> %s", ckpt, out)
    return out
