"""The `divico` command. Each component adds its own subcommands here.

    divico prep {synth,shard,verify}   data_prep/
    divico bench {prep,loader,model,train}  measured figures, printed
    divico train / export              pipeline/train.py, pipeline/export.py
    divico eval                        pipeline/evaluate.py: answer accuracy on a held-out set
    divico launch {local,slurm}        launch/
    divico run                         the embedded default: every stage, tiny model, CPU
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    # Component imports stay inside so `divico --help` is fast and a missing optional
    # dependency only breaks the subcommand that needs it.
    from data_prep import cli as prep_cli

    parser = argparse.ArgumentParser(prog="divico", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    # The deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK is read instead.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prep", help="shard LLaVA-665K-format data into webdataset tars")
    prep_cli.add_parsers(prep.add_subparsers(dest="prep_command", required=True))

    bench = commands.add_parser("bench", help="print measured throughput and efficiency figures")
    benches = bench.add_subparsers(dest="bench_command", required=True)
    prep_cli.add_bench_parser(benches)
    from pipeline.model import bench as model_bench

    model_bench.add_bench_parser(benches)
    from pipeline.data import loader

    loader.add_bench_parser(benches)

    from pipeline import bench_train, export, run, train

    bench_train.add_parser(benches)
    train.add_parser(commands)
    export.add_parser(commands)
    run.add_parser(commands)
    from pipeline import evaluate

    evaluate.add_parser(commands)
    from launch import cli as launch_cli

    launch_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args) or 0)


if __name__ == "__main__":
    main()
