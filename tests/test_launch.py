"""launch/: the stage graph, its validation, the rendered sbatch scripts, the local runner on
command stages, and the deepspeed launcher scripts' up-front checks. No SLURM needed here
(tests/test_launch_slurm.py uses the real cluster)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest

from launch import local, slurm
from launch.stages import PipelineError, load_pipeline
from pipeline.train.config import load_config, validate
from pipeline.contract import EXIT_BAD_INPUT, TAUS, TRAIN_SUMMARY_FILE, run_name

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/pipelines/demo.yaml"
DEEPSPEED_SCRIPTS = REPO / "launch" / "deepspeed"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_demo_pipeline_graph(tmp_path: Path) -> None:
    pipeline = load_pipeline(DEMO, [f"root={tmp_path}"], workdir=REPO)
    names = [stage.name for stage in pipeline.stages]
    for stage in pipeline.stages:  # dependency order
        assert all(names.index(dep) < names.index(stage.name) for dep in stage.after)
    divico = pipeline.stage("divico")
    assert divico.kind == "train" and divico.swept
    assert [task.label for task in divico.tasks] == ["tau067", "tau111", "tau167"]
    taus = [float(arg.removeprefix("divico.tau=")) for task in divico.tasks for arg in task.train_args
            if arg.startswith("divico.tau=")]
    assert taus == pytest.approx(TAUS, abs=1e-6)  # the paper's three, as pipeline/contract.py states them
    task = divico.tasks[1]
    assert f"model.base={tmp_path}/base/model" in task.train_args
    assert f"data.shards={tmp_path}/shards/finetune" in task.train_args
    assert f"train.output_dir={tmp_path}/divico-tau111" in task.train_args
    assert f"train.tensorboard_dir={tmp_path}/tensorboard" in task.train_args
    assert "train.stage=divico-tau111" in task.train_args and run_name("divico", TAUS[1]) == "divico-tau111"
    assert task.train_args[-2:] == ("--resume", "auto")
    assert task.outputs == (tmp_path / "divico-tau111" / TRAIN_SUMMARY_FILE,)
    assert task.command.startswith("divico train --config configs/debug/tiny.yaml")
    base = pipeline.stage("base").tasks[0]
    assert "train.stage=base" in base.train_args and f"data.shards={tmp_path}/shards/train" in base.train_args
    synth = pipeline.stage("synth")  # nested interpolation: per-split sizes and seeds from vars
    assert [t.command for t in synth.tasks] == [
        f"divico prep synth --out {tmp_path}/data/train --num-samples 4800 --seed 0",
        f"divico prep synth --out {tmp_path}/data/finetune --num-samples 800 --seed 1",
        f"divico prep synth --out {tmp_path}/data/heldout --num-samples 240 --seed 2"]
    assert pipeline.stage("tiny_llava").tasks[0].command == (
        f"divico model tiny --out {tmp_path}/tiny_llava --fit-text {tmp_path}/data/train/llava_v1_5_mix665k.json")
    evals = {task.outputs[0].name: shlex.split(task.command) for stage in ("eval_base", "eval_fastv", "eval_divico")
             for task in pipeline.stage(stage).tasks}
    assert list(evals) == ["base.json", "fastv-tau067.json", "fastv-tau111.json", "fastv-tau167.json",
                           "divico-tau067.json", "divico-tau111.json", "divico-tau167.json"]
    assert {f"model={tmp_path}/base/model", "divico.mode=fastv", "divico.tau=0.1111111", "--out"} <= set(evals["fastv-tau111.json"])
    assert f"model={tmp_path}/divico-tau111/model" in evals["divico-tau111.json"]
    assert all(f"data={tmp_path}/shards/heldout" in argv for argv in evals.values())
    # Plain `divico` command lines, so that `divico run` can run them in its own process.
    for stage in pipeline.stages:
        for task in stage.tasks:
            argv = shlex.split(task.command)
            assert argv[0] == "divico" and not {"&&", "||", ";", "|", ">", "<"} & set(argv), task.command


@pytest.mark.parametrize("stages, message", [
    ("a: {command: 'true', after: [nope]}", "unknown stage"),
    ("a: {command: 'true', after: [b]}\n  b: {command: 'true', after: [a]}", "cycle"),
    ("a: {after: []}", "exactly one of"),
    ("a: {command: 'true', resources: {tasks_per_node: 2}}", "one process"),
    ("a: {command: 'echo ${tau}'}", "tau"),
    ("a: {command: 'true', sweep: {root: [1]}}", "hides the top-level key"),
    ("a: {train: {config: [missing.yaml], output_dir: x}}", "missing.yaml"),
    ("a: {train: {config: [c.yaml], output_dir: x, overrides: [train.stage=x]}}", "not as overrides"),
    ("a: {train: {config: [c.yaml], output_dir: x}, resources: {tasks_per_node: 2, gpus_per_node: 4}}",
     "one rank per GPU"),
    ("a: {command: 'true', resourcez: {}}", "resourcez"),
    ("a: {command: 'true', sweep: {tau: [0.1, x]}}", "kept fractions"),
    ("a: {command: 'true', export: {}}", "`export` needs a train stage"),
    ("a: {train: {config: [c.yaml], output_dir: x}, export: {}}\n  a_model: {command: 'true'}", "a_model"),
])
def test_invalid_pipelines_name_the_problem(tmp_path: Path, stages: str, message: str) -> None:
    (tmp_path / "c.yaml").write_text("{}\n")
    path = tmp_path / "p.yaml"
    path.write_text(f"root: {tmp_path}/run\nstages:\n  {stages}\n")
    with pytest.raises(PipelineError, match=re.escape(message)) as error:
        load_pipeline(path, workdir=tmp_path)
    assert str(path) in str(error.value)


def test_include_and_export(tmp_path: Path) -> None:
    """An included file's stages come first and the including file's keys win; a train stage's
    `export` adds <name>_model after it, at the same sweep points."""
    (tmp_path / "c.yaml").write_text("{}\n")
    (tmp_path / "shared").mkdir()
    write(tmp_path / "shared" / "prefix.yaml", """\
        vars: {size: 1, name: shared}
        stages:
          data: {command: "divico prep synth --num-samples ${vars.size}", outputs: [out]}
        """)
    path = write(tmp_path / "p.yaml", """\
        include: [shared/prefix.yaml]
        root: run
        vars: {size: 2}
        stages:
          data: {resources: {time: "00:05:00"}}
          fit:
            after: [data]
            sweep: {tau: [0.1, 0.2]}
            train: {config: [c.yaml], output_dir: "${root}/fit-${tau}"}
            export: {options: --dtype fp32, resources: {cpus_per_task: 4}}
          use:
            after: [fit_model]
            sweep: {tau: [0.2]}
            command: divico eval model=${stages.fit.train.output_dir}/model name=${vars.name}
        """)
    pipeline = load_pipeline(path, workdir=tmp_path)
    assert [stage.name for stage in pipeline.stages] == ["data", "fit", "fit_model", "use"]
    assert pipeline.stage("data").tasks[0].command == "divico prep synth --num-samples 2"
    assert pipeline.stage("data").resources.time == "00:05:00"
    export = pipeline.stage("fit_model")
    run = tmp_path / "run"
    assert export.after == ("fit",) and export.resources.cpus_per_task == 4
    assert [task.command for task in export.tasks] == [
        f"divico export {run}/fit-{tau} --out {run}/fit-{tau}/model --dtype fp32" for tau in (0.1, 0.2)]
    assert [task.outputs for task in export.tasks] == [(run / f"fit-{tau}" / "model",) for tau in (0.1, 0.2)]
    assert pipeline.stage("use").tasks[0].command == f"divico eval model={run}/fit-0.2/model name=shared"
    write(path, "include: [nope.yaml]\nroot: run\nstages: {a: {command: 'true'}}\n")
    with pytest.raises(PipelineError, match="include nope.yaml: not found"):
        load_pipeline(path, workdir=tmp_path)


def test_a100_scripts(tmp_path: Path) -> None:
    pipeline = load_pipeline(REPO / "configs/pipelines/a100.yaml", [f"root={tmp_path}"], workdir=REPO)
    scripts = slurm.render(pipeline)
    train = scripts["divico"].read_text()
    for line in ["--partition=a100", "--account=my-project", "--nodes=2", "--ntasks-per-node=4",
                 "--gpus-per-node=a100:4", "--cpus-per-task=16", "--mem=480G", "--time=24:00:00",
                 "--array=0-2", "--signal=B:USR1@300", "--requeue", "--open-mode=append",
                 f"--output={tmp_path}/logs/divico/job-%A_%a.out"]:
        assert f"#SBATCH {line}\n" in train
    # sbatch reads directives only up to the first command.
    header, _, body = train.partition("\nset -euo pipefail")
    assert "#SBATCH" not in body and header.count("#SBATCH") >= 13
    assert 'MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)' in train
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in train
    # A crashed rank ends the step after this long instead of leaving its peers in a collective.
    assert f"srun --wait={slurm.RANK_EXIT_WAIT_SECONDS} " in train and slurm.RANK_EXIT_WAIT_SECONDS > 0
    divico = pipeline.stage("divico")
    assert [task.label for task in divico.tasks] == ["tau067", "tau111", "tau167"]
    assert f"train.output_dir={tmp_path}/divico-tau111" in divico.tasks[1].train_args
    prep = scripts["shards"].read_text()
    assert not {"#SBATCH --gpus-per-node", "#SBATCH --signal", "#SBATCH --array"} & set(
        line.split("=")[0] for line in prep.splitlines())
    baselines = pipeline.stage("baselines")
    assert [t.train_args[:4] for t in baselines.tasks][0] == (
        "--config", "configs/llava15_lora.yaml", "--config", "configs/methods/lora.yaml")
    # The MoE stage: from the base beside the sweep; warm-started after the sweep's exports, its
    # experts from the three specialists (the recipe it makes is valid, paths aside).
    assert pipeline.stage("moe").after == ("shards",) and "#SBATCH --nodes=2\n" in scripts["moe"].read_text()
    assert pipeline.stage("moe_warm").after == ("divico_model",)
    (warm,) = pipeline.stage("moe_warm").tasks
    recipes = [arg for flag, arg in zip(warm.train_args, warm.train_args[1:]) if flag == "--config"]
    overrides = [arg for arg in warm.train_args if "=" in arg and not arg.startswith("--")]
    cfg = load_config([REPO / recipe for recipe in recipes], overrides)
    validate(cfg, world_size=8, check_paths=False)
    # Evaluation: one single-GPU array task per benchmark and tau, after each model; then the report.
    evals = scripts["eval_divico"].read_text()
    assert "#SBATCH --array=0-14\n" in evals and "#SBATCH --gpus-per-node=a100:1\n" in evals
    eval_divico = pipeline.stage("eval_divico")
    assert eval_divico.after == ("divico_model",) and eval_divico.tasks[0].label == "benchmark-textvqa-tau067"
    assert eval_divico.tasks[0].command.startswith(
        f"divico eval --task textvqa model={tmp_path}/divico-tau067/model data=/datasets/llava-eval/textvqa ")
    assert "data=/datasets/llava-eval/MME " in pipeline.stage("eval_base").tasks[2].command
    assert pipeline.stage("report").tasks[0].command == f"divico report accuracy {tmp_path}/eval --out {tmp_path}/report"
    assert set(pipeline.stage("report").after) == {"eval_base", "eval_fastv", "eval_training_free", "eval_own_count", "eval_trained",
                                                   "eval_divico", "eval_moe"}
    assert cfg.divico.encoder == "moe" and cfg.moe.init_experts_from == [
        f"{tmp_path}/{name}/model" for name in ("divico-tau067", "divico-tau111", "divico-tau167")]
    assert [task.outputs[0] for task in pipeline.stage("divico_model").tasks] == [
        tmp_path / name / "model" for name in ("divico-tau067", "divico-tau111", "divico-tau167")]
    for script in scripts.values():
        subprocess.run(["bash", "-n", str(script)], check=True)  # syntax


def test_local_runner_order_skip_and_failure(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    path = write(tmp_path / "p.yaml", f"""\
        root: {tmp_path}/run
        stages:
          second:
            after: [first]
            sweep: {{n: [1, 2]}}
            command: echo second-${{n}} >> {trace} && touch ${{root}}/second-${{n}}
            outputs: ["${{root}}/second-${{n}}"]
          first:
            command: mkdir -p ${{root}} && echo first >> {trace} && touch ${{root}}/first
            outputs: ["${{root}}/first"]
          last:
            after: [second]
            command: echo last >> {trace}; exit 7
            outputs: ["${{root}}/never"]
        """)
    pipeline = load_pipeline(path, workdir=tmp_path)
    messages = []
    assert local.run(pipeline, echo=messages.append) == 7
    assert trace.read_text().split() == ["first", "second-1", "second-2", "last"]
    log = tmp_path / "run/logs/last/local-last.log"
    assert any(str(log) in message and "exit status 7" in message for message in messages)
    # Again: complete tasks are skipped, the failing one runs again.
    messages.clear()
    assert local.run(pipeline, echo=messages.append) == 7
    assert trace.read_text().split() == ["first", "second-1", "second-2", "last", "last"]
    assert sum("skipped" in message for message in messages) == 3


def test_in_process_runner_dispatches_divico_commands_here(tmp_path: Path) -> None:
    """The walk of `divico run`: real `divico prep` commands, run by this process from the
    pipeline's working directory; a rerun skips them; a failing one stops the walk with its status."""
    path = write(tmp_path / "p.yaml", f"""\
        root: {tmp_path}/run
        stages:
          synth:
            sweep: {{seed: [0, 1]}}
            command: divico prep synth --out data/${{seed}} --num-samples 3 --seed ${{seed}}
            outputs: ["{tmp_path}/data/${{seed}}/llava_v1_5_mix665k.json"]
          check:
            after: [synth]
            command: divico prep verify ${{root}}/no-shards
            outputs: ["${{root}}/never"]
        """)
    pipeline = load_pipeline(path, workdir=tmp_path)
    cwd = Path.cwd()
    messages = []
    assert local.run_in_process(pipeline, echo=messages.append) == 1  # verify's status: no shards there
    assert Path.cwd() == cwd
    first = (tmp_path / "data/0/llava_v1_5_mix665k.json").read_text()
    assert first != (tmp_path / "data/1/llava_v1_5_mix665k.json").read_text()  # the seeds reached the command
    assert messages[-1] == "== check check: failed with exit status 1"
    messages.clear()
    assert local.run_in_process(pipeline, echo=messages.append) == 1
    assert sum("outputs complete, skipped" in message for message in messages) == 2


