"""`divico bench accuracy --curve`: the base model's learning curve, per question kind.

The graph's `base` stage is trained through the real `divico train`, `--every` optimizer steps
at a time (train.max_steps, then --resume auto: the same run as one uninterrupted epoch).
After each slice its newest checkpoint is exported and scored on the first `--questions`
held-out questions: greedy accuracy and teacher-forced loss of the answer per kind. Each point
is printed, appended to <root>/curve/curve.jsonl (curve.png plots them) and logged to
TensorBoard as the run <stage>-heldout beside the base's own run (heldout/accuracy/<kind>,
heldout/loss/<kind>; a run of its own, since a resumed training run purges its steps after the
checkpoint). A killed run resumes from the newest checkpoint and keeps the points it has.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from launch.local import run_in_process
from launch.stages import Pipeline
from pipeline.contract import IGNORE_INDEX, TRAIN_SUMMARY_FILE

BASE_STAGE = "base"


def learning_curve(pipeline: Pipeline, *, every: int, questions: int, max_steps: int | None = None) -> int:
    """Train the base stage slice by slice, scoring each slice's checkpoint; the exit status."""
    from pipeline.cli import parse
    from pipeline.train.main import train

    base = pipeline.stage(BASE_STAGE)
    status = run_in_process(pipeline.restricted(pipeline.upstream([BASE_STAGE])))  # what the base needs
    if status != 0:
        return status
    (task,) = base.tasks
    args = parse(["train", *task.train_args])
    output_dir = Path(_override(args.overrides, "train.output_dir"))
    tensorboard = pipeline.tensorboard_dir / f"{_override(args.overrides, 'train.stage')}-heldout"
    curve_dir = pipeline.root / "curve"
    curve_dir.mkdir(parents=True, exist_ok=True)
    points = read_points(curve_dir / "curve.jsonl")
    while not (output_dir / TRAIN_SUMMARY_FILE).is_file():
        step = _newest_step(output_dir)
        if max_steps is not None and step >= max_steps:
            break
        status = train(args.config, [*args.overrides, f"train.max_steps={every}", f"train.save_every_steps={every}"],
                       resume="auto")
        if status != 0:
            return status
        step = _newest_step(output_dir)
        if step not in {point["step"] for point in points}:
            point = score_checkpoint(output_dir, pipeline.root / "shards" / "heldout", curve_dir, questions=questions,
                                     tensorboard=tensorboard)
            points.append(point)
            with (curve_dir / "curve.jsonl").open("a") as file:
                file.write(json.dumps(point) + "\n")
            print(format_point(point), flush=True)
    plot_curve(points, curve_dir / "curve.png")
    print(f"learning curve: {curve_dir / 'curve.jsonl'}, {curve_dir / 'curve.png'}")
    return 0


def _override(overrides: list[str], key: str) -> str:
    return next(item.split("=", 1)[1] for item in reversed(overrides) if item.startswith(f"{key}="))


def _newest_step(output_dir: Path) -> int:
    from pipeline.train.checkpoint import latest_checkpoint, read_state

    newest = latest_checkpoint(output_dir)
    return read_state(newest).step if newest else 0


def read_points(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def score_checkpoint(output_dir: Path, heldout: Path, curve_dir: Path, *, questions: int, tensorboard: Path) -> dict:
    """Export the newest checkpoint of `output_dir`, score it on `questions` held-out questions,
    log the point to TensorBoard under `tensorboard`; the point."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers import AutoConfig, AutoProcessor

    from pipeline.data.collator import CollatorConfig, LlavaCollator
    from pipeline.eval.data import read_samples
    from pipeline.eval.main import evaluate, load_model
    from pipeline.train.checkpoint import latest_checkpoint, read_state
    from pipeline.train.export import export

    ckpt = latest_checkpoint(output_dir)
    step = read_state(ckpt).step
    model_dir = curve_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    export(ckpt, model_dir, dtype=torch.float32)
    model = load_model(model_dir, device="cpu")
    collator = LlavaCollator(AutoProcessor.from_pretrained(model_dir), CollatorConfig(padding_side="left"),
                             AutoConfig.from_pretrained(model_dir))
    samples = [sample for _, sample in zip(range(questions), read_samples(heldout))]
    result = evaluate(model, collator, samples, batch_size=100, max_new_tokens=2, progress=False)
    losses = answer_losses(model, collator, samples)
    point = {"step": step, "accuracy": result.accuracy, "questions": result.samples,
             "accuracy_by_kind": {kind: stats["accuracy"] for kind, stats in result.by_type.items()},
             "chance_by_kind": {kind: stats["chance"] for kind, stats in result.by_type.items()},
             "loss_by_kind": losses}
    writer = SummaryWriter(str(tensorboard))
    for kind, value in point["accuracy_by_kind"].items():
        writer.add_scalar(f"heldout/accuracy/{kind}", value, step)
    for kind, value in losses.items():
        writer.add_scalar(f"heldout/loss/{kind}", value, step)
    writer.close()
    return point


@torch.inference_mode()
def answer_losses(model: torch.nn.Module, collator, samples: list, batch_size: int = 100) -> dict[str, float]:
    """Teacher-forced cross-entropy of each sample's supervised tokens (its answers and their
    end-of-sequence token), averaged per sample, then over the samples of each question kind."""
    from pipeline.eval.data import question_type

    per_kind: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = collator(chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits.float()
        labels = batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                       ignore_index=IGNORE_INDEX, reduction="none")
        supervised = (labels != IGNORE_INDEX).float()
        sample_loss = (token_loss * supervised).sum(1) / supervised.sum(1).clamp(min=1)
        for sample, loss in zip(chunk, sample_loss.tolist()):
            per_kind[question_type(sample)].append(loss)
    return {kind: sum(values) / len(values) for kind, values in sorted(per_kind.items())}


def format_point(point: dict) -> str:
    kinds = "  ".join(f"{kind} {accuracy:.3f} (chance {point['chance_by_kind'][kind]:.2f}, "
                      f"loss {point['loss_by_kind'].get(kind, float('nan')):.2f})"
                      for kind, accuracy in sorted(point["accuracy_by_kind"].items()))
    return f"step {point['step']:>5}  all {point['accuracy']:.3f} of {point['questions']}  {kinds}"


def plot_curve(points: list[dict], path: Path) -> None:
    """Held-out accuracy per kind against the optimizer step, each kind's chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return
    points = sorted(points, key=lambda point: point["step"])
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for kind in sorted(points[-1]["accuracy_by_kind"]):
        steps = [point["step"] for point in points if kind in point["accuracy_by_kind"]]
        line, = axis.plot(steps, [point["accuracy_by_kind"][kind] for point in points
                                  if kind in point["accuracy_by_kind"]], marker="o", ms=3, label=kind)
        axis.axhline(points[-1]["chance_by_kind"][kind], color=line.get_color(), ls=":", lw=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"held-out accuracy ({points[-1]['questions']} questions)")
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower right")
    axis.set_title("grid base: learning curve per kind (dotted: chance)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
