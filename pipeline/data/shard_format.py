"""The shard format, stated once: what a folder written by `divico prep shard` holds.

    shard-000000.tar, ...  USTAR tars; a sample is the members `<key>.json` and, for an image
                           entry, `<key>.<image extension>`, with key `<entry index>_<entry id>`
    rejected.jsonl         one line per entry not written
    manifest.json          the inputs, the counts and each shard's samples, bytes and sha256;
                           written last, so a folder with a manifest is complete

The writer (data_prep.shard), the verifier (data_prep.verify), the training loader and the
tests' fixture builder all take names, keys and the manifest from here. Torch-free, like the
writer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypedDict, get_origin, get_type_hints

from pipeline.durable import write_text_atomically

SHARD_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.jsonl"
SHARD_GLOB = "shard-*.tar"
JSON_EXT = "json"
# An image member's extension: the writer stores "jpg" or "png" (data_prep.checks decides);
# a reader takes any of these as a sample's image.
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})


def shard_name(number: int) -> str:
    """The file name of shard `number` (matches SHARD_GLOB; sorts in shard order)."""
    return f"shard-{number:06d}.tar"


def key_digits(num_entries: int) -> int:
    """Digits of the entry index in a key: at least 7, so keys sort in entry order."""
    return max(7, len(str(max(num_entries - 1, 0))))


def sample_key(index: int, entry_id: str, digits: int) -> str:
    """webdataset-safe key: unique through the entry index, readable through the id."""
    return f"{index:0{digits}d}_{re.sub(r'[^A-Za-z0-9_-]', '_', entry_id)[:64]}"


def member_name(key: str, ext: str) -> str:
    """A member's name in a shard tar: the sample's key, a dot, the extension."""
    return f"{key}.{ext}"


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, None when it has none: the key runs to the first dot
    of the base name. This is webdataset's grouping rule, so every reader pairs members into
    samples as `divico prep verify` (which reads with webdataset) does."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else None


class ShardRecord(TypedDict):
    name: str
    samples: int
    bytes: int
    sha256: str


class Manifest(TypedDict):
    format_version: int
    inputs: dict[str, Any]  # data, data_sha256, image_root, shard_size, fast_validate
    seed: int
    entries: int  # written + rejected
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    sources: dict[str, dict[str, int]]  # source -> {"written": n, "rejected": n}
    shards: list[ShardRecord]


def write_manifest(folder: Path, *, inputs: dict[str, Any], seed: int, entries: int, written: int,
                   rejected: int, rejected_by_reason: dict[str, int], sources: dict[str, dict[str, int]],
                   shards: list[ShardRecord]) -> Manifest:
    """Write `folder`/manifest.json atomically and return it. Call it last: its presence says
    the folder is complete."""
    if written + rejected != entries:
        raise ValueError(f"manifest for {folder}: written {written} + rejected {rejected} != entries {entries}")
    manifest = Manifest(format_version=SHARD_FORMAT_VERSION, inputs=inputs, seed=seed, entries=entries,
                        written=written, rejected=rejected, rejected_by_reason=rejected_by_reason,
                        sources=sources, shards=shards)
    write_text_atomically(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _field_problem(record: dict[str, Any], schema: type) -> str | None:
    """The first field of `schema` that `record` lacks or holds with the wrong type."""
    for field, hint in get_type_hints(schema).items():
        kind = get_origin(hint) or hint
        if field not in record:
            return f"field '{field}' is missing"
        if not isinstance(record[field], kind):
            return f"'{field}' is {type(record[field]).__name__}, not {kind.__name__}"
    return None


def read_manifest(folder: Path) -> Manifest:
    """`folder`'s manifest, its version and fields checked (not the shards on disk)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a shard directory written by "
                                "`divico prep shard` (or the run has not finished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format_version") != SHARD_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, "
                         f"this code reads {SHARD_FORMAT_VERSION}")
    problem = _field_problem(manifest, Manifest)
    if problem:
        raise ValueError(f"{path}: {problem}")
    for number, shard in enumerate(manifest["shards"]):
        problem = _field_problem(shard, ShardRecord) if isinstance(shard, dict) else "not an object"
        if problem:
            raise ValueError(f"{path}: shards[{number}]: {problem}")
    return manifest


def unlisted_shards(folder: Path, manifest: Manifest) -> list[str]:
    """Names of shard files in `folder` that the manifest does not list, sorted."""
    listed = {shard["name"] for shard in manifest["shards"]}
    return sorted(path.name for path in folder.glob(SHARD_GLOB) if path.name not in listed)
