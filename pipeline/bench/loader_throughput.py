"""`divico bench loader SHARD_DIR`: decoded samples/s of the training loader, against a bare PIL loop."""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.loader import ShardDataset, build_loader


def measure_throughput(shard_dir: str | os.PathLike, *, num_workers: int, batch_size: int = 16,
                       max_samples: int | None = None) -> dict[str, float]:
    """Decode one rank-0 epoch (or `max_samples`) of `shard_dir` through build_loader and time it.

    The clock starts after the index is loaded and includes worker start-up.
    """
    dataset = ShardDataset(shard_dir, rank=0, world_size=1, batch_size=batch_size, seed=0)
    # Collate to a count: this measures read + decode in the workers, not pickling pixels back.
    loader = build_loader(dataset, num_workers=num_workers, collate_fn=len, pin_memory=False)
    limit = max_samples or len(dataset)
    decoded, started = 0, time.perf_counter()
    for count in loader:
        decoded += count
        if decoded >= limit:
            break
    seconds = time.perf_counter() - started
    return {"num_workers": num_workers, "samples": decoded, "seconds": seconds,
            "samples_per_s": decoded / seconds,
            "samples_per_s_per_worker": decoded / seconds / max(1, num_workers)}


def add_parser(benches: argparse._SubParsersAction) -> None:
    """`divico bench loader SHARD_DIR`: decoded samples/s of this loader on a shard directory."""
    bench = benches.add_parser("loader", help="decode throughput of the training loader on a shard directory")
    bench.add_argument("shard_dir", type=Path)
    bench.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                       help="loader worker counts to measure (0 = in the main process)")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--max-samples", type=int, default=None, help="stop each measurement after this many")
    bench.set_defaults(func=run_bench)


def bare_decode_rate(shard_dir: str | os.PathLike, *, max_samples: int = 500) -> float:
    """Images/s of a plain PIL decode loop over the same images held in memory: one core's ceiling."""
    dataset = ShardDataset(shard_dir, rank=0, world_size=1, batch_size=1, seed=0)
    index = dataset.index
    encoded = []
    for sample in np.flatnonzero(index.image_size >= 0)[:max_samples]:
        path = dataset.shard_dir / index.shard_names[index.shard[sample]]
        with open(path, "rb") as file:
            file.seek(int(index.image_offset[sample]))
            encoded.append(file.read(int(index.image_size[sample])))
    started = time.perf_counter()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    return len(encoded) / (time.perf_counter() - started)


def run_bench(args: argparse.Namespace) -> None:
    print(f"bare PIL decode loop (no loader): {bare_decode_rate(args.shard_dir):.0f} images/s")
    for workers in args.workers:
        figures = measure_throughput(args.shard_dir, num_workers=workers, batch_size=args.batch_size,
                                     max_samples=args.max_samples)
        print(f"workers={workers}: {figures['samples']} samples in {figures['seconds']:.2f} s = "
              f"{figures['samples_per_s']:.0f} decoded samples/s, "
              f"{figures['samples_per_s_per_worker']:.0f} per worker")
