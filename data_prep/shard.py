"""`divico prep shard`: a LLaVA-665K-format JSON + image root -> webdataset shards.

    setup     check the inputs and scan the JSON list into byte offsets (nothing written yet)
    validate  workers check every entry and image (full decode, or header + end marker);
              results go to OUT/.prep/validated.jsonl in entry order, so a kill loses at most
              the chunks in flight
    plan      accepted entries, shuffled with the seed, dealt into balanced shards, each source
              spread evenly over them
    write     workers write whole shards under temp names; parent threads fsync and rename
              them (so no worker waits for the disk) and collect sizes and hashes
    finish    rejected.jsonl, manifest.json (last), then the work folder is removed

The output depends only on the input bytes, the seed and the shard size - never on the
worker count or on where a previous run was killed.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import tarfile
import time
from array import array
from collections import Counter, deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from tqdm import tqdm

from data_prep import checks
from pipeline.data.shard_format import (JSON_EXT, MANIFEST_FILE, REJECTED_FILE, SHARD_FORMAT_VERSION, Manifest,
                                        ShardRecord, key_digits, member_name, read_manifest, sample_key,
                                        shard_name, write_manifest)
from pipeline.durable import fsync_path, write_text_atomically

log = logging.getLogger(__name__)

WORK_DIR = ".prep"
# Entries per validation task: ~0.1 s of decoding (an even end of phase), or ~10 ms of header
# checks (less per-task overhead).
DECODE_CHUNK, HEADER_CHUNK = 32, 256
# what json.dumps(..., ensure_ascii=False) would build anew for every call
_json = json.JSONEncoder(ensure_ascii=False)


class PrepError(Exception):
    """A problem with the user's inputs or output folder; the message says which and why."""


