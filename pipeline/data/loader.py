"""The training loader: decoded samples from `divico prep shard` output, exact epochs on any world size.

Random access rather than streaming: a member index (offset and size of each sample's json and
image, from tarfile's header scan, cached as loader-index.npz next to the manifest) lets one seeded
permutation of all samples be split at sample level over ranks and workers. Each worker reads and
decodes only what it yields, resume skips in O(1), and the shuffle is global, not a shuffle
buffer's local mix; the price, ~100 KB random reads, is what NVMe and parallel file systems serve well.

Epoch layout (seed, epoch): order = permutation of all N samples; rank r takes the r-th block of
N // world_size (the rest, at most world_size - 1 samples from the tail of the order, is dropped
and logged); from `start_sample` on, the rank's sequence is cut into batches and worker w of W
yields batches w, w + W, ..., so the DataLoader's in-order round-robin over workers rebuilds the
rank's sequence exactly, whatever num_workers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shard_format import (IMAGE_EXTS, JSON_EXT, MANIFEST_FILE, REJECTED_FILE, Manifest,
                                        read_manifest, split_member, unlisted_shards)

log = logging.getLogger(__name__)

INDEX_NAME = "loader-index.npz"
INDEX_VERSION = 1
# Length grouping reorders within windows of this many batches: similar lengths, while the
# epoch's shuffled order still decides which samples meet.
GROUP_BUFFER_BATCHES = 64
INDEX_ARRAYS = ("keys", "shard", "json_offset", "json_size", "image_offset", "image_size")


@dataclass
class Sample:
    key: str
    image: Image.Image | None  # RGB; None for text-only samples
    conversations: list[dict[str, Any]]
    meta: dict[str, Any]  # the json member minus "conversations"


@dataclass
class ShardIndex:
    """Where every sample's members lie; samples numbered in shard order, then tar order."""

    shard_names: list[str]
    keys: np.ndarray  # bytes, one per sample
    shard: np.ndarray  # int32 position in shard_names
    json_offset: np.ndarray  # int64
    json_size: np.ndarray  # int64
    image_offset: np.ndarray  # int64, -1 for text-only samples
    image_size: np.ndarray  # int64, -1 for text-only samples

    def __len__(self) -> int:
        return len(self.keys)


def checked_manifest(shard_dir: Path) -> Manifest:
    """The manifest, checked against the shard files on disk."""
    manifest = read_manifest(shard_dir)
    path, shards = shard_dir / MANIFEST_FILE, manifest["shards"]
    if sum(s["samples"] for s in shards) == 0:
        raise ValueError(f"{path} lists no samples (every entry rejected? see {shard_dir / REJECTED_FILE})")
    missing = [s["name"] for s in shards if not (shard_dir / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} shard(s) missing from {shard_dir}: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for shard in shards:
        size = (shard_dir / shard["name"]).stat().st_size
        if size != shard["bytes"]:
            raise ValueError(f"{shard_dir / shard['name']} is {size} bytes but {path} records {shard['bytes']} "
                             "(truncated copy, or rewritten after the manifest?)")
    strays = unlisted_shards(shard_dir, manifest)
    if strays:
        log.warning("%s: %d shard file(s) not in the manifest are ignored: %s",
                    shard_dir, len(strays), ", ".join(strays[:5]))
    return manifest


def _scan_shard(path: Path) -> list[tuple[str, int, int, int, int]]:
    """(key, json offset, json size, image offset, image size) per sample, in tar order.

    tarfile reads only the 512-byte headers and seeks over the data, so this costs one small
    read per member. Members are grouped into samples by shard_format.split_member.
    """
    samples: list[dict[str, Any]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                parts = split_member(member.name)
                if parts is None:
                    raise ValueError(f"{path}: member {member.name!r} has no key.extension name")
                key, suffix = parts[0], parts[1].lower()
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key})
                sample = samples[-1]
                if suffix == JSON_EXT:
                    slot = "json"
                elif suffix in IMAGE_EXTS:
                    slot = "image"
                else:
                    raise ValueError(f"{path}: member {member.name!r} is neither json nor an image")
                if slot in sample:
                    raise ValueError(f"{path}: sample {key!r} has more than one {slot} member")
                sample[slot] = (member.offset_data, member.size)
    except tarfile.TarError as error:
        raise ValueError(f"{path} is not a readable tar file: {error}") from error
    rows = []
    for sample in samples:
        if "json" not in sample:
            raise ValueError(f"{path}: sample {sample['key']!r} has no json member")
        rows.append((sample["key"], *sample["json"], *sample.get("image", (-1, -1))))
    return rows


