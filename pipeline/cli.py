"""The `divico` command. Each component defines its own subcommands:

    divico prep {synth,shard,verify}         data_prep/
    divico train / export                    pipeline/train.py, pipeline/export.py
    divico checkpoint verify                 pipeline/train/checkpoint.py: checksums of a checkpoint or run
    divico eval                              pipeline/eval/: answer accuracy on a held-out set
    divico run                               pipeline/run.py: the embedded default (tiny model, CPU)
    divico model tiny                        pipeline/model/tiny.py: the tiny debug LLaVA, written to a folder
    divico import released                   pipeline/model/released.py: the authors' weights -> an export
    divico launch {local,slurm,status}       launch/
    divico bench {prep,loader,model,train,accuracy}   measured figures, printed
    divico report {efficiency,accuracy,overlay}   pipeline/report/: efficiency, accuracy vs tau, kept tokens
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (help, [(module, function that adds the command's parser)]). Only the chosen
# command's modules are imported, so `divico prep` starts without loading torch.
COMMANDS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "prep": ("shard LLaVA-665K-format data into webdataset tars", [("data_prep.cli", "add_parsers")]),
    "train": ("fine-tune one stage (DeepSpeed ZeRO-2; one epoch)", [("pipeline.train.main", "add_parser")]),
    "export": ("merge a checkpoint into a Hugging Face model folder", [("pipeline.train.export", "add_parser")]),
    "checkpoint": ("verify training checkpoints against their checksums", [("pipeline.train.checkpoint", "add_parsers")]),
    "eval": ("answer accuracy of a model on a held-out set", [("pipeline.eval.main", "add_parser")]),
    "run": ("the embedded default: every stage on a tiny model, on CPU", [("pipeline.run", "add_parser")]),
    "model": ("write a model folder: the tiny debug LLaVA", [("pipeline.model.tiny", "add_parser")]),
    "import": ("import weights from elsewhere: the authors' released DiViCo", [("pipeline.model.released", "add_parsers")]),
    "launch": ("run a pipeline's stage graph on SLURM or on this machine", [("launch.cli", "add_parser")]),
    "bench": ("print measured throughput and efficiency figures", [
        ("pipeline.bench.prep_throughput", "add_parser"),
        ("pipeline.bench.loader_throughput", "add_parser"),
        ("pipeline.bench.model_cost", "add_parser"),
        ("pipeline.bench.train_throughput", "add_parser"),
        ("pipeline.bench.accuracy", "add_parser"),
    ]),
    "report": ("reports on trained models: efficiency, accuracy against tau, kept-token overlays", [
        ("pipeline.report.efficiency", "add_parser"),
        ("pipeline.report.accuracy", "add_parser"),
        ("pipeline.report.overlay", "add_parser"),
    ]),
}
# Commands whose parser is a group: the components add leaves to it.
GROUPS = ("prep", "bench", "model", "checkpoint", "report", "import")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; only `command`'s component is imported and parses its arguments."""
    parser = argparse.ArgumentParser(prog="divico", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    # The deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK is read instead.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, registrations) in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=help_text)  # listed in --help, never parsed here
            continue
        target = commands
        if name in GROUPS:
            target = commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)
        for module, function in registrations:
            getattr(importlib.import_module(module), function)(target)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """A `divico` command line (without the program name); `args.func(args)` runs it. Also how
    `divico run` runs its stages in one process."""
    command = next((arg for arg in argv if arg in COMMANDS), None)
    return build_parser(command).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args) or 0)


if __name__ == "__main__":
    main()