def default_workers() -> int:
    """CPUs this process may use (a SLURM allocation, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class ShardConfig:
    data: Path
    image_root: Path
    out: Path
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    shard_size: int = 5000          # ~0.8 GB shards at LLaVA-665K's ~160 KB per image
    resume: bool = False
    fast_validate: bool = False
    chunk_size: int | None = None  # entries per validation task; None: DECODE_CHUNK or HEADER_CHUNK
    progress: bool = True


class Accepted(NamedTuple):
    index: int
    id: str
    source: str
    image: str | None
    width: int | None
    height: int | None
    ext: str | None
    convert: bool
    size: int


class Rejected(NamedTuple):
    index: int
    id: str | None
    reason: str
    detail: str
    source: str


# ---------------------------------------------------------------------------- setup

def scan_json_list(path: Path, block_size: int = 1 << 22) -> tuple[array, str]:
    """Byte offsets [start0, end0, start1, end1, ...] of the elements of a top-level JSON
    list, and the file's sha256, reading the file in blocks.

    The parsed elements are dropped at once, so memory is 16 bytes per entry rather than the
    several GB the parsed 665K list would take; workers re-read entries by offset.
    """
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[ \t\n\r]*")
    utf8 = codecs.getincrementaldecoder("utf-8")()
    sha = hashlib.sha256()
    offsets = array("q")
    with open(path, "rb") as f:
        buf, pos, pos_byte, eof = "", 0, 0, False

        def read_more() -> None:
            nonlocal buf, pos, eof
            data = f.read(block_size)
            eof = not data
            sha.update(data)
            buf = buf[pos:] + utf8.decode(data, final=eof)
            pos = 0

        def fail(message: str) -> PrepError:
            return PrepError(f"{path}: not a valid JSON list of entries near byte {pos_byte}: "
                             f"{message}")

        def skip_whitespace() -> str:
            """The next non-whitespace character ('' at end of file)."""
            nonlocal pos, pos_byte
            while True:
                end = whitespace.match(buf, pos).end()
                pos_byte += end - pos
                pos = end
                if pos < len(buf) or eof:
                    return buf[pos:pos + 1]
                read_more()

        try:
            if skip_whitespace() != "[":
                raise fail("the file must hold one JSON list")
            pos, pos_byte = pos + 1, pos_byte + 1
            if skip_whitespace() == "]":
                pos += 1
            else:
                while True:
                    while True:  # decode one element, reading more until it is complete
                        try:
                            _, end = decoder.raw_decode(buf, pos)
                            if end < len(buf) or eof:
                                break
                        except json.JSONDecodeError as err:
                            if eof:
                                raise fail(err.msg) from None
                            if len(buf) - pos > 256 * block_size:
                                raise fail(f"an entry longer than {256 * block_size} bytes: "
                                           f"{err.msg}") from None
                        read_more()
                    size = len(buf[pos:end].encode("utf-8"))
                    offsets.extend((pos_byte, pos_byte + size))
                    pos, pos_byte = end, pos_byte + size
                    sep = skip_whitespace()
                    pos, pos_byte = pos + 1, pos_byte + 1
                    if sep == "]":
                        break
                    if sep != ",":
                        raise fail(f"expected ',' or ']' after an entry, found {sep!r}")
                    skip_whitespace()
            if skip_whitespace() != "":
                raise fail("text after the end of the list")
        except UnicodeDecodeError as err:
            raise fail(f"not UTF-8 ({err.reason})") from None
    return offsets, sha.hexdigest()


def read_entries(f, starts: list[int], ends: list[int]) -> list[object]:
    """Parse entries from an open data file by byte offsets (one read for a consecutive run)."""
    f.seek(starts[0])
    blob = f.read(ends[-1] - starts[0])
    base = starts[0]
    return [json.loads(blob[s - base:e - base]) for s, e in zip(starts, ends)]


# ---------------------------------------------------------------------------- validate

_worker: dict = {}


def _init_worker(data: str, root_real: str, fast: bool) -> None:
    _worker.update(data=data, root_real=root_real, fast=fast)


def _validate_chunk(task: tuple[int, list[int], list[int]]) -> list[Accepted | Rejected]:
    first, starts, ends = task
    with open(_worker["data"], "rb") as f:
        entries = read_entries(f, starts, ends)
    return [validate_entry(first + i, entry, _worker["root_real"], fast=_worker["fast"])
            for i, entry in enumerate(entries)]


def validate_entry(index: int, entry: object, root_real: str, *, fast: bool) -> Accepted | Rejected:
    """Accept or reject one entry; an accepted image has been decoded (or header-checked)."""
    entry_id = checks.entry_id(entry)
    source = checks.source_of(entry)
    problem = checks.check_entry(entry)
    if problem is not None:
        return Rejected(index, entry_id, problem.reason, problem.detail, source)
    image = entry.get("image")
    if image is None:
        return Accepted(index, entry_id, source, None, None, None, None, False, 0)
    info = checks.check_image_file(root_real, image, fast=fast)
    if isinstance(info, checks.Rejection):
        return Rejected(index, entry_id, info.reason, info.detail, source)
    return Accepted(index, entry_id, source, image, info.width, info.height,
                    info.ext, info.convert, info.size)


# ---------------------------------------------------------------------------- plan

def plan_shards(sources: list[str], shard_size: int, seed: int) -> list[list[int]]:
    """Positions of accepted samples (whose sources are `sources`) per shard: as few shards as
    `shard_size` allows, sizes differing by at most one, and every source dealt evenly over the
    shards (each holds its share of every source, to within one sample), so every shard mixes
    all sources that have a sample per shard. Which samples, and their order, are shuffled with `seed`."""
    rng = random.Random(seed)
    order = list(range(len(sources)))
    rng.shuffle(order)
    order.sort(key=sources.__getitem__)  # stable: each source's samples stay shuffled
    num_shards = math.ceil(len(order) / shard_size)
    shards = [order[k::num_shards] for k in range(num_shards)]  # dealt round-robin
    for shard in shards:
        rng.shuffle(shard)  # sources interleaved within a shard too
    return shards


# ---------------------------------------------------------------------------- write

# The USTAR header of every member but its name, size and checksum: mode 0444, uid/gid 0,
# mtime 0, no owner names, so the bytes depend only on the content (tarfile's own layout).
_HEADER_MODE_TO_SIZE = b"0000444\0" + b"0000000\0" * 2
_HEADER_AFTER_SIZE = b"00000000000\0"  # mtime
# type, then linkname, owner names, device numbers (empty for a regular file), prefix and padding
_HEADER_TAIL = tarfile.REGTYPE + tarfile.NUL * 100 + tarfile.POSIX_MAGIC + tarfile.NUL * 247
_HEADER_CONSTANT_SUM = sum(_HEADER_MODE_TO_SIZE + _HEADER_AFTER_SIZE + _HEADER_TAIL) + 8 * ord(" ")


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile.TarInfo(name).tobuf(USTAR_FORMAT) writes for a regular file with
    the fixed metadata above, built in a few microseconds instead of tobuf's ~80 (it runs twice per
    sample). Shard member names are ASCII keys well under USTAR's 100 bytes."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than USTAR's 100 bytes")
    name_field, size_field = raw.ljust(100, tarfile.NUL), b"%011o\0" % size
    checksum = _HEADER_CONSTANT_SUM + sum(raw) + sum(size_field)
    return b"".join((name_field, _HEADER_MODE_TO_SIZE, size_field, _HEADER_AFTER_SIZE,
                     b"%06o\0 " % checksum, _HEADER_TAIL))


class TarWriter:
    """Writes a USTAR tar member by member, exactly as tarfile.TarFile.addfile + close would, and
    hashes the bytes as they go out, so the shard is never re-read."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.f.write(data)
        self.bytes += len(data)

    def add(self, name: str, data: bytes) -> None:
        padding = -len(data) % tarfile.BLOCKSIZE
        self._write(ustar_header(name, len(data)))
        self._write(data)
        if padding:
            self._write(tarfile.NUL * padding)

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as tarfile does."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.bytes + end) % tarfile.RECORDSIZE
        self._write(tarfile.NUL * end)


