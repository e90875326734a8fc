"""The `divico` command. Each component adds its own subcommands here.

    divico prep {synth,shard,verify}   data_prep/
    divico bench {prep,model,train}    measured figures, printed
    divico train / export              pipeline/train.py, pipeline/export.py
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
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prep", help="shard LLaVA-665K-format data into webdataset tars")
    prep_cli.add_parsers(prep.add_subparsers(dest="prep_command", required=True))

    bench = commands.add_parser("bench", help="print measured throughput and efficiency figures")
    benches = bench.add_subparsers(dest="bench_command", required=True)
    prep_cli.add_bench_parser(benches)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args) or 0)


if __name__ == "__main__":
    main()
