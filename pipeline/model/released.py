"""The authors' released DiViCo weights (github.com/pzrain/DiViCo) -> an export of this project.

    divico import released --lora DIR --base PATH_OR_HUB_ID --out EXPORT_DIR [--dtype bf16]

DIR is what their training saves: a PEFT LoRA adapter (adapter_config.json, adapter_model
.safetensors or .bin) for the liuhaotian-format LLaVA-1.5 (modules model.layers.N.*), and
non_lora_trainables.bin, a torch pickle of tensors: the projector (model.mm_projector.0 and .2)
and the gap encoder (model.disen_encoder.0: Linear 2d -> d, .1: Linear d -> 2d), its keys
prefixed with module.base_model.model. (a checkpoint-N folder, saved through the DeepSpeed
engine) or base_model.model. (the final save). --base is llava-hf's conversion of the same
LLaVA-1.5 (llava-hf/llava-1.5-7b-hf, or a local copy): the adapter is renamed onto its
language model (model.layers.N -> model.language_model.layers.N) and merged by PEFT, the
projector replaces its multi_modal_projector.linear_1/2, the gap encoder becomes this
project's (fc1, fc2), and the export is written as `divico export` writes one (merged Hugging
Face folder, processor, divico.json, divico.safetensors), so `divico eval`, the reports,
lmms-eval and the MoE warm start read it like any other.

The settings are the released code's: mode divico, tau 1/9, K = 2, selection by the last
position's attention (query: last), the released KL, sigma0 0.075, its beta 0.05 and its
token counts (counts: released: int(tau N) kept, the lowest int((1 - tau) N) pooled; at tau
1/9 of 576 these equal the project's rule, at 1/15 one token drops out of the pool). The pickle
is read with torch.load(weights_only=True). Exit status 1, one line naming the file and key,
for a folder that does not hold this: a missing adapter or pickle, keys that map nowhere, keys
missing, a value that is not a tensor, shapes that do not fit the base.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from pipeline.contract import EXIT_FAILURE, EXIT_OK
from pipeline.durable import folder_written_whole
from pipeline.model.settings import DiViCoConfig

log = logging.getLogger(__name__)

TRAINABLES = "non_lora_trainables.bin"
PREFIXES = ("module.base_model.model.", "base_model.model.")  # as saved through the engine, and by the final save
# The released code's settings (their modeling_disen_llama.py hard-codes them).
RELEASED = DiViCoConfig(mode="divico", tau=1 / 9, layer=2, query="last", kl="released", sigma0=0.075, beta=0.05,
                        counts="released")
# liuhaotian names -> llava-hf (transformers 5) names of the trainables, and the gap encoder's.
PROJECTOR = {"model.mm_projector.0": "linear_1", "model.mm_projector.2": "linear_2"}
GAP_ENCODER = {"model.disen_encoder.0": "fc1", "model.disen_encoder.1": "fc2"}
ADAPTER_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.(lora_[AB]\.weight)")


class ReleasedFormatError(ValueError):
    """The folder does not hold the released format; the message names the file and key."""


def read_trainables(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """non_lora_trainables.bin as {"projector": {linear_1.weight, ...}, "gap_encoder": {fc1.weight, ...}}."""
    if not path.is_file():
        raise ReleasedFormatError(f"{path}: not found (the released folder's projector and gap encoder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ReleasedFormatError(f"{path}: not a pickle of plain tensors ({str(error).splitlines()[0]})") from error
    if not isinstance(state, dict):
        raise ReleasedFormatError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
    parts: dict[str, dict[str, torch.Tensor]] = {"projector": {}, "gap_encoder": {}}
    unknown = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ReleasedFormatError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor")
        name = next((key[len(prefix):] for prefix in PREFIXES if key.startswith(prefix)), key)
        module, _, leaf = name.rpartition(".")
        if module in PROJECTOR and leaf in ("weight", "bias"):
            parts["projector"][f"{PROJECTOR[module]}.{leaf}"] = value
        elif module in GAP_ENCODER and leaf in ("weight", "bias"):
            parts["gap_encoder"][f"{GAP_ENCODER[module]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ReleasedFormatError(f"{path}: keys that are neither the projector nor the gap encoder: {unknown}")
    for part, names in (("projector", PROJECTOR.values()), ("gap_encoder", GAP_ENCODER.values())):
        missing = [f"{name}.{leaf}" for name in names for leaf in ("weight", "bias")
                   if f"{name}.{leaf}" not in parts[part]]
        if missing:
            raise ReleasedFormatError(f"{path}: the {part} lacks {missing}")
    return parts


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config and its weights renamed onto llava-hf's language model, as PEFT's
    state-dict keys for a LlavaForConditionalGeneration."""
    from peft.utils import load_peft_weights

    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ReleasedFormatError(f"{config_path}: not found (the released folder's LoRA adapter)")
    try:
        weights = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError) as error:
        raise ReleasedFormatError(f"{folder}: cannot read the adapter weights ({error})") from error
    renamed, unknown = {}, []
    for key, value in weights.items():
        match = ADAPTER_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        layer, module, leaf = match.groups()
        renamed[f"base_model.model.model.language_model.layers.{layer}.{module}.{leaf}"] = value
    if unknown:
        raise ReleasedFormatError(f"{folder}: adapter keys outside the language model's layers: {unknown[:5]}"
                                  + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    if not renamed:
        raise ReleasedFormatError(f"{folder}: the adapter holds no LoRA weights")
    return json.loads(config_path.read_text()), renamed


def import_released(lora: str | Path, base: str, out: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the export (see the module docstring); returns `out`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.model.compressed_llava import CompressedLlava

    lora, out = Path(lora), Path(out)
    if out.exists():
        raise ReleasedFormatError(f"--out {out} exists; choose a new folder")
    trainables = read_trainables(lora / TRAINABLES)
    adapter_config, adapter = read_adapter(lora)
    processor = AutoProcessor.from_pretrained(base)
    llava = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    targets = sorted({key.split(".lora_")[0].removeprefix("base_model.model.") for key in adapter})
    config = LoraConfig(r=adapter_config["r"], lora_alpha=adapter_config["lora_alpha"],
                        use_rslora=adapter_config.get("use_rslora", False), target_modules=targets)
    model = get_peft_model(llava, config)
    try:
        loaded = set_peft_model_state_dict(model, adapter)
    except RuntimeError as error:  # LoRA shapes of another model size
        raise ReleasedFormatError(f"{lora}: the adapter does not fit {base}: {str(error).splitlines()[-1].strip()}"
                                  ) from error
    if loaded.unexpected_keys:
        raise ReleasedFormatError(f"{lora}: adapter weights the base has no module for: {loaded.unexpected_keys[:5]}")
    llava = model.merge_and_unload()
    try:
        llava.model.multi_modal_projector.load_state_dict(trainables["projector"])
        wrapper = CompressedLlava(llava, RELEASED)
        wrapper.divico.gap_encoder.load_state_dict(trainables["gap_encoder"])
    except RuntimeError as error:  # shapes of another model size
        raise ReleasedFormatError(f"{lora / TRAINABLES}: does not fit {base}: {str(error).splitlines()[-1].strip()}"
                                  ) from error
    with folder_written_whole(out) as partial:
        wrapper.save_divico(partial)
        llava.to(dtype).save_pretrained(partial)
        processor.save_pretrained(partial)
    log.info("imported %s on %s -> %s", lora, base, out)
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("released", help="the authors' released DiViCo weights -> an export",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", required=True, type=Path,
                        help="the released folder (adapter + non_lora_trainables.bin)")
    parser.add_argument("--base", required=True,
                        help="llava-hf's LLaVA-1.5 (hub id or folder) the weights were trained on")
    parser.add_argument("--out", required=True, type=Path, help="the export folder to write (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        print(import_released(args.lora, args.base, args.out, dtype=DTYPES[args.dtype]))
    except (ReleasedFormatError, OSError) as error:
        log.error("%s", error)
        return EXIT_FAILURE
    return EXIT_OK
