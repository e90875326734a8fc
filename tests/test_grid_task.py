"""The grid task (data_prep/grid.py, `divico prep synth --task grid`): determinism, every answer
right for its drawn scene (checked by an independent solver that reads the question back
against the scene, and by reading the scene's colours back from the pixels), one object per
patch, balanced yes/no, and every answer word one token of the tiny model's tokenizer."""

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

COUNT = re.compile(r"How many (\w+) shapes are there\?")
EXISTS = re.compile(r"Is there a (\w+) (\w+)\?")
COLOR_OF = re.compile(r"What color is the (\w+)\?")
SHAPE_OF = re.compile(r"What shape is the (\w+) one\?")
WHERE = re.compile(r"Which (row|column) is the (\w+) (\w+) in\?")
CELL = re.compile(r"What color is the shape in row (\d+), column (\d+)\?")
RELATION = re.compile(r"What color is the shape (right of|left of|above|below) the (\w+) (\w+)\?")
STEP = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


def only(cells: list) -> object:
    assert len(cells) == 1, cells  # the question names a unique object
    return cells[0]


def solve(question: str, scene: grid.Scene) -> tuple[str, str]:
    """(kind, answer) of a grid question, worked out from the scene alone."""
    if match := COUNT.fullmatch(question):
        return "count", str(sum(color == match[1] for color, _ in scene.values()))
    if match := EXISTS.fullmatch(question):
        return "exists", "yes" if (match[1], match[2]) in scene.values() else "no"
    if match := CELL.fullmatch(question):
        return "cell", scene[(int(match[1]) - 1, int(match[2]) - 1)][0]
    if match := RELATION.fullmatch(question):
        row, col = only([cell for cell, obj in scene.items() if obj == (match[2], match[3])])
        dr, dc = STEP[match[1]]
        return "relation", scene[(row + dr, col + dc)][0]
    if match := COLOR_OF.fullmatch(question):
        return "attribute", only([color for color, shape in scene.values() if shape == match[1]])
    if match := SHAPE_OF.fullmatch(question):
        return "attribute", only([shape for color, shape in scene.values() if color == match[1]])
    if match := WHERE.fullmatch(question):
        row, col = only([cell for cell, obj in scene.items() if obj == (match[2], match[3])])
        return "where", str((row if match[1] == "row" else col) + 1)
    raise AssertionError(f"not a grid question: {question!r}")


