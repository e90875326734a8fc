"""`divico prep {synth,shard,verify}`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from data_prep import grid
from data_prep.synth import TASKS
from pipeline.contract import EXIT_BAD_INPUT, EXIT_FAILURE
from pipeline.data.shard_format import MANIFEST_FILE, REJECTED_FILE

log = logging.getLogger(__name__)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser("synth", help="write a synthetic llava_v1_5_mix665k.json + images")
    synth.add_argument("--out", type=Path, required=True, help="output folder (empty or new)")
    synth.add_argument("--num-samples", type=int, default=3000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--defects", type=float, default=0.0, metavar="RATE",
                       help="share of entries given one of the real file's defects (0-1)")
    synth.add_argument("--realistic", action="store_true",
                       help="640x480 textured JPEGs of about 100 KB (benchmarks), not 336x336")
    synth.add_argument("--task", choices=TASKS, default="shapes",
                       help="shapes: a few large shapes (the demo's first task); grid: one small object per patch "
                            "and one-word questions (data_prep/grid.py; `divico bench accuracy`)")
    synth.add_argument("--questions", type=int, default=None, metavar="N",
                       help="grid task: N questions per image, their kinds in turn (held-out sets: 1); "
                            "default: 1-4, drawn as the real file's turn counts")
    synth.add_argument("--grid-side", type=int, default=None, metavar="N",
                       help=f"grid task: cells (= patches) per side, one of {grid.SIDES} (default {grid.DEFAULT_SIDE})")
    synth.add_argument("--kinds", default=None, metavar="K1,K2",
                       help=f"grid task: the question kinds asked, in turn, of {','.join(grid.QUESTION_KINDS)} "
                            f"(default {','.join(grid.HEADLINE_KINDS)})")
    synth.set_defaults(func=_synth)

    shard = commands.add_parser("shard", help="validate entries + images and write webdataset shards")
    shard.add_argument("--data", type=Path, required=True, help="llava_v1_5_mix665k.json")
    shard.add_argument("--image-root", type=Path, required=True,
                       help="folder holding coco/, gqa/, ocr_vqa/, textvqa/, vg/")
    shard.add_argument("--out", type=Path, required=True, help="shard folder (empty or new)")
    shard.add_argument("--workers", type=int, default=None,
                       help="processes that validate and write (default: the CPUs this job may use)")
    shard.add_argument("--seed", type=int, default=0, help="shuffle seed")
    shard.add_argument("--shard-size", type=int, default=5000, help="target samples per shard")
    shard.add_argument("--resume", action="store_true", help="finish an interrupted job in --out")
    shard.add_argument("--fast-validate", action="store_true",
                       help="check headers, sizes and end markers instead of decoding images")
    shard.set_defaults(func=_shard)

    verify = commands.add_parser("verify", help="re-read shards with webdataset, check the manifest")
    verify.add_argument("dir", type=Path, help="shard folder written by `divico prep shard`")
    verify.set_defaults(func=_verify)


def _synth(args: argparse.Namespace) -> int:
    from data_prep.synth import SynthConfig, generate

    if not 0 <= args.defects <= 1:
        print(f"error: --defects {args.defects}: must be in [0, 1]", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.num_samples < 1:
        print(f"error: --num-samples {args.num_samples}: must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.questions is not None and (args.questions < 1 or args.task != "grid"):
        print(f"error: --questions {args.questions}: must be >= 1, with --task grid", file=sys.stderr)
        return EXIT_BAD_INPUT
    grid_options = {}
    for name, value in (("--grid-side", args.grid_side), ("--kinds", args.kinds)):
        if value is not None and args.task != "grid":
            print(f"error: {name}: only with --task grid", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.grid_side is not None:
        if args.grid_side not in grid.SIDES:
            print(f"error: --grid-side {args.grid_side}: expected one of {grid.SIDES}", file=sys.stderr)
            return EXIT_BAD_INPUT
        grid_options["grid_side"] = args.grid_side
    if args.kinds is not None:
        kinds = tuple(args.kinds.split(","))
        unknown = [kind for kind in kinds if kind not in grid.QUESTION_KINDS]
        if unknown or not kinds:
            print(f"error: --kinds {args.kinds}: unknown kind(s) {unknown}; expected of {grid.QUESTION_KINDS}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        grid_options["kinds"] = kinds
    try:
        path = generate(SynthConfig(out=args.out, num_samples=args.num_samples, seed=args.seed,
                                    defects=args.defects, realistic=args.realistic, task=args.task,
                                    questions=args.questions, **grid_options))
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path} and {args.out / 'images'}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from rich.console import Console

    from data_prep.shard import PrepError, ShardConfig, default_workers, run_shard, summary_table

    cfg = ShardConfig(data=args.data, image_root=args.image_root, out=args.out,
                      workers=args.workers or default_workers(), seed=args.seed,
                      shard_size=args.shard_size, resume=args.resume,
                      fast_validate=args.fast_validate)
    started = time.perf_counter()
    try:
        manifest = run_shard(cfg)
    except PrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    Console().print(summary_table(manifest, time.perf_counter() - started))
    print(f"shards, {MANIFEST_FILE} and {REJECTED_FILE} in {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify

    problems = verify(args.dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"verify FAILED: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"verify OK: {args.dir}")
    return 0