def test_in_process_runner_refuses_shell_commands_before_running_any(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", f"""\
        root: {tmp_path}/run
        stages:
          first:
            command: divico prep synth --out {tmp_path}/data --num-samples 3
            outputs: ["{tmp_path}/data/llava_v1_5_mix665k.json"]
          second:
            after: [first]
            command: mkdir -p ${{root}} && touch ${{root}}/x
            outputs: ["${{root}}/x"]
        """)
    with pytest.raises(PipelineError, match=r"stage second \(second\): .* must be a `divico ...` line, got: mkdir"):
        local.run_in_process(load_pipeline(path, workdir=tmp_path))
    assert not (tmp_path / "data").exists()


def test_divico_run_names_a_bad_override(capsys) -> None:
    from pipeline.cli import parse

    args = parse(["run", "stages.base.train.config=[configs/debug/nope.yaml]"])
    assert args.func(args) == EXIT_BAD_INPUT
    assert "configs/debug/nope.yaml" in capsys.readouterr().err


def run_script(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO):
    return subprocess.run([str(DEEPSPEED_SCRIPTS / script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.mark.parametrize("script, args, env, message", [
    ("single_node.sh", ["--ranks", "2", "--", "--config", "configs/debug/tiny.yaml"], {"DS_ACCELERATOR": "cpu"},
     "--logs DIR is required"),
    ("single_node.sh", ["--ranks", "2", "--logs", "x", "--", "--config", "nope.yaml"], {"DS_ACCELERATOR": "cpu"},
     "--config nope.yaml: not found"),
    ("single_node.sh", ["--ranks", "0", "--logs", "x", "--", "--config", "configs/debug/tiny.yaml"],
     {"DS_ACCELERATOR": "cpu"}, "--ranks must be a positive integer"),
    ("single_node.sh", ["--gpus", "0,1", "--logs", "x", "--", "--config", "configs/debug/tiny.yaml"],
     {"DS_ACCELERATOR": "cpu"}, "use --ranks N, not --gpus"),
    ("single_node.sh", ["--gpus", "0,x", "--logs", "x", "--", "--config", "configs/debug/tiny.yaml"],
     {"DS_ACCELERATOR": ""}, "--gpus must list GPU indices"),
    ("multi_node.sh", ["--hostfile", "missing", "--logs", "x", "--", "--config", "configs/debug/tiny.yaml"],
     {}, "hostfile missing: not found"),
])
def test_deepspeed_scripts_fail_fast(script: str, args: list[str], env: dict[str, str], message: str) -> None:
    result = run_script(script, *args, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_deepspeed_gpu_count_is_checked(tmp_path: Path) -> None:
    result = run_script("single_node.sh", "--gpus", "0,1,2,3", "--logs", str(tmp_path), "--",
                        "--config", "configs/debug/tiny.yaml", env={"DS_ACCELERATOR": ""})
    assert result.returncode == 2
    # Without GPUs there is no nvidia-smi; with fewer than 4 the missing index is named.
    assert ("nvidia-smi not found" in result.stderr or "does not exist; this machine has" in result.stderr), result.stderr


@pytest.mark.parametrize("hostfile, extra, message", [
    ("node1 slots=4\nnode2 slot=4\n", [], "line 2: 'node2 slot=4' is not 'hostname slots=N'"),
    ("node1 slots=4\nnode1 slots=4\n", [], "lists a host twice"),
    ("# only a comment\n", [], "lists no hosts"),
    ("node1 slots=4\nnode2 slots=4\n", ["--node-rank", "2"], "must be 0..1"),
])
def test_hostfile_checks(tmp_path: Path, hostfile: str, extra: list[str], message: str) -> None:
    path = write(tmp_path / "hosts", hostfile)
    result = run_script("multi_node.sh", "--hostfile", str(path), *extra, "--logs", str(tmp_path / "logs"), "--",
                        "--config", "configs/debug/tiny.yaml", env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 2
    assert message in result.stderr
