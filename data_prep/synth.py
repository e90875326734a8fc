"""`divico prep synth`: a small, learnable dataset in the exact llava_v1_5_mix665k.json format.

Images hold 1-3 large shapes of one colour in cells of a 3x3 grid (or one large rendered
word) on a light background, sized so they survive the tiny model's 140 px / 14 px-patch view;
a shape covers a few of the 100 patches, so which visual tokens are kept decides the answer.
Questions (most image entries have 2-4 turns, as VQAv2/GQA entries in the real file do):
  - whole picture, from the shapes' colour and amount (most of the mix, so a small model
    learns them from a few thousand samples): "What color is the circle?", counting
    ("How many shapes are there in the image?"), POPE-style "Is there a red circle in the
    image?" (half present, half with a colour the scene lacks)
  - local, bound to one cell: "What color is the shape in the top left of the image?",
    "What shape is in the bottom right of the image?"
  - TextVQA-style "What word is written in the image?" (mostly ocr_vqa/textvqa folders)
Answers come from small vocabularies (4 colours, 3 shapes, counts 1-3, yes/no, 8 words), so
chance level is clear. About 6% of entries are text-only (arithmetic, word questions).
Sources, folder names, id styles and the <image> placement follow the real file.

`--task grid` writes the grid task instead (data_prep/grid.py: one small object per patch and
one-word questions, for `divico bench accuracy`): image entries only, each with its first
question's kind as "question_type", `--questions N` per image (kinds in turn, so a held-out set
of N = 1 is balanced across kinds), `--grid-side` cells per side, `--kinds` the kinds asked.

`--defects RATE` gives that share of entries one of the real file's defects (see DEFECTS);
GIF/PNG bytes under .jpg names are valid images the shard step must convert, the rest must
be rejected. Everything is drawn from one seeded generator: same seed, same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep import grid
from pipeline.contract import DATA_FILE, IMAGE_TOKEN
from pipeline.durable import folder_written_whole

log = logging.getLogger(__name__)

SHORT_ANSWER = "Answer the question using a single word or phrase."

# (source, folder, share of llava_v1_5_mix665k.json), from the real per-folder counts.
FOLDERS = [("coco", "coco/train2017", 364100), ("gqa", "gqa/images", 72140),
           ("ocr_vqa", "ocr_vqa/images", 80000), ("textvqa", "textvqa/train_images", 21953),
           ("vg", "vg/VG_100K", 43209), ("vg", "vg/VG_100K_2", 43208), ("text", None, 40688)]

COLORS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 220),
          "yellow": (240, 200, 0)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "DOG", "SUN", "BUS", "CAR", "MAP", "BOX", "PEN")
POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left",
             (1, 1): "center", (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom",
             (2, 2): "bottom right"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Defects of the real file (reference-notes.md). The first two are valid images in the
# wrong container; the others must end in rejected.jsonl.
DEFECTS = ("gif_as_jpg", "png_as_jpg", "missing_file", "empty_file", "truncated_jpeg",
           "not_object", "missing_conversations", "empty_value", "non_string_value",
           "bad_role_order", "marker_count", "marker_without_image", "absolute_path",
           "dotdot_path", "symlink_outside")


@dataclass
class SynthConfig:
    out: Path
    num_samples: int = 3000
    seed: int = 0
    defects: float = 0.0
    width: int = 336
    height: int = 336
    realistic: bool = False   # textured 640x480 photos-sized JPEGs (~100 KB) for benchmarks
    jpeg_quality: int = 90
    text_only: bool = True    # include the ~6% text-only entries (benchmarks want images only)
    task: str = "shapes"      # or "grid" (TASKS)
    questions: int | None = None  # grid: questions per image (None: 1-4 as the real file's turns)
    grid_side: int = grid.DEFAULT_SIDE
    kinds: tuple[str, ...] = grid.HEADLINE_KINDS  # grid: the question kinds asked, in turn


TASKS = ("shapes", "grid")


# ---------------------------------------------------------------------------- images

def draw_scene(cells: dict[tuple[int, int], tuple[str, str]], size: tuple[int, int],
               background: Image.Image | None = None) -> Image.Image:
    """3x3 grid; each occupied cell holds one shape filling ~70% of the cell."""
    w, h = size
    img = background.copy() if background is not None else Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for (row, col), (color, shape) in cells.items():
        cx, cy = (col + 0.5) * w / 3, (row + 0.5) * h / 3
        r = 0.4 * min(w, h) / 3
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill, outline=(0, 0, 0), width=2)
        elif shape == "square":
            draw.rectangle(box, fill=fill, outline=(0, 0, 0), width=2)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill,
                         outline=(0, 0, 0))
    return img


def draw_word(word: str, size: tuple[int, int], background: Image.Image | None = None) -> Image.Image:
    """One large black word on a white sign, centred (PIL's default font, scaled)."""
    w, h = size
    img = background.copy() if background is not None else Image.new("RGB", size, (235, 235, 235))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(min(w, h) * 0.28))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    tw, th = right - left, bottom - top
    x, y = (w - tw) / 2 - left, (h - th) / 2 - top
    pad = 0.06 * min(w, h)
    draw.rectangle((x + left - pad, y + top - pad, x + right + pad, y + bottom + pad),
                   fill=(255, 255, 255), outline=(0, 0, 0), width=3)
    draw.text((x, y), word, fill=(0, 0, 0), font=font)
    return img


