"""`divico report overlay`: the visual tokens a model keeps, drawn over the image (the paper's
Fig. 6). Kept patches are outlined, the dropped ones darkened, on the square the vision tower
sees ("pad": the image centred on its mean-colour square; "none": the centre square the
processor crops).

    divico report overlay --model DIR --image FILE --question TEXT [--tau T] [--mode M] --out FILE.png

mode/tau override the model's settings as in `divico eval` (a plain model needs --mode, e.g.
fastv). `divico train` draws the same overlay for a few fixed held-out images into TensorBoard
as training goes (train.overlay_every, pipeline/train/main.py).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipeline.train.config import ConfigError
from pipeline.contract import EXIT_BAD_INPUT, EXIT_FAILURE
from pipeline.data.collator import LlavaCollator, pad_to_square
from pipeline.data.loader import Sample
from pipeline.data.settings import CollatorSettings
from pipeline.eval.data import one_question
from pipeline.model.compressed_llava import CompressedLlava

log = logging.getLogger(__name__)

DISPLAY_SIDE = 336  # pixels; LLaVA-1.5's input size


@torch.inference_mode()
def kept_visual_tokens(model: CompressedLlava, collator: LlavaCollator, samples: list[Sample]) -> torch.Tensor:
    """(B, V) bool: which of each sample's V visual tokens `model` keeps when asked its first
    question (selection on the prompt, as in generation). The model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    try:
        batch = collator.prompts(samples)
        device = next(model.parameters()).device
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        input_ids = batch["input_ids"].to(device)
        out = model(input_ids, batch["attention_mask"].to(device), batch["pixel_values"].to(device, dtype),
                    query_positions=batch["query_positions"].to(device), logits_to_keep=1)
    finally:
        model.train(was_training)
    image_mask = input_ids == model.llava.config.image_token_id
    kept = torch.zeros_like(image_mask)
    positions = out.compressed_positions
    kept.scatter_(1, positions.clamp(min=0), positions >= 0)
    return (kept & image_mask)[image_mask].view(len(samples), -1).cpu()


def draw(image: Image.Image, kept: torch.Tensor, collator: LlavaCollator) -> Image.Image:
    """`image` as the vision tower sees it, DISPLAY_SIDE square, with the kept patches of the
    sqrt(V) x sqrt(V) grid outlined and the others darkened."""
    image = image.convert("RGB")
    if collator.config.image_aspect_ratio == "pad":
        square = pad_to_square(image, collator.fill)
    else:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
    canvas = square.resize((DISPLAY_SIDE, DISPLAY_SIDE)).convert("RGBA")
    grid = math.isqrt(kept.numel())
    if grid * grid != kept.numel():
        raise ValueError(f"{kept.numel()} visual tokens do not form a square grid")
    shade = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(shade)
    cell = DISPLAY_SIDE / grid
    for index, keep in enumerate(kept.tolist()):
        row, column = divmod(index, grid)
        box = (column * cell, row * cell, (column + 1) * cell - 1, (row + 1) * cell - 1)
        if keep:
            pen.rectangle(box, outline=(255, 220, 0, 255), width=max(1, round(cell / 8)))
        else:
            pen.rectangle(box, fill=(0, 0, 0, 160))
    return Image.alpha_composite(canvas, shade).convert("RGB")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("overlay", help="the visual tokens a model keeps, drawn over an image",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--mode", default=None, help="override the model's mode (a plain model needs one)")
    parser.add_argument("--tau", type=float, default=None, help="override the model's tau")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from pipeline.eval.config import EvalError
    from pipeline.eval.main import load_collator, load_model, model_settings

    try:
        settings = model_settings(args.model, mode=args.mode, tau=args.tau)
        if settings is None or not settings.compresses:
            raise ConfigError(f"--model {args.model}: does not compress (give --mode, e.g. fastv, and --tau)")
        try:
            with Image.open(args.image) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise ConfigError(f"--image {args.image}: not a readable image ({error})") from error
        model = load_model(args.model, mode=args.mode, tau=args.tau, device=args.device)
        collator = load_collator(args.model, CollatorSettings())
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    except EvalError as error:
        log.error("%s", error)
        return EXIT_FAILURE
    kept = kept_visual_tokens(model, collator, [one_question(image, args.question)])[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(image, kept, collator).save(args.out)
    print(f"{args.out}: {int(kept.sum())} of {kept.numel()} visual tokens kept (mode {settings.mode}, "
          f"tau {settings.tau:.3f})")
    return 0
