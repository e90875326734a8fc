"""`divico prep verify DIR`: re-read every shard with webdataset and check it against the
manifest (file set, sizes, sha256, per-shard sample counts, unique keys, totals)."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

from pipeline.data.shard_format import REJECTED_FILE, read_manifest, unlisted_shards
from pipeline.durable import sha256_file


def verify(shard_dir: Path) -> list[str]:
    """Every problem found, as one clear sentence each; empty when the folder is sound."""
    try:
        manifest = read_manifest(shard_dir)
    except (OSError, ValueError) as err:  # the message names the file and the problem
        return [str(err)]
    problems = [f"{name} is on disk but not in the manifest" for name in unlisted_shards(shard_dir, manifest)]

    keys: set[str] = set()
    total = 0
    for shard in manifest["shards"]:
        path = shard_dir / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']} is in the manifest but missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['name']}: {path.stat().st_size} bytes, manifest says "
                            f"{shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest (corrupted or "
                            "replaced)")
        count = 0
        try:
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                key = sample["__key__"]
                if key in keys:
                    problems.append(f"{shard['name']}: duplicate key {key}")
                keys.add(key)
                if "json" not in sample:
                    problems.append(f"{shard['name']}: sample {key} has no json member")
                count += 1
        except Exception as err:  # webdataset surfaces tar and decoding errors with many types
            problems.append(f"{shard['name']}: unreadable by webdataset: {err}")
        if count != shard["samples"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
        total += count

    if total != manifest["written"]:
        problems.append(f"shards hold {total} samples, manifest says written={manifest['written']}")
    if manifest["written"] + manifest["rejected"] != manifest["entries"]:
        problems.append(f"manifest: written {manifest['written']} + rejected "
                        f"{manifest['rejected']} != entries {manifest['entries']}")
    try:
        rejected_lines = (shard_dir / REJECTED_FILE).read_text().splitlines()
    except OSError as err:
        problems.append(f"cannot read {REJECTED_FILE}: {err}")
    else:
        if len(rejected_lines) != manifest["rejected"]:
            problems.append(f"{REJECTED_FILE} has {len(rejected_lines)} lines, manifest says "
                            f"rejected={manifest['rejected']}")
    return problems
