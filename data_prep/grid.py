"""The grid task: scenes of many small local facts, and questions that need specific regions.

A scene is a 6x6 grid of cells, 12 to 20 of them holding one object each: a shape (circle,
square, triangle, cross) in one of six saturated colours. Drawn at 168 px, a cell is 28 px,
exactly 2x2 of a 14 px-patch tower's 144 patches, so every fact lives in four visual tokens
and a tower without attention layers (the debug LLaVA's) cannot spread it to the others:
which visual tokens a compression method keeps decides what the decoder can still read.

Question kinds (QUESTION_KINDS), each answered from the scene description alone:
  - cell: "What color is the shape in row 2, column 5?" / "What shape is in row 2, column 5?"
  - relation: "What color is the shape right of the blue cross?" (the reference object is the
    only one of its colour and shape; the neighbour cell is occupied): two lookups, the second
    depending on the first, so layers after the compression layer must still read the image
  - count: "How many green shapes are there?" (0 to 5)
  - exists: "Is there a red circle in the image?" (half yes, half an absent pair)
Chance is about 1/6 (colours), 1/4 (shapes), 1/6 (counts) and 1/2 (yes/no).

Training images may also open with "Describe the grid row by row." answered cell by cell
("row 1: red circle, empty, ...; row 2: ..."), LLaVA's caption stage in miniature: every answer token is
supervised by one cell, which breaks the plateau where a from-scratch tiny model otherwise
sits at chance on the questions (measured: no kind above chance after 16k samples without it).
It is never asked in held-out sets.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

GRID = 6  # cells per side
CELL = 28  # px per cell at the task's image size
IMAGE_SIZE = GRID * CELL  # 168 px: 12 x 12 patches of 14 px
COLORS = {"red": (230, 25, 25), "green": (20, 170, 40), "blue": (30, 60, 230), "yellow": (245, 210, 0),
          "purple": (150, 40, 190), "cyan": (0, 200, 210)}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}
QUESTION_KINDS = ("cell", "relation", "count", "exists")  # the evaluated kinds
DESCRIBE = "Describe the grid row by row."
DESCRIBE_SHARE = 0.5  # of training images, whose first turn is the description
MIN_OBJECTS, MAX_OBJECTS = 12, 20
MAX_COUNT = 5  # colour counts are capped here when drawing a scene, so count answers stay in 0..5

Scene = dict[tuple[int, int], tuple[str, str]]  # (row, col) from 0 -> (color, shape)


def random_scene(rng: random.Random) -> Scene:
    """12-20 objects in distinct cells; no colour more than MAX_COUNT times."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(MIN_OBJECTS, MAX_OBJECTS))
    scene: Scene = {}
    used = dict.fromkeys(COLORS, 0)
    for cell in cells:
        color = rng.choice([c for c in COLORS if used[c] < MAX_COUNT])
        used[color] += 1
        scene[cell] = (color, rng.choice(SHAPES))
    return scene


def draw(scene: Scene, background: Image.Image | None = None) -> Image.Image:
    """The scene at IMAGE_SIZE px on a light background: each object fills ~80% of its cell."""
    img = background.copy() if background is not None else Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (240, 240, 240))
    pen = ImageDraw.Draw(img)
    r = 0.4 * CELL
    for (row, col), (color, shape) in scene.items():
        cx, cy = (col + 0.5) * CELL, (row + 0.5) * CELL
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "triangle":
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:
            arm = r / 2.5
            pen.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
            pen.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    return img


def _cell_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    (row, col), (color, shape) = rng.choice(sorted(scene.items()))
    where = f"row {row + 1}, column {col + 1}"
    if rng.random() < 0.5:
        return f"What color is the shape in {where}?", color
    return f"What shape is in {where}?", shape


def _relation_question(rng: random.Random, scene: Scene) -> tuple[str, str] | None:
    objects = list(scene.values())
    candidates = []
    for (row, col), obj in sorted(scene.items()):
        if objects.count(obj) != 1:
            continue
        for direction, (dr, dc) in DIRECTIONS.items():
            if (row + dr, col + dc) in scene:
                candidates.append((obj, direction, scene[(row + dr, col + dc)][0]))
    if not candidates:
        return None
    (color, shape), direction, answer = rng.choice(candidates)
    return f"What color is the shape {direction} the {color} {shape}?", answer


def _count_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    color = rng.choice(sorted(COLORS))
    return f"How many {color} shapes are there?", str(sum(c == color for c, _ in scene.values()))


def _exists_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    present = sorted(set(scene.values()))
    if rng.random() < 0.5:
        (color, shape), answer = rng.choice(present), "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        (color, shape), answer = rng.choice(absent), "no"
    return f"Is there a {color} {shape} in the image?", answer


def question(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str]:
    """One (question, answer) of `kind` about `scene`; a relation question falls back to a cell
    question in the rare scene without a unique object beside another."""
    if kind == "cell":
        return _cell_question(rng, scene)
    if kind == "relation":
        return _relation_question(rng, scene) or _cell_question(rng, scene)
    if kind == "count":
        return _count_question(rng, scene)
    if kind == "exists":
        return _exists_question(rng, scene)
    raise ValueError(f"question kind {kind!r}: expected one of {QUESTION_KINDS}")


def describe(scene: Scene) -> tuple[str, str]:
    """The row-by-row description: "row N: " and each cell's "color shape" or "empty", rows joined by "; "."""
    rows = (f"row {row + 1}: " + ", ".join(" ".join(scene[(row, col)]) if (row, col) in scene else "empty"
                                          for col in range(GRID)) for row in range(GRID))
    return DESCRIBE, "; ".join(rows)


def kind_of(question_text: str) -> str:
    """The kind of a question this module wrote (the inverse of `question`, for scoring)."""
    if question_text == DESCRIBE:
        return "describe"
    if question_text.startswith("How many"):
        return "count"
    if question_text.startswith("Is there"):
        return "exists"
    return "cell" if " in row " in question_text else "relation"