def build_index(shard_dir: Path, manifest: Manifest) -> ShardIndex:
    """Scan every shard's tar headers (threads: the scan waits on I/O) and check the counts."""
    shards = manifest["shards"]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
        scans = list(pool.map(_scan_shard, (shard_dir / s["name"] for s in shards)))
    for shard, rows in zip(shards, scans):
        if len(rows) != shard["samples"]:
            raise ValueError(f"{shard_dir / shard['name']} holds {len(rows)} samples but "
                             f"{shard_dir / MANIFEST_FILE} records {shard['samples']}")
    rows = [row for scan in scans for row in scan]
    columns = list(zip(*rows))
    index = ShardIndex(
        shard_names=[s["name"] for s in shards],
        keys=np.array([key.encode() for key in columns[0]], dtype=np.bytes_),
        shard=np.repeat(np.arange(len(shards), dtype=np.int32), [len(scan) for scan in scans]),
        json_offset=np.array(columns[1], dtype=np.int64),
        json_size=np.array(columns[2], dtype=np.int64),
        image_offset=np.array(columns[3], dtype=np.int64),
        image_size=np.array(columns[4], dtype=np.int64),
    )
    log.info("indexed %d samples in %d shards of %s in %.1f s",
             len(index), len(shards), shard_dir, time.perf_counter() - started)
    return index


def _fingerprint(manifest: Manifest) -> str:
    """Identifies the shard set an index was built for (the manifest changes whenever a shard does)."""
    return json.dumps({"index_version": INDEX_VERSION,
                       "shards": [[s["name"], s["samples"], s["bytes"], s["sha256"]]
                                  for s in manifest["shards"]]})


