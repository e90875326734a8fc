"""`divico bench accuracy`: the paper's claims, measured on CPU on a task where compression matters.

    divico bench accuracy [--quick] [--seeds N] [--out DIR] [key=value ...]
    divico bench accuracy --curve [--every N] [--curve-questions Q] [--curve-steps S] [--out DIR]
    divico bench accuracy --ship-base [--out DIR]

Runs the stage graph configs/pipelines/bench_accuracy.yaml in this process (the grid task of
data_prep/grid.py -> shards -> the tiny grid LLaVA -> one base model -> every method's held-out
cell), then writes into DIR: report.md, results.json, results.csv, accuracy_vs_tau.png
(pipeline/bench/accuracy_report.py), kept_tokens.png (which visual tokens DiViCo keeps on a few held-out
images, like the paper's Fig. 6) and, in report.md's header, the command, the machine, the
package versions and the timings. Each cell is a file under DIR/cells, each stage's output a
file or folder: a rerun skips what is finished and an interrupted run resumes (training inside
its epoch too). key=value changes the graph file, e.g. vars.seeds=[0,1] vars.noise=0.5.

--quick: QUICK's smaller base and fewer cells, through the same graph, in minutes.
--curve: only the base model, trained N steps at a time and scored per question kind after each
slice (pipeline/bench/curve.py); the same base the table then uses.
The base: the export kept in the repository (pipeline/bench/shipped_base.py) whenever the graph
would train the same one; --retrain-base trains it here; --ship-base writes DIR's trained base
into the repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

from launch.local import run_in_process
from launch.stages import Pipeline, PipelineError, load_pipeline
from pipeline.bench import shipped_base
from pipeline.contract import EXIT_BAD_INPUT, EXIT_FAILURE, run_name

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "configs" / "pipelines" / "bench_accuracy.yaml"
# --quick: a smaller base model and held-out set, one seed, tau 1/9 only, one ablation.
QUICK = ["vars.train.samples=6000", "vars.finetune.samples=800", "vars.heldout.samples=800",
         "vars.taus=['${paper_tau:medium}']", "vars.seeds=[0]", "vars.ablations=[divico_init_zero]",
         "vars.k_sweep.layers=[1,2]", "vars.moe.taus=[0.0888889,'${paper_tau:medium}']"]
# The paired comparisons report.md shows (first, second) at every tau where both exist.
COMPARISONS = [("divico", "fastv"), ("divico", "fastervlm"), ("divico", "visionzip"), ("divico", "dart"),
               ("divico", "deco"), ("divico", "pdrop"), ("divico", "pdrop_trained"), ("divico_dart", "dart"),
               ("divico_dart", "divico"), ("divico", "random"),
               ("divico", "select_only"), ("divico", "point_estimate"), ("divico", "random_trained"),
               ("fastv", "random"), ("select_only", "random_trained")]
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "webdataset", "numpy")
FIGURE_IMAGES = 4


def add_parser(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("accuracy", help="held-out accuracy of every method x tau on the grid task "
                                                 "(Table I, II, Fig. 8 on CPU)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller base and fewer cells (minutes)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="fine-tune seeds 0..N-1 (default: the graph file's, 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/bench_accuracy, or runs/bench_accuracy_quick)")
    parser.add_argument("--only", default=None, metavar="STAGE[,STAGE]",
                        help="run only these stages of the graph (and those they need), then report "
                             "(e.g. eval_base,eval_training_free,eval_training_free_seeded,eval_k_sweep)")
    parser.add_argument("--curve", action="store_true",
                        help="train only the base, scoring it per kind every --every steps (the learning curve)")
    parser.add_argument("--every", type=int, default=100, metavar="N", help="--curve: steps between points")
    parser.add_argument("--curve-questions", type=int, default=400, metavar="Q",
                        help="--curve: held-out questions per point (the kinds in turn)")
    parser.add_argument("--curve-steps", type=int, default=None, metavar="S",
                        help="--curve: stop after this many steps of the base's epoch (resume later to go on)")
    parser.add_argument("--retrain-base", action="store_true",
                        help="train the base model although the repository ships one for these settings")
    parser.add_argument("--ship-base", action="store_true",
                        help="write DIR's trained base (fp16 export, sha256, record) to pipeline/bench/grid_base")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the graph file")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    for name, value in (("--seeds", args.seeds), ("--every", args.every), ("--curve-questions", args.curve_questions),
                        ("--curve-steps", args.curve_steps)):
        if value is not None and value < 1:
            print(f"error: {name} {value}: must be >= 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    out = (args.out or REPO / "runs" / ("bench_accuracy_quick" if args.quick else "bench_accuracy")).resolve()
    overrides = [f"root={out}", *(QUICK if args.quick else [])]
    if args.seeds is not None:
        overrides.append(f"vars.seeds=[{','.join(map(str, range(args.seeds)))}]")
    try:
        pipeline = load_pipeline(BENCH, [*overrides, *args.overrides], workdir=REPO)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.curve:
        from pipeline.bench.curve import learning_curve

        return learning_curve(pipeline, every=args.every, questions=args.curve_questions, max_steps=args.curve_steps)
    try:
        if args.ship_base:
            print(f"shipped base: {shipped_base.ship(pipeline)}")
            return 0
        if not args.retrain_base and shipped_base.applies(pipeline):
            pipeline = shipped_base.install(pipeline)
            print(f"base model: the repository's {shipped_base.SHIPPED} (--retrain-base trains it here)")
    except shipped_base.ShippedBaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if args.ship_base else EXIT_FAILURE
    if args.only:
        try:
            pipeline = pipeline.restricted(args.only.split(","))
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    started = time.perf_counter()
    status = run_in_process(pipeline, progress=True)
    if status != 0:
        return status
    return write_outputs(pipeline, out, seconds=time.perf_counter() - started)


def write_outputs(pipeline: Pipeline, out: Path, *, seconds: float) -> int:
    """The method table's report in `out`, the K sweep's in `out`/k_sweep and the MoE stage's in
    `out`/moe, each where its cells exist."""
    from pipeline.bench.accuracy_report import plot_moe, read_cells, write_report

    sweep = pipeline.vars["k_sweep"]
    k_comparisons = [(f"{first}_k{k}", f"{second}_k{k}") for k in sweep["layers"]
                     for first, second in itertools.combinations(sweep["methods"], 2)]
    reports = [(Path(pipeline.vars["cells"]), out, COMPARISONS, ""),
               (Path(sweep["cells"]), out / "k_sweep", k_comparisons,
                f"\n\nThe K sweep: the training-free methods with compression at layer K (rows METHOD_kK), "
                f"on the first {sweep['questions']} held-out questions."),
               (Path(pipeline.vars["moe"]["cells"]), out / "moe", [("moe", "specialist")],
                "\n\nThe Mixture-of-Experts stage: one model (per seed) for every tau, against the specialist "
                "DiViCo model trained at that tau or, at a tau no specialist was trained at, the one of the "
                "nearest tau (in log tau) run there.")]
    for cells_dir, where, comparisons, note in reports:
        if cells_dir.is_dir() and any(cells_dir.glob("*.json")):
            write_report(read_cells(cells_dir), where, comparisons=comparisons, header=header(pipeline, seconds) + note)
            print((where / "report.md").read_text())
            print(f"report, results and plots in {where}")
    moe_cells = Path(pipeline.vars["moe"]["cells"])
    if moe_cells.is_dir() and any(moe_cells.glob("*.json")):
        by_method: dict[str, list[dict]] = {}
        for path in sorted(moe_cells.glob("*.json")):
            summary = json.loads(path.read_text())
            by_method.setdefault(summary["tags"]["method"], []).append(summary)
        plot_moe(by_method, out / "moe" / "moe.png")
    plot_kept_tokens(pipeline, out / "kept_tokens.png")
    return 0


def header(pipeline: Pipeline, seconds: float) -> str:
    """The command, the machine, the package versions and the timings, for report.md."""
    versions = ", ".join(f"{name} {version(name)}" for name in PACKAGES)
    lines = [
        "# divico bench accuracy",
        "",
        f"- command: `{shlex.join(['divico', *sys.argv[1:]])}`",
        f"- graph: {pipeline.path.relative_to(REPO) if pipeline.path.is_relative_to(REPO) else pipeline.path}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- packages: {versions}",
        f"- base model: {shipped_base.describe(pipeline)}",
        f"- this run: {seconds / 60:.1f} min (finished cells from earlier runs are not counted)",
    ]
    return "\n".join(lines)


def plot_kept_tokens(pipeline: Pipeline, path: Path) -> None:
    """Which visual tokens DiViCo (the first seed's tau-1/9 model) keeps on a few held-out images:
    the kept patches are outlined, the dropped ones dimmed (the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoProcessor

    from pipeline.data.collator import CollatorConfig, LlavaCollator
    from pipeline.eval.data import first_question, read_samples
    from pipeline.eval.main import load_model

    settings = pipeline.vars
    tau = settings["ablation_tau"]
    model_dir = pipeline.root / "trained" / f"{run_name('divico', tau)}-seed{settings['seeds'][0]}" / "model"
    if not model_dir.is_dir():
        return
    model = load_model(model_dir, device="cpu").eval()
    collator = LlavaCollator(AutoProcessor.from_pretrained(model_dir), CollatorConfig(padding_side="left"),
                             AutoConfig.from_pretrained(model_dir))
    samples = [sample for _, sample in zip(range(FIGURE_IMAGES), read_samples(pipeline.root / "shards" / "heldout"))]
    batch = collator.prompts(samples)
    with torch.inference_mode():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], query_positions=batch["query_positions"])
    image_token = model.llava.config.image_token_id
    side = int(collator.num_visual_tokens ** 0.5)
    figure, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.6))
    for axis, sample, ids, kept in zip(np.atleast_1d(axes), samples, batch["input_ids"],
                                       output.compressed_positions):
        visual = (ids == image_token).nonzero().flatten()
        keep = torch.isin(visual, kept[kept >= 0]).reshape(side, side).numpy()
        image = np.asarray(sample.image.resize((side * 14, side * 14)), dtype=np.float32) / 255
        shade = np.kron(np.where(keep, 1.0, 0.35), np.ones((14, 14)))[..., None]
        axis.imshow(image * shade + (1 - shade) * 0.15)
        for row, col in zip(*keep.nonzero()):
            axis.add_patch(plt.Rectangle((col * 14 - 0.5, row * 14 - 0.5), 14, 14, fill=False, color="white", lw=1.5))
        axis.set_title(f"{first_question(sample)}\n-> {sample.conversations[1]['value']}", fontsize=7)
        axis.axis("off")
    figure.suptitle(f"DiViCo at tau {tau:.3f}: kept visual tokens ({int(keep.sum())} of {keep.size}) outlined")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