class ShardFile(NamedTuple):
    path: str
    samples: int
    bytes: int
    sha256: str
    durable: bool  # False: still under its temp name, not yet fsynced (see _publish)


def _write_shard(task: tuple[str, list[tuple[int, int, Accepted]], int]) -> ShardFile:
    """Write one shard under its temp name; the parent makes it durable and renames it."""
    path, samples, digits = task
    with open(_worker["data"], "rb") as data, open(path + ".tmp", "wb") as f:
        tar = TarWriter(f)
        for start, end, sample in samples:
            entry = read_entries(data, [start], [end])[0]
            key = sample_key(sample.index, sample.id, digits)
            meta = {"id": sample.id, "index": sample.index, "source": sample.source,
                    "image": sample.image, "width": sample.width, "height": sample.height,
                    "conversations": entry["conversations"]}
            if isinstance(entry.get("question_type"), str):  # evaluation sets may label their questions
                meta["question_type"] = entry["question_type"]
            tar.add(member_name(key, JSON_EXT), _json.encode(meta).encode())
            if sample.image is not None:
                info = checks.ImageInfo(sample.width, sample.height, sample.ext,
                                        sample.convert, sample.size)
                tar.add(member_name(key, sample.ext),
                        checks.stored_image_bytes(_worker["root_real"], sample.image, info))
        tar.close()
    return ShardFile(path, len(samples), tar.bytes, tar.sha.hexdigest(), durable=False)


def _publish(path: str) -> None:
    """fsync a shard written under its temp name, then give it its final name."""
    fsync_path(path + ".tmp")
    os.replace(path + ".tmp", path)


def _check_shard(task: tuple[str, list[tuple[int, int, Accepted]], int]) -> ShardFile | None:
    """A shard left by an earlier run: its stats if its members are the planned ones, else None."""
    path, samples, digits = task
    expected = []
    for _, _, s in samples:
        key = sample_key(s.index, s.id, digits)
        members = [member_name(key, JSON_EXT)] + ([member_name(key, s.ext)] if s.image is not None else [])
        expected += sorted(members)
    try:
        with tarfile.open(path, "r:") as tar:
            names = [m.name for m in tar]
    except (OSError, tarfile.TarError):
        return None
    if names != expected:
        return None
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
            size += len(block)
    return ShardFile(path, len(samples), size, sha.hexdigest(), durable=True)


def _write_or_keep(task: tuple[str, list[tuple[int, int, Accepted]], int]) -> ShardFile:
    if os.path.exists(task[0]):
        kept = _check_shard(task)
        if kept is not None:
            return kept
        log.warning("%s does not match the plan; rewriting it", task[0])
    return _write_shard(task)


# ---------------------------------------------------------------------------- driver

def _job_identity(cfg: ShardConfig, data_sha256: str) -> dict:
    return {"format_version": SHARD_FORMAT_VERSION, "data": str(cfg.data.resolve()),
            "data_sha256": data_sha256, "image_root": str(cfg.image_root.resolve()),
            "seed": cfg.seed, "shard_size": cfg.shard_size, "fast_validate": cfg.fast_validate}


