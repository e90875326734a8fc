"""`divico bench prep` on a small set: every variant runs and every figure is reported."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.bench.prep_throughput import TIMED, BenchConfig, run_bench

# the keys issue 2 asks for, and the floor and fsync comparisons beside them
REQUIRED = {"prep_samples_per_s", "decode_samples_per_s", "ratio_to_decode", "fast_samples_per_s",
            "tar_samples_per_s", "fast_ratio_to_tar", "worker_scaling",
            "loader_samples_per_s_per_worker", "copy_hash_samples_per_s",
            "fast_ratio_to_copy_hash", "tar_fsync_samples_per_s", "fast_ratio_to_tar_fsync"}


def test_bench_prep_reports_every_figure(tmp_path: Path) -> None:
    figures = run_bench(BenchConfig(num_samples=24, work_dir=tmp_path, shard_size=5, repeats=2))
    assert REQUIRED <= figures.keys()
    assert figures["samples"] == 24 and figures["mean_image_kb"] > 20  # photo-sized JPEGs
    measured = [k for k in figures if k.endswith("_per_s") or "ratio" in k or "scaling" in k]
    assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in measured)
    assert figures["timed"] == TIMED
    assert list(tmp_path.iterdir()) == []  # the set and every output were removed