def load_index(shard_dir: Path, manifest: Manifest, index_path: Path) -> ShardIndex:
    """The cached index if it matches the manifest, else a fresh scan, cached for the next process."""
    fingerprint = _fingerprint(manifest)
    if index_path.is_file():
        try:
            with np.load(index_path, allow_pickle=False) as cached:
                if str(cached["fingerprint"]) == fingerprint:
                    return ShardIndex(shard_names=[s["name"] for s in manifest["shards"]],
                                      **{name: cached[name] for name in INDEX_ARRAYS})
            log.info("%s is stale (the manifest changed); rebuilding it", index_path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("%s is unreadable (%s); rebuilding it", index_path, error)
    index = build_index(shard_dir, manifest)
    # Many ranks may build at once: each writes its own temporary file, the rename is atomic.
    partial = index_path.with_name(f"{index_path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as file:
            np.savez(file, fingerprint=np.array(fingerprint),
                     **{name: getattr(index, name) for name in INDEX_ARRAYS})
        os.replace(partial, index_path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        log.warning("could not cache the shard index at %s (%s); every process opening %s will "
                    "rescan its shards (pass index_path= to cache it elsewhere)", index_path, error, shard_dir)
    return index


def group_by_modality_length(order: np.ndarray, has_image: np.ndarray, lengths: np.ndarray, *, batch_size: int,
                             buffer_batches: int, rng: np.random.Generator) -> np.ndarray:
    """`order` rearranged so that consecutive runs of `batch_size` share a modality and have similar
    lengths, as LLaVA's group_by_modality_length: in each buffer of `buffer_batches` batches, each
    modality is sorted by length and cut into batches, the batches are shuffled, and the leftovers of
    both modalities form the buffer's last (mixed) batch. A permutation within each buffer, so every
    sample stays and the result depends only on the inputs and `rng`."""
    if batch_size < 1 or buffer_batches < 1:
        raise ValueError(f"batch_size ({batch_size}) and buffer_batches ({buffer_batches}) must be >= 1")
    grouped = []
    for start in range(0, len(order), batch_size * buffer_batches):
        buffer = order[start:start + batch_size * buffer_batches]
        batches, leftovers = [], []
        for modality in (True, False):
            group = buffer[has_image[buffer] == modality]
            group = group[np.argsort(lengths[group], kind="stable")]
            full = len(group) - len(group) % batch_size
            batches += np.split(group[:full], full // batch_size) if full else []
            leftovers.append(group[full:])
        grouped += [batches[i] for i in rng.permutation(len(batches))] + leftovers
    return np.concatenate(grouped) if grouped else order


class ShardDataset(IterableDataset):
    """This rank's share of one epoch of a shard directory, as decoded `Sample`s.

    len() is the number of samples the iterator yields: samples_per_rank - start_sample, equal on
    all ranks. The order depends only on (seed, epoch, rank, world_size), never on num_workers;
    `start_sample=n` continues an interrupted epoch after the n samples this rank consumed.
    `index_path` is where the member index is cached (default: loader-index.npz in shard_dir).
    `group_by_length`: batches of one modality and similar length (group_by_modality_length, with
    the json member's size standing in for the text length), within buffers of GROUP_BUFFER_BATCHES.
    """

    def __init__(self, shard_dir: str | os.PathLike, *, rank: int, world_size: int, batch_size: int,
                 seed: int, epoch: int = 0, start_sample: int = 0,
                 index_path: str | os.PathLike | None = None, group_by_length: bool = False) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed {seed}, epoch {epoch}")
        self.shard_dir = Path(shard_dir)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.epoch, self.start_sample = seed, epoch, start_sample
        manifest = checked_manifest(self.shard_dir)
        self.index = load_index(self.shard_dir, manifest,
                                Path(index_path) if index_path else self.shard_dir / INDEX_NAME)
        total = len(self.index)
        self.samples_per_rank = total // world_size
        if self.samples_per_rank == 0:
            raise ValueError(f"{self.shard_dir} holds {total} samples, fewer than world_size {world_size}")
        if not 0 <= start_sample <= self.samples_per_rank:
            raise ValueError(f"start_sample {start_sample} is outside 0..{self.samples_per_rank} "
                             f"(samples per rank per epoch)")
        self.dropped_per_epoch = total - self.samples_per_rank * world_size
        if rank == 0:
            log.info("epoch %d: %d samples over %d rank(s) = %d per rank, %d dropped "
                     "(the tail of this epoch's shuffled order)",
                     epoch, total, world_size, self.samples_per_rank, self.dropped_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(total)
        self.rank_order = order[rank * self.samples_per_rank:(rank + 1) * self.samples_per_rank]
        if group_by_length:  # before the resume point is applied, so a resumed run regroups alike
            self.rank_order = group_by_modality_length(
                self.rank_order, self.index.image_size >= 0, self.index.json_size, batch_size=batch_size,
                buffer_batches=GROUP_BUFFER_BATCHES, rng=np.random.default_rng([seed, epoch, rank]))

    def __len__(self) -> int:
        return self.samples_per_rank - self.start_sample

    def __iter__(self) -> Iterator[Sample]:
        worker = get_worker_info()
        return self.worker_samples(worker.id, worker.num_workers) if worker else self.worker_samples(0, 1)

    def worker_samples(self, worker_id: int, num_workers: int) -> Iterator[Sample]:
        """What loader worker `worker_id` of `num_workers` yields: batches worker_id, +num_workers, ..."""
        remaining = self.rank_order[self.start_sample:]
        batch_number = np.arange(len(remaining)) // self.batch_size
        files: dict[int, int] = {}
        try:
            for sample in remaining[batch_number % num_workers == worker_id]:
                shard = int(self.index.shard[sample])
                if shard not in files:
                    files[shard] = os.open(self.shard_dir / self.index.shard_names[shard], os.O_RDONLY)
                yield self._decode(sample, files[shard])
        finally:
            for fd in files.values():
                os.close(fd)

    def _read(self, fd: int, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.shard_dir / self.index.shard_names[shard]}: short read at byte {offset} "
                          "(shard changed since it was indexed?)")
        return data

    def _decode(self, sample: int, fd: int) -> Sample:
        index, shard = self.index, int(self.index.shard[sample])
        key = index.keys[sample].decode()
        where = f"{self.shard_dir / index.shard_names[shard]}, sample {key!r}"
        meta = json.loads(self._read(fd, shard, int(index.json_offset[sample]), int(index.json_size[sample])))
        if not isinstance(meta, dict) or not isinstance(meta.get("conversations"), list):
            raise ValueError(f"{where}: json member has no conversations list")
        conversations = meta.pop("conversations")
        image = None
        if index.image_size[sample] >= 0:
            data = self._read(fd, shard, int(index.image_offset[sample]), int(index.image_size[sample]))
            try:
                image = Image.open(io.BytesIO(data))
                image.load()  # decode here, in the worker, and fail here on a bad image
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise ValueError(f"{where}: image does not decode: {error}") from error
            if image.mode != "RGB":
                image = image.convert("RGB")  # greyscale, CMYK; RGB skips convert's full copy
        if (image is None) != (meta.get("image") is None):
            raise ValueError(f"{where}: json image field {meta.get('image')!r} disagrees with the "
                             f"{'absent' if image is None else 'present'} image member")
        return Sample(key=key, image=image, conversations=conversations, meta=meta)


def build_loader(dataset: ShardDataset, *, num_workers: int, collate_fn: Callable[[list[Sample]], Any],
                 pin_memory: bool | None = None, prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader over `dataset` that yields the rank's batches in the rank's order.

    - batch_size is the dataset's: its worker split is laid out in batches of that size, and
      in-order delivery (the DataLoader default, kept) round-robins over workers to rebuild it.
    - pin_memory when CUDA is present (default): pinned batches copy to the GPU asynchronously.
    - prefetch_factor 4 batches per worker: image sizes vary, a deeper queue absorbs slow batches.
    - no persistent workers: a dataset carries its epoch and resume point, so build one loader per
      epoch; persistent workers would replay their old copy of the dataset.
    """
    return DataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      drop_last=False, prefetch_factor=prefetch_factor if num_workers > 0 else None,
                      persistent_workers=False)
