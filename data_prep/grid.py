"""The grid task: one small object per 14 px patch, and one-word questions about the scene.

A scene is a side x side grid (6, 8 or 10; SIDES) drawn at side * 14 px, so each cell is
exactly one patch of a 14 px-patch tower and one visual token: which visual tokens a
compression method keeps decides what the decoder can still read. A few cells hold one
object each: a shape (circle, square, triangle, cross) in one of six colours, drawn 12 px
wide inside its cell on a dark background.

Question kinds (one-word answers; chance in brackets):
  - count: "How many red shapes are there?" -> "2"                         (~1/4: mostly 0-2)
  - exists: "Is there a red cross?" -> "yes" / "no", half each               (1/2)
  - attribute, of the only object of a shape or colour: "What color is the cross?" -> "red",
    "What shape is the red one?" -> "cross"                                   (1/6, 1/4)
  - where, of the only object of its colour and shape: "Which row is the red cross in?" -> "3",
    "Which column is the red cross in?" -> "5"                                (1/side)
  - cell (harder): "What color is the shape in row 2, column 5?" (an occupied cell)
  - relation (harder): "What color is the shape right of the red cross?" (two lookups)
HEADLINE_KINDS are the benchmark's table; the harder ones are drawn only when asked for.
A question that the scene cannot pose (no unique object, no occupied neighbour) is None:
the caller asks another kind or draws another scene, so every answer is defined.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

PATCH = 14  # px per cell = the tower's patch
SIDES = (6, 8, 10)
DEFAULT_SIDE = 6
# Objects per scene by grid side: enough that counts and uniqueness vary, few enough that a
# tiny model learns the task on CPU (the learning curves in the README).
OBJECTS = {6: (3, 8), 8: (4, 12), 10: (5, 16)}
COLORS = {"red": (230, 25, 25), "green": (20, 170, 40), "blue": (40, 80, 240), "yellow": (245, 210, 0),
          "purple": (160, 50, 200), "cyan": (0, 200, 210)}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUND = (20, 20, 20)
DIRECTIONS = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}
HEADLINE_KINDS = ("count", "exists", "attribute", "where")
QUESTION_KINDS = (*HEADLINE_KINDS, "cell", "relation")

Scene = dict[tuple[int, int], tuple[str, str]]  # (row, col) from 0 -> (color, shape)


def image_size(side: int) -> int:
    return side * PATCH


def random_scene(rng: random.Random, side: int) -> Scene:
    low, high = OBJECTS[side]
    cells = rng.sample([(r, c) for r in range(side) for c in range(side)], rng.randint(low, high))
    return {cell: (rng.choice(list(COLORS)), rng.choice(SHAPES)) for cell in cells}


def draw(scene: Scene, side: int) -> Image.Image:
    """The scene at side * 14 px: each object 12 px wide, centred in its patch."""
    img = Image.new("RGB", (image_size(side), image_size(side)), BACKGROUND)
    pen = ImageDraw.Draw(img)
    for (row, col), (color, shape) in scene.items():
        left, top = col * PATCH + 1, row * PATCH + 1
        right, bottom = left + 11, top + 11
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse((left, top, right, bottom), fill=fill)
        elif shape == "square":
            pen.rectangle((left + 1, top + 1, right - 1, bottom - 1), fill=fill)
        elif shape == "triangle":
            pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
        else:
            pen.rectangle((left, top + 4, right, bottom - 4), fill=fill)
            pen.rectangle((left + 4, top, right - 4, bottom), fill=fill)
    return img


def _unique(scene: Scene, key) -> list[tuple[tuple[int, int], tuple[str, str]]]:
    """The objects whose key(object) no other object of the scene shares."""
    keys = [key(obj) for obj in scene.values()]
    return [(cell, obj) for cell, obj in sorted(scene.items()) if keys.count(key(obj)) == 1]


def _count(rng: random.Random, scene: Scene, side: int) -> tuple[str, str]:
    color = rng.choice(list(COLORS))
    return f"How many {color} shapes are there?", str(sum(c == color for c, _ in scene.values()))


def _exists(rng: random.Random, scene: Scene, side: int) -> tuple[str, str]:
    present = sorted(set(scene.values()))
    if rng.random() < 0.5:
        (color, shape), answer = rng.choice(present), "yes"
    else:
        (color, shape), answer = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]), "no"
    return f"Is there a {color} {shape}?", answer


def _attribute(rng: random.Random, scene: Scene, side: int) -> tuple[str, str] | None:
    forms = [("color", obj) for _, obj in _unique(scene, lambda o: o[1])]
    forms += [("shape", obj) for _, obj in _unique(scene, lambda o: o[0])]
    if not forms:
        return None
    asked, (color, shape) = rng.choice(forms)
    if asked == "color":
        return f"What color is the {shape}?", color
    return f"What shape is the {color} one?", shape


def _where(rng: random.Random, scene: Scene, side: int) -> tuple[str, str] | None:
    unique = _unique(scene, lambda o: o)
    if not unique:
        return None
    (row, col), (color, shape) = rng.choice(unique)
    if rng.random() < 0.5:
        return f"Which row is the {color} {shape} in?", str(row + 1)
    return f"Which column is the {color} {shape} in?", str(col + 1)


def _cell(rng: random.Random, scene: Scene, side: int) -> tuple[str, str]:
    (row, col), (color, _) = rng.choice(sorted(scene.items()))
    return f"What color is the shape in row {row + 1}, column {col + 1}?", color


def _relation(rng: random.Random, scene: Scene, side: int) -> tuple[str, str] | None:
    candidates = [(obj, direction, scene[(row + dr, col + dc)][0])
                  for (row, col), obj in _unique(scene, lambda o: o)
                  for direction, (dr, dc) in DIRECTIONS.items() if (row + dr, col + dc) in scene]
    if not candidates:
        return None
    (color, shape), direction, answer = rng.choice(candidates)
    return f"What color is the shape {direction} the {color} {shape}?", answer


_ASK = {"count": _count, "exists": _exists, "attribute": _attribute, "where": _where, "cell": _cell,
        "relation": _relation}


def question(rng: random.Random, scene: Scene, kind: str, side: int) -> tuple[str, str] | None:
    """One (question, answer) of `kind` about `scene`, or None when the scene cannot pose it."""
    if kind not in _ASK:
        raise ValueError(f"question kind {kind!r}: expected one of {QUESTION_KINDS}")
    return _ASK[kind](rng, scene, side)


def kind_of(question_text: str) -> str:
    """The kind of a question this module wrote (the inverse of `question`, for scoring)."""
    if question_text.startswith("How many"):
        return "count"
    if question_text.startswith("Is there"):
        return "exists"
    if question_text.startswith("Which"):
        return "where"
    if " in row " in question_text:
        return "cell"
    if question_text.startswith("What color is the shape "):
        return "relation"
    return "attribute"


def entry_questions(rng: random.Random, side: int, kinds: tuple[str, ...], count: int,
                    first: int) -> tuple[Scene, list[tuple[str, str]]]:
    """A scene and `count` distinct questions about it, kinds in turn from kinds[first % len]: a
    kind the scene cannot pose (or has no new question of) passes its turn to the next one, and a
    scene that cannot pose the first question's kind is drawn again (so a one-question set keeps
    its kinds balanced). `count` must not exceed what the scene can pose: counts and yes/no
    questions always give well over ten."""
    while True:
        scene = random_scene(rng, side)
        asked = question(rng, scene, kinds[first % len(kinds)], side)
        if asked is not None:
            break
    questions = [asked]
    turn = first + 1
    while len(questions) < count:
        for offset in range(len(kinds)):
            asked = _new_question(rng, scene, kinds[(turn + offset) % len(kinds)], side, questions)
            if asked is not None:
                questions.append(asked)
                break
        turn += 1
    return scene, questions


def _new_question(rng: random.Random, scene: Scene, kind: str, side: int,
                  asked: list[tuple[str, str]], tries: int = 8) -> tuple[str, str] | None:
    """A question of `kind` not yet in `asked` (a repeat's answer could be copied from the
    sequence), or None after `tries` draws."""
    for _ in range(tries):
        drawn = question(rng, scene, kind, side)
        if drawn is None:
            return None
        if drawn not in asked:
            return drawn
    return None