def read_colors(image: Image.Image, side: int) -> dict[tuple[int, int], str]:
    """The colour at each patch's centre, where an object is drawn (every shape covers it)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    scene = {}
    for row in range(side):
        for col in range(side):
            centre = pixels[row * grid.PATCH + 6, col * grid.PATCH + 6]
            name, rgb = min(grid.COLORS.items(), key=lambda item: np.abs(centre - item[1]).sum())
            if np.abs(centre - rgb).sum() < 90:
                scene[(row, col)] = name
    return scene


@pytest.mark.parametrize("side", grid.SIDES)
def test_every_answer_is_right_for_its_scene(side: int) -> None:
    rng = random.Random(side)
    asked = Counter()
    for _ in range(300):
        scene = grid.random_scene(rng, side)
        low, high = grid.OBJECTS[side]
        assert low <= len(scene) <= high
        image = grid.draw(scene, side)
        assert image.size == (side * grid.PATCH,) * 2
        assert read_colors(image, side) == {cell: color for cell, (color, _) in scene.items()}
        for kind in grid.QUESTION_KINDS:
            drawn = grid.question(rng, scene, kind, side)
            if drawn is None:
                continue
            question, answer = drawn
            assert solve(question, scene) == (kind, answer), (question, scene)
            assert grid.kind_of(question) == kind
            asked[kind] += 1
    assert all(asked[kind] > 150 for kind in grid.QUESTION_KINDS), asked  # most scenes pose every kind
    with pytest.raises(ValueError, match="question kind 'colour'"):
        grid.question(rng, scene, "colour", side)


def test_objects_stay_inside_their_patch() -> None:
    for shape in grid.SHAPES:
        image = np.asarray(grid.draw({(2, 3): ("yellow", shape)}, 6))
        lit = np.argwhere(image.sum(-1) > 3 * max(grid.BACKGROUND) + 30)
        assert lit.min(0).tolist() >= [2 * grid.PATCH, 3 * grid.PATCH], shape
        assert lit.max(0).tolist() < [3 * grid.PATCH, 4 * grid.PATCH], shape


def test_exists_questions_are_balanced() -> None:
    rng = random.Random(1)
    answers = Counter(grid.question(rng, grid.random_scene(rng, 8), "exists", 8)[1] for _ in range(2000))
    assert abs(answers["yes"] - answers["no"]) < 150


def test_an_entry_asks_distinct_questions_kinds_in_turn() -> None:
    rng = random.Random(2)
    for first in range(20):
        scene, questions = grid.entry_questions(rng, 6, grid.HEADLINE_KINDS, 8, first=first)
        assert len(set(questions)) == 8
        assert grid.kind_of(questions[0][0]) == grid.HEADLINE_KINDS[first % 4]
        assert all(solve(q, scene)[1] == a for q, a in questions)


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def test_synth_grid_is_deterministic_and_answers_match_its_images(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, 5), (second, 5), (other, 6)):
        generate(SynthConfig(out=out, num_samples=60, seed=seed, task="grid", questions=1, grid_side=8))
    assert _digest(first) == _digest(second) != _digest(other)
    entries = json.loads((first / DATA_FILE).read_text())
    assert len(entries) == 60 and all(entry["image"] for entry in entries)
    assert Counter(entry["question_type"] for entry in entries) == {kind: 15 for kind in grid.HEADLINE_KINDS}
    for entry in entries:
        question = entry["conversations"][0]["value"].replace("<image>", "").strip()
        answer = entry["conversations"][1]["value"]
        with Image.open(first / "images" / entry["image"]) as image:
            assert image.size == (8 * grid.PATCH,) * 2
            colors = read_colors(image, 8)  # through JPEG: the colours survive, shapes are not read back
        if match := COUNT.fullmatch(question):
            assert str(sum(color == match[1] for color in colors.values())) == answer
        elif match := SHAPE_OF.fullmatch(question):
            assert list(colors.values()).count(match[1]) == 1
        elif match := COLOR_OF.fullmatch(question):
            assert answer in colors.values()
        elif match := EXISTS.fullmatch(question):
            assert answer == "no" or match[1] in colors.values()
        else:
            assert WHERE.fullmatch(question) and 1 <= int(answer) <= 8
        assert grid.kind_of(question) == entry["question_type"]


def test_every_answer_word_and_role_tag_is_one_token(tmp_path: Path) -> None:
    """The tiny model's tokenizer, fitted on the rendered chats: every answer the grid task can
    give (and the role tags) is one token where the model reads and writes it."""
    from transformers import AutoTokenizer

    generate(SynthConfig(out=tmp_path / "data", num_samples=300, seed=0, task="grid", questions=8, grid_side=10,
                         kinds=grid.QUESTION_KINDS))
    with pytest.raises(SystemExit) as exit_:
        divico(["model", "tiny", "--geometry", "grid", "--grid-side", "10", "--out", str(tmp_path / "model"),
                "--fit-text", str(tmp_path / "data" / DATA_FILE)])
    assert exit_.value.code == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    answers = {turn["value"] for entry in json.loads((tmp_path / "data" / DATA_FILE).read_text())
               for turn in entry["conversations"][1::2]}
    assert {"yes", "no", "red", "cross", "10", "0"} <= answers
    for answer in answers:  # after "ASSISTANT:", as the chat template renders it
        assert len(tokenizer.tokenize(f" ASSISTANT: {answer}")) == 2, answer
    assert len(tokenizer.tokenize("USER:")) == 1


@pytest.mark.parametrize("flags, problem", [(["--questions", "1"], "--questions 1"),
                                            (["--grid-side", "6"], "--grid-side: only with --task grid"),
                                            (["--task", "grid", "--grid-side", "7"], "--grid-side 7"),
                                            (["--task", "grid", "--kinds", "count,colour"], "colour")])
def test_synth_grid_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture, flags, problem) -> None:
    with pytest.raises(SystemExit) as exit_status:
        divico(["prep", "synth", "--out", str(tmp_path / "x"), *flags])
    assert exit_status.value.code == EXIT_BAD_INPUT
    assert problem in capsys.readouterr().err


def test_the_first_questions_kind_goes_in_turn_over_entries(tmp_path: Path) -> None:
    """Whatever the questions per image, every kind opens the same share of entries: a held-out
    question is always an entry's first, so a kind never asked first in training would be unseen there."""
    generate(SynthConfig(out=tmp_path / "d", num_samples=40, seed=3, task="grid", questions=8))
    entries = json.loads((tmp_path / "d" / DATA_FILE).read_text())
    assert Counter(entry["question_type"] for entry in entries) == {kind: 10 for kind in grid.HEADLINE_KINDS}