def textured_background(rng: random.Random, size: tuple[int, int],
                        grains: list[np.ndarray]) -> Image.Image:
    """Photo-like texture: smooth colour blobs plus film grain, so JPEGs have a realistic size
    (~100 KB at 640x480). The grain comes from a few precomputed fields (it is costly)."""
    w, h = size
    coarse = np.random.default_rng(rng.getrandbits(64)).integers(
        150, 230, size=(h // 16, w // 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BILINEAR), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + rng.choice(grains), 0, 255).astype(np.uint8))


def grain_fields(rng: random.Random, size: tuple[int, int], count: int = 8) -> list[np.ndarray]:
    noise = np.random.default_rng(rng.getrandbits(64))
    return [noise.integers(-20, 21, size=(size[1], size[0], 3), dtype=np.int16) for _ in range(count)]


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "GIF":
        img.convert("P", palette=Image.ADAPTIVE, colors=64).save(out, format="GIF")
    elif fmt == "PNG":
        img.save(out, format="PNG")
    else:
        img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ---------------------------------------------------------------------------- questions

def ask(rng: random.Random, question: str) -> str:
    return f"{question}\n{SHORT_ANSWER}" if rng.random() < 0.5 else question


# Question kinds of a scene and their shares. Most can be answered from the colour and amount
# of the (few, large) shapes, which a small model picks up from a few thousand samples; the
# position-bound ones need the right cell's tokens.
SCENE_KINDS = {"color": 0.3, "count": 0.2, "pope": 0.3, "color_at": 0.1, "shape_at": 0.1}


def scene_questions(rng: random.Random, cells: dict, n: int) -> list[tuple[str, str]]:
    """n question/answer pairs about a scene, mixing local and whole-picture questions."""
    qa = []
    present = sorted(set(cells.values()))
    for kind in rng.choices(list(SCENE_KINDS), list(SCENE_KINDS.values()), k=n):
        if kind in ("color_at", "shape_at"):
            cell = rng.choice(sorted(cells))
            color, shape = cells[cell]
            where = POSITIONS[cell]
            qa.append((f"What color is the shape in the {where} of the image?", color)
                      if kind == "color_at" else (f"What shape is in the {where} of the image?", shape))
        elif kind == "color":
            color, shape = rng.choice(present)
            qa.append((f"What color is the {shape}?", color))
        elif kind == "count":
            qa.append(("How many shapes are there in the image?", str(len(cells))))
        else:
            # POPE: half the objects asked about are present; an absent one has a colour the
            # scene lacks (POPE's "random" negatives).
            yes = rng.random() < 0.5
            if yes:
                color, shape = rng.choice(present)
            else:
                color = rng.choice([c for c in COLORS if c != present[0][0]])
                shape = rng.choice(SHAPES)
            qa.append((f"Is there a {color} {shape} in the image?", "yes" if yes else "no"))
    return qa


def random_scene(rng: random.Random) -> dict[tuple[int, int], tuple[str, str]]:
    """1 to 3 large shapes of one colour in distinct cells (the count drawn uniformly, so
    counting answers are balanced); shapes vary."""
    color = rng.choice(sorted(COLORS))
    cells = rng.sample(sorted(POSITIONS), rng.randint(1, 3))
    return {cell: (color, rng.choice(SHAPES)) for cell in cells}


def text_only_turns(rng: random.Random) -> list[tuple[str, str]]:
    turns = []
    for _ in range(rng.choice((1, 1, 2))):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if rng.random() < 0.5 or a < b:
                turns.append((f"What is {a} plus {b}?", str(a + b)))
            else:
                turns.append((f"What is {a} minus {b}?", str(a - b)))
        elif kind == 1:
            word = rng.choice(WORDS).lower() + rng.choice(("", "s"))
            turns.append((f"How many letters are in the word '{word}'?", NUMBER_WORDS[len(word)]))
        else:
            x, y = rng.sample(WORDS, 2)
            turns.append((f"Which word comes first in alphabetical order: {x.lower()} or "
                          f"{y.lower()}?", min(x, y).lower()))
    return [(ask(rng, q), a) for q, a in turns]


def conversation(rng: random.Random, qa: list[tuple[str, str]], with_image: bool) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(qa):
        if i == 0 and with_image:
            q = f"{IMAGE_TOKEN}\n{q}" if rng.random() < 0.7 else f"{q}\n{IMAGE_TOKEN}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


# ---------------------------------------------------------------------------- dataset

def _image_name(rng: random.Random, source: str, folder: str, used: set) -> tuple[str, str]:
    while True:
        if source == "coco":
            entry_id = f"{rng.randrange(10**6):012d}"
        elif source == "gqa":
            entry_id = f"n{rng.randrange(10**6)}"
        elif source == "ocr_vqa":
            entry_id = f"{rng.randrange(10**10):010d}"
        elif source == "textvqa":
            entry_id = f"{rng.getrandbits(64):016x}"
        else:
            entry_id = str(rng.randrange(1, 2_500_000))
        path = f"{folder}/{entry_id}.jpg"
        if path not in used:
            used.add(path)
            return entry_id, path


def _sharegpt_id(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(rng.choice(alphabet) for _ in range(7)) + f"_{rng.randrange(8)}"


def _apply_entry_defect(rng: random.Random, kind: str, entry: dict) -> object:
    turns = entry["conversations"]
    if kind == "not_object":
        return rng.choice([turns, entry["id"], None])
    if kind == "missing_conversations":
        del entry["conversations"]
    elif kind == "empty_value":
        turns[-1]["value"] = ""
    elif kind == "non_string_value":
        turns[-1]["value"] = rng.choice([42, None, ["yes"]])
    elif kind == "bad_role_order":
        turns[0]["from"], turns[1]["from"] = "gpt", "human"
    elif kind == "marker_count":
        first = turns[0]["value"].replace(IMAGE_TOKEN, "").strip()
        turns[0]["value"] = first if rng.random() < 0.5 else f"{IMAGE_TOKEN}\n{first}\n{IMAGE_TOKEN}"
    elif kind == "marker_without_image":
        turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    return entry


def generate(cfg: SynthConfig) -> Path:
    """Write OUT/llava_v1_5_mix665k.json and OUT/images/...; returns the JSON path.

    Everything is written into OUT.tmp/ and renamed to OUT at the end (every path inside is
    relative), so an interrupted run leaves no half dataset: running it again starts afresh."""
    if cfg.task not in TASKS:
        raise ValueError(f"task {cfg.task!r}: expected one of {TASKS}")
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise FileExistsError(f"{cfg.out} already holds files; choose an empty folder")
    with folder_written_whole(cfg.out) as partial:
        rng = random.Random(cfg.seed)
        size = (640, 480) if cfg.realistic else (cfg.width, cfg.height)
        if cfg.task == "grid":
            size = (grid.image_size(cfg.grid_side),) * 2
        root = partial / "images"
        outside = partial / "outside"   # targets of the escaping-path defects
        for _, folder, _ in FOLDERS:
            if folder:
                (root / folder).mkdir(parents=True, exist_ok=True)
        folders = FOLDERS if cfg.text_only and cfg.task == "shapes" else [f for f in FOLDERS if f[0] != "text"]
        grid_entries = 0  # the first question's kind goes in turn over the grid's entries
        sources, weights = [f[:2] for f in folders], [f[2] for f in folders]
        used: set[str] = set()
        grains = grain_fields(rng, size) if cfg.realistic else []
        earlier: list[tuple[str, str, dict]] = []   # (id, image, scene) that a repeat may reuse
        entries: list[object] = []
        for _ in range(cfg.num_samples):
            defect = rng.choice(DEFECTS) if rng.random() < cfg.defects else None
            source, folder = rng.choices(sources, weights)[0]
            if source == "text":
                text_defect = defect if defect in ("not_object", "empty_value", "bad_role_order",
                                                   "marker_without_image") else None
                entry = {"id": _sharegpt_id(rng), "model": "",
                         "conversations": conversation(rng, text_only_turns(rng), with_image=False)}
                entries.append(_apply_entry_defect(rng, text_defect, entry) if text_defect else entry)
                continue
            if earlier and rng.random() < 0.03 and defect is None and cfg.task == "shapes":
                # The real file asks several datasets' questions about the same image (same id).
                entry_id, image, cells = rng.choice(earlier)
                qa = scene_questions(rng, cells, 1)
                entries.append({"id": entry_id, "image": image,
                                "conversations": conversation(rng, [(ask(rng, q), a) for q, a in qa], True)})
                continue
            entry_id, image = _image_name(rng, source, folder, used)
            background = textured_background(rng, size, grains) if cfg.realistic else None
            reading = rng.random() < (0.5 if source in ("ocr_vqa", "textvqa") else 0.02)
            kind = None
            if cfg.task == "grid":
                count = cfg.questions or rng.choices((1, 2, 3, 4), (0.4, 0.2, 0.2, 0.2))[0]
                scene, qa = grid.entry_questions(rng, cfg.grid_side, cfg.kinds, count, first=grid_entries)
                grid_entries += 1
                picture = grid.draw(scene, cfg.grid_side)
                kind = grid.kind_of(qa[0][0])
            elif reading:
                word = rng.choice(WORDS)
                picture = draw_word(word, size, background)
                qa = [("What word is written in the image?", word)]
            else:
                cells = random_scene(rng)
                picture = draw_scene(cells, size, background)
                qa = scene_questions(rng, cells, rng.choices((1, 2, 3, 4), (0.4, 0.2, 0.2, 0.2))[0])
                earlier.append((entry_id, image, cells))
            # Grid questions never carry the short-answer suffix: every answer is one word.
            asked_qa = qa if cfg.task == "grid" else [(ask(rng, q), a) for q, a in qa]
            entry = {"id": entry_id, "image": image, "conversations": conversation(rng, asked_qa, True)}
            if kind is not None:
                entry["question_type"] = kind

            fmt = {"gif_as_jpg": "GIF", "png_as_jpg": "PNG"}.get(defect, "JPEG")
            data = encode(picture, fmt, cfg.jpeg_quality)
            target = root / image
            if defect == "missing_file":
                pass
            elif defect == "empty_file":
                target.write_bytes(b"")
            elif defect == "truncated_jpeg":
                target.write_bytes(data[:len(data) * 3 // 5])
            elif defect in ("absolute_path", "dotdot_path", "symlink_outside"):
                (outside / folder).mkdir(parents=True, exist_ok=True)
                (outside / image).write_bytes(data)
                if defect == "absolute_path":
                    entry["image"] = "/" + image
                elif defect == "dotdot_path":
                    entry["image"] = f"{folder}/../../../outside/{image}"
                else:
                    depth = len(Path(image).parts) - 1
                    os.symlink("../" * (depth + 1) + f"outside/{image}", target)
            else:
                target.write_bytes(data)
            entries.append(_apply_entry_defect(rng, defect, entry) if defect else entry)

        (partial / DATA_FILE).write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    log.info("wrote %d entries to %s and images under %s", len(entries), cfg.out / DATA_FILE, cfg.out / "images")
    return cfg.out / DATA_FILE