def _prepare_out(cfg: ShardConfig, identity: dict) -> bool:
    """Create or reopen the output folder. Returns False when a finished job is there."""
    work = cfg.out / WORK_DIR
    existing = sorted(p.name for p in cfg.out.iterdir()) if cfg.out.is_dir() else []
    if cfg.out.exists() and not cfg.out.is_dir():
        raise PrepError(f"--out {cfg.out} exists and is not a folder")
    if existing and not cfg.resume:
        raise PrepError(f"--out {cfg.out} is not empty ({', '.join(existing[:3])}...); pass "
                        "--resume to finish an interrupted job, or choose an empty folder")
    if cfg.resume and MANIFEST_FILE in existing:  # written last, atomically: the job had finished
        try:
            finished = read_manifest(cfg.out)
        except ValueError as err:
            raise PrepError(f"--resume: {err}; choose an empty folder") from err
        recorded = {**finished["inputs"], "seed": finished["seed"]}
        changed = [k for k in recorded if recorded[k] != identity.get(k)]
        if changed:
            raise PrepError(f"--resume: {cfg.out} holds a finished job with other "
                            f"{', '.join(changed)}; choose an empty folder")
        shutil.rmtree(work, ignore_errors=True)  # a kill during the final clean-up leaves it
        return False
    if cfg.resume and existing:
        if not (work / "job.json").is_file():
            if existing != [WORK_DIR]:
                raise PrepError(f"--out {cfg.out} holds files but no interrupted job "
                                f"({WORK_DIR}/job.json is missing); choose an empty folder")
            shutil.rmtree(work)  # killed before the job was recorded: start afresh
            existing = []
    if cfg.resume and existing:
        previous = json.loads((work / "job.json").read_text())
        changed = [k for k in identity if previous.get(k) != identity[k]]
        if changed:
            raise PrepError(f"--resume: {', '.join(changed)} differ from the interrupted job in "
                            f"{cfg.out}; use the same inputs, or an empty folder")
        for stale in cfg.out.glob("*.tmp"):  # partial files of the killed run
            stale.unlink()
        return True
    work.mkdir(parents=True)
    write_text_atomically(work / "job.json", json.dumps(identity, indent=2))
    return True


