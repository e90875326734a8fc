"""Entry and image validation: every rejection reason, conversion, the JSON scanner."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from data_prep import checks
from data_prep.shard import Accepted, PrepError, Rejected, scan_json_list, validate_entry


def _jpeg(color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(out, format="JPEG")
    return out.getvalue()


def _entry(image: str | None = "coco/train2017/ok.jpg", question: str = "<image>\nWhat color?",
           answer: str = "red") -> dict:
    entry = {"id": "x1", "conversations": [{"from": "human", "value": question},
                                            {"from": "gpt", "value": answer}]}
    if image is not None:
        entry["image"] = image
    return entry


@pytest.fixture()
def root(tmp_path: Path, damaged_png: bytes) -> str:
    """An image root with one file per case, plus a file outside it for escapes."""
    images = tmp_path / "images" / "coco" / "train2017"
    images.mkdir(parents=True)
    (images / "damaged.png").write_bytes(damaged_png)
    (images / "ok.jpg").write_bytes(_jpeg())
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(_jpeg()[:300])
    (images / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    gif, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (30, 20), (0, 0, 255)).convert("P").save(gif, format="GIF")
    Image.new("RGB", (30, 20), (0, 255, 0)).save(png, format="PNG")
    (images / "gif.jpg").write_bytes(gif.getvalue())
    (images / "png.jpg").write_bytes(png.getvalue())
    (images / "dir.jpg").mkdir()
    (tmp_path / "outside.jpg").write_bytes(_jpeg())
    os.symlink("../../../outside.jpg", images / "link_out.jpg")
    os.symlink("ok.jpg", images / "link_in.jpg")
    return os.path.realpath(tmp_path / "images")


REJECTIONS = [
    ("not an object", ["a", "list"], checks.MALFORMED_ENTRY),
    ("string entry", "just text", checks.MALFORMED_ENTRY),
    ("no id", {k: v for k, v in _entry().items() if k != "id"}, checks.MALFORMED_ENTRY),
    ("no conversations", {"id": "1", "image": "coco/train2017/ok.jpg"}, checks.MALFORMED_ENTRY),
    ("empty conversations", {"id": "1", "conversations": []}, checks.MALFORMED_ENTRY),
    ("empty value", _entry(answer="  "), checks.MALFORMED_ENTRY),
    ("non-string value", {"id": "1", "conversations": [{"from": "human", "value": "q"},
                                                       {"from": "gpt", "value": 7}]},
     checks.MALFORMED_ENTRY),
    ("gpt first", {"id": "1", "conversations": [{"from": "gpt", "value": "a"},
                                                {"from": "human", "value": "q"}]},
     checks.MALFORMED_ENTRY),
    ("two humans", {"id": "1", "conversations": [{"from": "human", "value": "q"},
                                                 {"from": "human", "value": "q"}]},
     checks.MALFORMED_ENTRY),
    ("no answer", {"id": "1", "conversations": [{"from": "human", "value": "q"}]},
     checks.MALFORMED_ENTRY),
    ("empty image path", _entry(image=""), checks.MALFORMED_ENTRY),
    ("no marker with image", _entry(question="What color?"), checks.IMAGE_MARKER_COUNT),
    ("two markers", _entry(question="<image>\nWhat color?\n<image>"), checks.IMAGE_MARKER_COUNT),
    ("marker without image", _entry(image=None), checks.IMAGE_MARKER_COUNT),
    ("absolute path", _entry(image="/coco/train2017/ok.jpg"), checks.PATH_ESCAPES_ROOT),
    ("dot-dot path", _entry(image="coco/../../outside.jpg"), checks.PATH_ESCAPES_ROOT),
    ("symlink out", _entry(image="coco/train2017/link_out.jpg"), checks.PATH_ESCAPES_ROOT),
    ("missing file", _entry(image="coco/train2017/nope.jpg"), checks.MISSING_FILE),
    ("directory", _entry(image="coco/train2017/dir.jpg"), checks.MISSING_FILE),
    ("zero-byte file", _entry(image="coco/train2017/empty.jpg"), checks.EMPTY_FILE),
    ("truncated jpeg", _entry(image="coco/train2017/truncated.jpg"), checks.UNREADABLE_IMAGE),
    ("not an image", _entry(image="coco/train2017/garbage.jpg"), checks.UNREADABLE_IMAGE),
]


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
@pytest.mark.parametrize("name,entry,reason", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_each_rejection_reason(root: str, name: str, entry: object, reason: str, fast: bool) -> None:
    result = validate_entry(5, entry, root, fast=fast)
    assert isinstance(result, Rejected), f"{name} was accepted"
    assert (result.index, result.reason) == (5, reason), result.detail
    assert result.detail


def test_damage_in_the_middle_takes_the_full_decode(root: str) -> None:
    """The rejections above fail the header or end-marker check too; this file passes them."""
    entry = _entry(image="coco/train2017/damaged.png")
    full = validate_entry(0, entry, root, fast=False)
    assert isinstance(full, Rejected) and full.reason == checks.UNREADABLE_IMAGE, full
    assert "damaged.png" in full.detail
    fast = validate_entry(0, entry, root, fast=True)
    assert isinstance(fast, Accepted) and (fast.width, fast.height, fast.ext) == (97, 61, "png")


@pytest.mark.parametrize("fast", [False, True], ids=["full", "fast"])
def test_valid_entries_and_conversions(root: str, fast: bool) -> None:
    ok = validate_entry(0, _entry(), root, fast=fast)
    assert isinstance(ok, Accepted)
    assert (ok.source, ok.width, ok.height, ok.ext, ok.convert) == ("coco", 64, 48, "jpg", False)
    assert isinstance(validate_entry(1, _entry(image="coco/train2017/link_in.jpg"), root, fast=fast),
                      Accepted)  # a symlink that stays inside the root is fine
    text = validate_entry(2, _entry(image=None, question="What is 2 plus 2?"), root, fast=fast)
    assert isinstance(text, Accepted) and text.source == "text" and text.image is None

    gif = validate_entry(3, _entry(image="coco/train2017/gif.jpg"), root, fast=fast)
    assert (gif.ext, gif.convert) == ("png", True)
    stored = checks.stored_image_bytes(root, "coco/train2017/gif.jpg", checks.ImageInfo(
        gif.width, gif.height, gif.ext, gif.convert, gif.size))
    with Image.open(io.BytesIO(stored)) as img:
        assert (img.format, img.mode, img.getpixel((0, 0))) == ("PNG", "RGB", (0, 0, 255))
    png = validate_entry(4, _entry(image="coco/train2017/png.jpg"), root, fast=fast)
    assert (png.ext, png.convert) == ("png", False)  # real PNG bytes kept as they are


def test_scan_json_list_offsets(tmp_path: Path) -> None:
    entries = [{"id": "é漢字", "v": [1, 2, {"x": "]},"}]}, 12345, "str", None, [], {"a": "🙂" * 50}]
    path = tmp_path / "data.json"
    path.write_text(" \n[ " + " ,\n ".join(json.dumps(e, ensure_ascii=False) for e in entries) + " ]\n",
                    encoding="utf-8")
    raw = path.read_bytes()
    for block_size in (3, 7, 64, 1 << 20):  # entries cut at every kind of block boundary
        offsets, _ = scan_json_list(path, block_size=block_size)
        decoded = [json.loads(raw[offsets[2 * i]:offsets[2 * i + 1]]) for i in range(len(offsets) // 2)]
        assert decoded == entries


@pytest.mark.parametrize("text", ['{"id": 1}', '[{"id": 1}', '[{"id": 1},]', '[1 2]', '[1] x', "",
                                  '[{"id": "unterminated}]'])
def test_scan_json_list_rejects_bad_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PrepError, match="bad.json"):
        scan_json_list(path, block_size=4)


def test_scan_json_list_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[ ]")
    assert len(scan_json_list(path)[0]) == 0


def _encoded(fmt: str, mode: str, **save) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((97, 61), 60).convert(mode).save(out, format=fmt, **save)
    return out.getvalue()


_BIG_EXIF = Image.Exif()
_BIG_EXIF[0x010E] = "x" * 40000  # image description: a JPEG header longer than the first read
FORMATS = {
    "jpeg rgb": _encoded("JPEG", "RGB"),
    "jpeg gray progressive": _encoded("JPEG", "L", progressive=True),
    "jpeg cmyk": _encoded("JPEG", "CMYK"),
    "jpeg 40 KB exif": _encoded("JPEG", "RGB", exif=_BIG_EXIF.tobytes()),
    "png rgb": _encoded("PNG", "RGB"),
    "png rgba": _encoded("PNG", "RGBA"),
    "png la": _encoded("PNG", "LA"),
    "png 16-bit": _encoded("PNG", "I;16"),
    "png 1-bit": _encoded("PNG", "1"),
    "png palette": _encoded("PNG", "P"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_fast_header_check_agrees_with_decode(tmp_path: Path, name: str) -> None:
    """Fast mode reads JPEG/PNG headers itself: same size, extension and conversion as PIL's
    full decode, and a cut file (end marker gone) is rejected."""
    data = FORMATS[name]
    (tmp_path / "whole.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) * 2 // 3])
    root = os.path.realpath(tmp_path)
    fast = checks.check_image_file(root, "whole.jpg", fast=True)
    assert fast == checks.check_image_file(root, "whole.jpg", fast=False)
    assert (fast.width, fast.height, fast.convert) == (97, 61, name == "png palette")
    cut = checks.check_image_file(root, "cut.jpg", fast=True)
    assert isinstance(cut, checks.Rejection) and cut.reason == checks.UNREADABLE_IMAGE
