"""`divico run`: the embedded default. The whole pipeline on CPU, on a tiny LLaVA, in minutes.

    synthetic data (train, finetune, held-out: three seeds)  ->  shards  ->  tiny LLaVA (random init)
      -> stage "base": the tiny model (language model, projector and its random CLIP tower) trained
         in full on "train", no compression (standing in for the released LLaVA-1.5 weights)
      -> stage "divico-tau<1000*tau>" for each tau: LoRA + DiViCo from that base, one epoch of "finetune"
      -> held-out answer accuracy of each model (and of training-free FastV on the base) vs chance

Everything goes under --root (runs/demo); a stage whose output is complete is skipped on rerun,
an interrupted one resumes from its newest checkpoint. Ends with a summary table and the
TensorBoard command.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TAUS = (1 / 15, 1 / 9, 1 / 6)  # the paper's large / medium / small compression


@dataclass
class DemoConfig:
    root: Path = Path("runs/demo")
    train_samples: int = 4800
    finetune_samples: int = 800
    heldout_samples: int = 240
    taus: tuple[float, ...] = TAUS
    seed: int = 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("run", help="the embedded default: every stage on a tiny model, on CPU",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DemoConfig.root, help="output folder (default runs/demo)")
    parser.add_argument("--train-samples", type=int, default=DemoConfig.train_samples)
    parser.add_argument("--finetune-samples", type=int, default=DemoConfig.finetune_samples)
    parser.add_argument("--heldout-samples", type=int, default=DemoConfig.heldout_samples)
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS), help="kept fractions, one stage each")
    parser.set_defaults(func=lambda args: run(DemoConfig(
        root=args.root, train_samples=args.train_samples, finetune_samples=args.finetune_samples,
        heldout_samples=args.heldout_samples, taus=tuple(args.taus))))


def stage_name(tau: float) -> str:
    return f"divico-tau{round(tau * 1000):03d}"


def prepare_data(cfg: DemoConfig) -> list[Path]:
    """Synthetic train, finetune and held-out sets (different seeds), each sharded; skipped when present."""
    from data_prep.shard import ShardConfig, run_shard
    from data_prep.synth import SynthConfig, generate

    shard_dirs = []
    splits = (("train", cfg.train_samples), ("finetune", cfg.finetune_samples), ("heldout", cfg.heldout_samples))
    for offset, (split, samples) in enumerate(splits):
        seed = cfg.seed + offset
        raw, shards = cfg.root / "data" / split, cfg.root / "shards" / split
        if not (raw / "llava_v1_5_mix665k.json").is_file():
            partial = raw.with_name(f"{split}.tmp")
            shutil.rmtree(partial, ignore_errors=True)
            generate(SynthConfig(out=partial, num_samples=samples, seed=seed))
            partial.rename(raw)
        if not (shards / "manifest.json").is_file():
            run_shard(ShardConfig(data=raw / "llava_v1_5_mix665k.json", image_root=raw / "images", out=shards,
                                  seed=seed, shard_size=1000, resume=shards.exists(), progress=False))
        shard_dirs.append(shards)
    return shard_dirs


def tiny_model(cfg: DemoConfig) -> Path:
    from pipeline.model.tiny import save_tiny_llava

    path = cfg.root / "tiny_llava"
    if not (path / "config.json").is_file():
        # The tokenizer's merges learn the synthetic data's words: short sequences, faster steps.
        text = (cfg.root / "data" / "train" / "llava_v1_5_mix665k.json").read_text()
        partial = path.with_name("tiny_llava.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        save_tiny_llava(partial, extra_text=text)
        partial.rename(path)
    return path


def train_stage(cfg: DemoConfig, name: str, base: Path, shards: Path, config_files: list[str],
                overrides: list[str]) -> Path:
    """Train one stage (or resume it) and export it; returns the exported model folder."""
    import torch

    from pipeline.contract import EXIT_PREEMPTED
    from pipeline.train.export import export
    from pipeline.train.main import train

    out = cfg.root / name
    model_dir = out / "model"
    if model_dir.is_dir():
        log.info("stage %s: complete, skipped (%s)", name, model_dir)
        return model_dir
    started = time.perf_counter()
    status = train([CONFIGS / "debug" / f for f in config_files],
                   [f"model.base={base}", f"data.shards={shards}", f"train.output_dir={out}",
                    f"train.tensorboard_dir={cfg.root / 'tensorboard'}", f"train.stage={name}",
                    f"train.deepspeed_config={CONFIGS / 'deepspeed' / 'zero2.json'}", *overrides], resume="auto")
    if status == EXIT_PREEMPTED:
        raise SystemExit(status)
    if status != 0:
        raise RuntimeError(f"stage {name} failed with status {status}; see the log above")
    export(out, model_dir, dtype=torch.float32)
    log.info("stage %s: trained and exported in %.0f s", name, time.perf_counter() - started)
    return model_dir


def evaluate_model(cfg: DemoConfig, name: str, model: Path, heldout: Path, mode: str | None = None,
                   tau: float | None = None) -> dict:
    from pipeline.eval.evaluate import EvalConfig, main

    path = cfg.root / "eval" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = main(EvalConfig(model=model, data=heldout, batch_size=40, max_new_tokens=4, mode=mode, tau=tau,
                             model_max_length=512, device="cpu"), progress=False).summary()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def run(cfg: DemoConfig) -> int:
    started = time.perf_counter()
    train_shards, finetune_shards, heldout = prepare_data(cfg)
    tiny = tiny_model(cfg)
    log.info("data and tiny model ready in %.0f s", time.perf_counter() - started)

    rows = []
    base = train_stage(cfg, "base", tiny, train_shards, ["tiny.yaml", "tiny_base.yaml"], [])
    rows.append(("base", "none", None, base, evaluate_model(cfg, "base", base, heldout)))
    for tau in cfg.taus:
        rows.append((f"fastv-tau{round(tau * 1000):03d}", "fastv (no training)", tau, None,
                     evaluate_model(cfg, f"fastv-tau{round(tau * 1000):03d}", base, heldout, mode="fastv", tau=tau)))
        name = stage_name(tau)
        model = train_stage(cfg, name, base, finetune_shards, ["tiny.yaml"], [f"divico.tau={tau}"])
        rows.append((name, "divico", tau, model, evaluate_model(cfg, name, model, heldout)))
    print_summary(cfg, rows, time.perf_counter() - started)
    return 0


def print_summary(cfg: DemoConfig, rows: list, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"divico run: held-out accuracy on {cfg.heldout_samples} synthetic questions")
    for column in ("stage", "mode", "tau", "visual tokens kept", "accuracy", "chance", "final train loss",
                   "train tokens/s", "eval tokens/s"):
        table.add_column(column, justify="left" if column in ("stage", "mode") else "right", no_wrap=True)
    for name, mode, tau, model, result in rows:
        summary_path = cfg.root / name / "train_summary.json"
        train = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        table.add_row(name, mode, f"{tau:.3f}" if tau else "-",
                      f"{result['visual_tokens_kept']} / {result['visual_tokens']}",
                      f"{result['accuracy']:.1%}", f"{result['chance']:.1%}",
                      f"{train['train/lm_loss']:.3f}" if train else "-",
                      f"{train['run/tokens_per_s']:.0f}" if train else "-", f"{result['tokens_per_s']:.0f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"finished in {seconds / 60:.1f} min. Chance = always giving each question type's most common answer.\n"
          f"Models: {cfg.root}/<stage>/model. TensorBoard: tensorboard --logdir {cfg.root / 'tensorboard'}")