def _load_validated(path: Path) -> list[Accepted | Rejected]:
    """Results saved by an interrupted run, a line per validated chunk; a torn last line is
    dropped (and its chunk redone)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return [Accepted(*fields) if kind == "ok" else Rejected(*fields)
            for line in complete.decode("utf-8").splitlines() for kind, *fields in json.loads(line)]


def _chunks(offsets: array, start: int, chunk: int) -> Iterator[tuple[int, list[int], list[int]]]:
    n = len(offsets) // 2
    for first in range(start, n, chunk):
        last = min(first + chunk, n)
        yield first, offsets[2 * first:2 * last:2].tolist(), offsets[2 * first + 1:2 * last:2].tolist()


def _in_order(pool: Executor, fn: Callable, tasks: Iterable, window: int) -> Iterator:
    """fn(task) for each task, in order, with at most `window` tasks submitted at a time (the
    task list is never all in memory, and results come back as soon as they are next)."""
    pending = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def run_shard(cfg: ShardConfig) -> Manifest:
    """Run the whole job (or finish an interrupted one); returns the manifest."""
    if cfg.shard_size < 1 or cfg.workers < 1:
        raise PrepError("--shard-size and --workers must be at least 1")
    if not cfg.image_root.is_dir():
        raise PrepError(f"--image-root {cfg.image_root} is not an existing folder")
    if not cfg.data.is_file():
        raise PrepError(f"--data {cfg.data} is not an existing file")
    started = time.perf_counter()
    # forkserver: workers never inherit the parent's threads or locks; the preload makes the
    # server import this module once, so each worker starts in milliseconds. The executor, not
    # multiprocessing.Pool: a worker that dies (a crash in an image decoder) fails the run with
    # BrokenProcessPool instead of hanging it, and the parent does not spin on each result.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    root_real = os.path.realpath(cfg.image_root)
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(str(cfg.data), root_real, cfg.fast_validate)) as pool:
        # the executor starts a worker per submitted task: these bring all of them up while
        # the parent scans the JSON
        for _ in range(cfg.workers):
            pool.submit(os.getpid)
        offsets, data_sha256 = scan_json_list(cfg.data)
        num_entries = len(offsets) // 2
        log.info("%s: %d entries (scanned in %.1f s)", cfg.data, num_entries,
                 time.perf_counter() - started)
        identity = _job_identity(cfg, data_sha256)
        if not _prepare_out(cfg, identity):
            log.info("%s already holds a finished job; nothing to do", cfg.out)
            return read_manifest(cfg.out)
        work = cfg.out / WORK_DIR
        results = _load_validated(work / "validated.jsonl")

        # validate: ordered results, appended to the state file as they arrive
        mode = "full decode" if not cfg.fast_validate else "header + end marker"
        with open(work / "validated.jsonl", "a", encoding="utf-8") as state, \
                tqdm(total=num_entries, initial=len(results), unit="samples", smoothing=0.1,
                     desc=f"validate ({mode})", disable=not cfg.progress) as bar:
            chunk_size = cfg.chunk_size or (HEADER_CHUNK if cfg.fast_validate else DECODE_CHUNK)
            for chunk in _in_order(pool, _validate_chunk,
                                   _chunks(offsets, len(results), chunk_size), 4 * cfg.workers):
                state.write(_json.encode([["ok" if isinstance(r, Accepted) else "rejected", *r]
                                          for r in chunk]) + "\n")
                state.flush()
                results.extend(chunk)
                bar.update(len(chunk))
        log.info("validated %d entries in %.1f s", num_entries, time.perf_counter() - started)
        accepted = [r for r in results if isinstance(r, Accepted)]
        rejected = [r for r in results if isinstance(r, Rejected)]
        del results

        # plan + write: one task per shard, so workers never send image bytes to the parent
        digits = key_digits(num_entries)
        tasks = [(str(cfg.out / shard_name(k)),
                  [(offsets[2 * accepted[p].index], offsets[2 * accepted[p].index + 1], accepted[p])
                   for p in positions], digits)
                 for k, positions in enumerate(plan_shards([a.source for a in accepted], cfg.shard_size,
                                                           cfg.seed))]
        shard_stats: dict[str, ShardRecord] = {}
        publishing = []
        with tqdm(total=len(accepted), unit="samples", desc="write shards", smoothing=0.1,
                  disable=not cfg.progress) as bar, ThreadPoolExecutor(cfg.workers) as publisher:
            for done in as_completed([pool.submit(_write_or_keep, task) for task in tasks]):
                shard = done.result()
                if not shard.durable:
                    publishing.append(publisher.submit(_publish, shard.path))
                name = os.path.basename(shard.path)
                shard_stats[name] = ShardRecord(name=name, samples=shard.samples, bytes=shard.bytes,
                                                sha256=shard.sha256)
                bar.update(shard.samples)
            for done in publishing:
                done.result()  # raises an fsync or rename error here

    log.info("wrote %d shards; %.1f s in all", len(shard_stats), time.perf_counter() - started)
    write_text_atomically(cfg.out / REJECTED_FILE, "".join(
        json.dumps(r._asdict(), ensure_ascii=False) + "\n" for r in rejected))
    manifest = _write_manifest(cfg, identity, num_entries, accepted, rejected,
                               [shard_stats[k] for k in sorted(shard_stats)])
    shutil.rmtree(work)
    fsync_path(cfg.out)
    return manifest


def _write_manifest(cfg: ShardConfig, identity: dict, num_entries: int, accepted: list[Accepted],
                    rejected: list[Rejected], shards: list[ShardRecord]) -> Manifest:
    written_by_source = Counter(a.source for a in accepted)
    rejected_by_source = Counter(r.source for r in rejected)
    sources = {s: {"written": written_by_source[s], "rejected": rejected_by_source[s]}
               for s in sorted(written_by_source.keys() | rejected_by_source.keys())}
    return write_manifest(
        cfg.out,
        inputs={k: identity[k] for k in ("data", "data_sha256", "image_root", "shard_size", "fast_validate")},
        seed=cfg.seed, entries=num_entries, written=len(accepted), rejected=len(rejected),
        rejected_by_reason=dict(sorted(Counter(r.reason for r in rejected).items())),
        sources=sources, shards=shards)


def summary_table(manifest: Manifest, seconds: float | None = None):
    """A rich table of what a shard directory holds."""
    from rich.table import Table

    table = Table(title="divico prep shard", show_header=True)
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("entries", f"{manifest['entries']:,}")
    table.add_row("written", f"{manifest['written']:,}")
    table.add_row("rejected", f"{manifest['rejected']:,}")
    for reason, n in manifest["rejected_by_reason"].items():
        table.add_row(f"  {reason}", f"{n:,}")
    for source, n in manifest["sources"].items():
        table.add_row(f"source {source}", f"{n['written']:,} written, {n['rejected']:,} rejected")
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    sizes = [s["samples"] for s in manifest["shards"]] or [0]
    table.add_row("shards", f"{len(manifest['shards']):,} ({min(sizes)}-{max(sizes)} samples, "
                            f"{total_bytes / 1e9:.2f} GB)")
    if seconds:
        table.add_row("time", f"{seconds:.1f} s ({manifest['entries'] / seconds:,.0f} entries/s)")
    return table
