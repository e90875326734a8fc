"""`divico prep synth`: the real file's format, determinism, defects, and answers that survive
the tiny model's 140 px view."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.synth import COLORS, POSITIONS, SHORT_ANSWER, SynthConfig, generate
from pipeline.cli import main as divico
from pipeline.contract import DATA_FILE, EXIT_BAD_INPUT, IMAGE_TOKEN

REAL_FOLDERS = {"coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images",
                "vg/VG_100K", "vg/VG_100K_2"}


def _tree(root: Path) -> dict[str, str]:
    """Every file's bytes hash, symlinks by their target."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            out[rel] = ("-> " + os.readlink(path)) if path.is_symlink() else \
                hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("clean")
    generate(SynthConfig(out=out, num_samples=1200, seed=0))
    return out, json.loads((out / DATA_FILE).read_text())


def test_real_format(clean_set: tuple[Path, list[dict]]) -> None:
    out, entries = clean_set
    text_only = [e for e in entries if "image" not in e]
    assert 0.035 < len(text_only) / len(entries) < 0.09   # real file: 40,688 / 665,298 = 6.1%
    assert all(e.get("model") == "" for e in text_only)   # ShareGPT-style entries carry it
    folders = Counter(e["image"].rsplit("/", 1)[0] for e in entries if "image" in e)
    assert set(folders) == REAL_FOLDERS
    assert folders["coco/train2017"] > len(entries) / 2 * 0.9
    ids = Counter(e["id"] for e in entries)
    assert any(n > 1 for n in ids.values())  # ids repeat, as in the real file
    starts = ends = multi = suffixed = 0
    for e in entries:
        assert set(e) <= {"id", "image", "conversations", "model"}
        turns = e["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        markers = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        assert markers == (1 if "image" in e else 0)
        if "image" in e:
            assert (out / "images" / e["image"]).is_file()
            first = turns[0]["value"]
            starts += first.startswith("<image>\n")
            ends += first.endswith("\n<image>")
        multi += len(turns) > 2
        suffixed += any(t["value"].endswith(SHORT_ANSWER) for t in turns)
        assert all(len(t["value"].split()) <= 2 for t in turns[1::2])   # short answers
    assert starts + ends == len(entries) - len(text_only) and starts > ends > 0
    assert multi > 0.1 * len(entries) and 0.3 * len(entries) < suffixed < 0.8 * len(entries)
    # Small answer vocabularies, so chance level is well defined: 4 colours, 3 shapes, counts
    # 1-3, yes/no and 8 words about images; sums, letter counts and words in text-only entries.
    image_answers = Counter(t["value"] for e in entries if "image" in e for t in e["conversations"][1::2])
    assert len(image_answers) <= 20
    assert len(Counter(t["value"] for e in entries for t in e["conversations"][1::2])) < 50


def test_local_answers_survive_the_140px_view(clean_set: tuple[Path, list[dict]]) -> None:
    """The colour asked about is the colour of that cell's centre after resizing to 140x140."""
    out, entries = clean_set
    checked = 0
    palette = np.array(list(COLORS.values()), dtype=float)
    names = list(COLORS)
    where = {name: cell for cell, name in POSITIONS.items()}
    for e in entries:
        for q, a in zip(e["conversations"][::2], e["conversations"][1::2]):
            m = re.search(r"What color is the shape in the (.+) of the image\?", q["value"])
            if not m:
                continue
            row, col = where[m.group(1)]
            with Image.open(out / "images" / e["image"]) as img:
                small = np.asarray(img.convert("RGB").resize((140, 140), Image.BICUBIC), dtype=float)
            y, x = int((row + 0.5) * 140 / 3), int((col + 0.5) * 140 / 3)
            centre = small[y - 3:y + 4, x - 3:x + 4].reshape(-1, 3).mean(0)
            assert names[int(np.argmin(((palette - centre) ** 2).sum(1)))] == a["value"]
            checked += 1
    assert checked > 50


def test_deterministic_with_defects(tmp_path: Path) -> None:
    trees = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(SynthConfig(out=tmp_path / name, num_samples=300, seed=seed, defects=0.3,
                             width=64, height=64))
        trees.append(_tree(tmp_path / name))
    assert trees[0] == trees[1]
    assert trees[0][DATA_FILE] != trees[2][DATA_FILE]

    entries = json.loads((tmp_path / "a" / DATA_FILE).read_text())
    root = tmp_path / "a" / "images"
    images = [e["image"] for e in entries if isinstance(e, dict) and isinstance(e.get("image"), str)]
    kinds = Counter()
    for image in images:
        path = root / image
        if image.startswith("/") or ".." in image:
            kinds["escaping path"] += 1
        elif path.is_symlink():
            kinds["symlink"] += 1
        elif not path.exists():
            kinds["missing"] += 1
        elif path.stat().st_size == 0:
            kinds["empty"] += 1
        else:
            head, tail = path.read_bytes()[:4], path.read_bytes()[-2:]
            kinds["gif" if head == b"GIF8" else "png" if head == b"\x89PNG" else
                  "jpeg" if tail == b"\xff\xd9" else "truncated"] += 1
    assert all(kinds[k] > 0 for k in ("escaping path", "symlink", "missing", "empty", "gif", "png",
                                      "truncated"))
    assert any(not isinstance(e, dict) for e in entries)
    defective = sum(kinds[k] for k in kinds if k != "jpeg")
    assert 0.1 < defective / len(entries) < 0.3  # about half of the 30% are file defects


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    generate(SynthConfig(out=tmp_path, num_samples=5, width=32, height=32))
    with pytest.raises(FileExistsError):
        generate(SynthConfig(out=tmp_path, num_samples=5, width=32, height=32))


def test_an_interrupted_run_leaves_no_half_dataset_and_reruns_clean(tmp_path: Path) -> None:
    """Files go to OUT.tmp/ until the end: what a killed run left there is discarded on rerun."""
    leftover = tmp_path / "a.tmp" / "images" / "coco" / "train2017"
    leftover.mkdir(parents=True)
    (leftover / "000000000001.jpg").write_bytes(b"half")
    generate(SynthConfig(out=tmp_path / "a", num_samples=40, seed=3, width=32, height=32))
    generate(SynthConfig(out=tmp_path / "b", num_samples=40, seed=3, width=32, height=32))
    assert not (tmp_path / "a.tmp").exists()
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


@pytest.mark.parametrize("flag,value", [("--defects", "1.5"), ("--defects", "-0.1"), ("--num-samples", "0")])
def test_cli_bad_argument_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        divico(["prep", "synth", "--out", str(tmp_path / "set"), flag, value])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert f"error: {flag} {value}: must be" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
