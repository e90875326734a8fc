"""The grid task (data_prep/grid.py, `divico prep synth --task grid`): determinism, and every
answer right for its drawn scene, checked by reading the question back against the scene
description (an independent solver) and the scene back from the pixels."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import grid
from data_prep.synth import SynthConfig, generate
from pipeline.cli import main as divico
from pipeline.contract import DATA_FILE, EXIT_BAD_INPUT

CELL_QUESTION = re.compile(r"What (color is the shape|shape is) in row (\d), column (\d)\?")
RELATION_QUESTION = re.compile(r"What color is the shape (right of|left of|above|below) the (\w+) (\w+)\?")
COUNT_QUESTION = re.compile(r"How many (\w+) shapes are there\?")
EXISTS_QUESTION = re.compile(r"Is there a (\w+) (\w+) in the image\?")
STEP = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


def solve(question: str, scene: grid.Scene) -> tuple[str, str]:
    """(kind, answer) of a grid question, worked out from the scene alone."""
    if match := CELL_QUESTION.fullmatch(question):
        color, shape = scene[(int(match[2]) - 1, int(match[3]) - 1)]
        return "cell", color if match[1].startswith("color") else shape
    if match := RELATION_QUESTION.fullmatch(question):
        (row, col), = [cell for cell, obj in scene.items() if obj == (match[2], match[3])]  # exactly one
        dr, dc = STEP[match[1]]
        return "relation", scene[(row + dr, col + dc)][0]
    if match := COUNT_QUESTION.fullmatch(question):
        return "count", str(sum(color == match[1] for color, _ in scene.values()))
    if match := EXISTS_QUESTION.fullmatch(question):
        return "exists", "yes" if (match[1], match[2]) in scene.values() else "no"
    raise AssertionError(f"not a grid question: {question!r}")


def read_scene(image: Image.Image) -> dict[tuple[int, int], str]:
    """The colour at each cell's centre, where an object is drawn (every shape covers its centre)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    scene = {}
    for row in range(grid.GRID):
        for col in range(grid.GRID):
            centre = pixels[int((row + 0.5) * grid.CELL), int((col + 0.5) * grid.CELL)]
            name, rgb = min(grid.COLORS.items(), key=lambda item: np.abs(centre - item[1]).sum())
            if np.abs(centre - rgb).sum() < 60:
                scene[(row, col)] = name
    return scene


def test_every_answer_is_right_for_its_scene() -> None:
    rng = random.Random(0)
    kinds = Counter()
    for _ in range(400):
        scene = grid.random_scene(rng)
        assert grid.MIN_OBJECTS <= len(scene) <= grid.MAX_OBJECTS
        assert max(Counter(color for color, _ in scene.values()).values()) <= grid.MAX_COUNT
        assert read_scene(grid.draw(scene)) == {cell: color for cell, (color, _) in scene.items()}
        for kind in grid.QUESTION_KINDS:
            question, answer = grid.question(rng, scene, kind)
            solved_kind, solved = solve(question, scene)
            assert answer == solved, (question, scene)
            assert grid.kind_of(question) == solved_kind
            kinds[solved_kind] += 1
    assert kinds["relation"] > 380  # the fallback to a cell question is rare
    with pytest.raises(ValueError, match="question kind 'colour'"):
        grid.question(rng, scene, "colour")


def test_the_description_lists_every_cell_row_by_row() -> None:
    scene = {(0, 0): ("red", "circle"), (0, 5): ("blue", "cross"), (5, 2): ("cyan", "triangle")}
    question, answer = grid.describe(scene)
    rows = [row.split(": ")[1].split(", ") for row in answer.split("; ")]
    assert [row.split(": ")[0] for row in answer.split("; ")] == [f"row {n}" for n in range(1, grid.GRID + 1)]
    assert grid.kind_of(question) == "describe" and len(rows) == grid.GRID
    assert rows[0] == ["red circle", "empty", "empty", "empty", "empty", "blue cross"]
    assert rows[5][2] == "cyan triangle" and sum(cell != "empty" for row in rows for cell in row) == 3


def test_exists_questions_are_balanced() -> None:
    rng = random.Random(1)
    answers = Counter(grid.question(rng, grid.random_scene(rng), "exists")[1] for _ in range(2000))
    assert abs(answers["yes"] - answers["no"]) < 150


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def test_synth_grid_is_deterministic_and_answers_match_its_images(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, 5), (second, 5), (other, 6)):
        generate(SynthConfig(out=out, num_samples=60, seed=seed, task="grid", questions=1))
    assert _digest(first) == _digest(second) != _digest(other)
    entries = json.loads((first / DATA_FILE).read_text())
    assert len(entries) == 60 and all(entry["image"] for entry in entries)
    kinds = Counter(entry["question_type"] for entry in entries)  # in turn; a relation may fall back to a cell
    assert kinds["count"] == kinds["exists"] == 15 and kinds["cell"] + kinds["relation"] == 30
    for entry in entries:
        question = entry["conversations"][0]["value"].replace("<image>", "").strip().splitlines()[0]
        with Image.open(first / "images" / entry["image"]) as image:
            assert image.size == (grid.IMAGE_SIZE, grid.IMAGE_SIZE)
            colors = read_scene(image)
        kind, _ = solve_from_colors(question, colors, entry["conversations"][1]["value"])
        assert kind == entry["question_type"]


def solve_from_colors(question: str, colors: dict[tuple[int, int], str], answer: str) -> tuple[str, str]:
    """Check what the pixels can confirm of an answer (colours; shapes are not read back)."""
    if match := CELL_QUESTION.fullmatch(question):
        cell = (int(match[2]) - 1, int(match[3]) - 1)
        assert cell in colors
        if match[1].startswith("color"):
            assert colors[cell] == answer
        return "cell", answer
    if match := COUNT_QUESTION.fullmatch(question):
        assert str(sum(color == match[1] for color in colors.values())) == answer
        return "count", answer
    if RELATION_QUESTION.fullmatch(question):
        assert answer in colors.values()
        return "relation", answer
    assert EXISTS_QUESTION.fullmatch(question) and answer in ("yes", "no")
    return "exists", answer


def test_synth_questions_flag_needs_the_grid_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_status:
        divico(["prep", "synth", "--out", str(tmp_path / "x"), "--questions", "1"])
    assert exit_status.value.code == EXIT_BAD_INPUT
    assert "--questions 1" in capsys.readouterr().err
