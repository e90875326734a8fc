"""`divico train`: one epoch of LoRA (or full) fine-tuning with DiViCo under DeepSpeed ZeRO-2.

    deepspeed --num_gpus 4 $(which divico) train --config configs/llava15_lora.yaml \
        --config configs/methods/divico.yaml [divico.tau=T] [key=value ...] [--resume auto]

setup (config, validation, process group) -> main (model, data, engine, resume) -> fit (loop).
How a process joins the job and how preemption works: distributed.py; the model and DeepSpeed
config a recipe makes: build.py; checkpoints: checkpoint.py; TensorBoard: metrics.py.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train.config import ConfigError, RunConfig, load_config, save_config, to_dict, validate
from pipeline.contract import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_PREEMPTED, TRAIN_SUMMARY_FILE, tau_label
from pipeline.device import default_dtype
from pipeline.train import checkpoint
from pipeline.train.build import build_model, deepspeed_config, lr_scheduler
from pipeline.train.distributed import (
    PREEMPTION_SIGNALS,
    TrainingError,
    install_preemption_handlers,
    map_slurm_env,
    preemption_requested,
    release_cpu_allreduce_buffer,
    single_process_env,
)
from pipeline.train.metrics import Metrics, peak_memory_gib
from pipeline.train.rates import step_inputs

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- setup


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="fine-tune one stage (DeepSpeed ZeRO-2; one epoch)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="recipe YAML file; repeat to merge several in order (later ones win)")
    parser.add_argument("--resume", default="none",
                        help="'auto' (newest complete checkpoint in the output dir, if any), a checkpoint "
                             "directory, or 'none' (default; refuses an output dir that has checkpoints)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. divico.tau=0.111")
    parser.set_defaults(func=setup)


def setup(args: argparse.Namespace) -> int:
    return train(args.config, args.overrides, resume=args.resume)


def train(config_paths: list[str | Path], overrides: list[str] | None = None, *, resume: str = "none") -> int:
    """Validate, join (or create) the process group, run one stage; the exit status."""
    try:
        cfg = load_config(config_paths, overrides)
        map_slurm_env()
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any heavy import or model load
        absolute_paths(cfg)
        resume_from = _resume_checkpoint(Path(cfg.train.output_dir), resume)
    except (ConfigError, TrainingError) as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    except checkpoint.CheckpointError as error:
        log.error("%s", error)
        return EXIT_FAILURE
    single_process_env()

    import deepspeed

    if not dist.is_initialized():  # `divico run` trains several stages in one process
        deepspeed.init_distributed(timeout=timedelta(minutes=cfg.train.dist_timeout_minutes))
        atexit.register(dist.destroy_process_group)
        atexit.register(release_cpu_allreduce_buffer)
    install_preemption_handlers()
    try:
        return main(cfg, resume_from=resume_from)
    except TrainingError as error:
        log.error("%s", error)
        return EXIT_FAILURE


# ----------------------------------------------------------------------------- main


@dataclass
class Run:
    cfg: RunConfig
    engine: object
    model: torch.nn.Module
    peft_model: object
    loader: torch.utils.data.DataLoader
    metrics: Metrics
    rank: int
    world_size: int
    total_steps: int
    start_step: int
    stop_step: int
    resumed_from: Path | None
    visual_tokens: int  # per image, before compression
    config_yaml: str
    sample_log: Path | None
    sums: SumsLayout
    collator: object  # the training collator (its prompts() make the overlay's prompts)
    overlay_samples: list  # train.overlay_data's first image samples, on rank 0 (else empty)


def main(cfg: RunConfig, *, resume_from: Path | None = None) -> int:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from pipeline.data.loader import ShardDataset, build_loader

    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = get_accelerator().device_name()
    on_gpu = device != "cpu"
    if on_gpu:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif "OMP_NUM_THREADS" not in os.environ:
        # OpenMP threads spin while they wait: more threads than free cores (ranks x threads +
        # loader workers) makes CPU training 10-30x slower, so leave a core per loader worker.
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here - cfg.data.num_workers))
    t = cfg.train
    dtype = {"auto": default_dtype(device), "bf16": torch.bfloat16, "fp32": torch.float32}[t.precision]
    bf16 = dtype == torch.bfloat16
    output_dir = Path(t.output_dir)
    torch.manual_seed(t.seed)

    built = build_model(cfg, dtype=dtype, on_gpu=on_gpu)
    accumulation = t.global_batch_size // (t.micro_batch_size * world_size)
    state = checkpoint.read_state(resume_from) if resume_from else None
    dataset = ShardDataset(cfg.data.shards, rank=rank, world_size=world_size, batch_size=t.micro_batch_size,
                           seed=cfg.data.seed, start_sample=state.samples_per_rank if state else 0,
                           group_by_length=cfg.data.group_by_modality_length)
    total_steps = dataset.samples_per_rank // (t.micro_batch_size * accumulation)
    if total_steps < 1:
        raise TrainingError(f"{cfg.data.shards}: {dataset.samples_per_rank} samples per rank is less than one "
                            f"global batch ({t.global_batch_size}); lower train.global_batch_size")
    if rank == 0:
        left = dataset.samples_per_rank - total_steps * t.micro_batch_size * accumulation
        log.info("one epoch = %d optimizer steps of %d samples (%d per rank not used: less than a global batch)",
                 total_steps, t.global_batch_size, left)
    loader = build_loader(dataset, num_workers=cfg.data.num_workers,
                          collate_fn=partial(_collate_with_keys, built.collator))

    engine, *_ = deepspeed.initialize(model=built.model, model_parameters=built.param_groups,
                                      config=deepspeed_config(cfg, total_steps, accumulation, bf16, on_gpu),
                                      lr_scheduler=lr_scheduler(cfg, total_steps))
    start_step = 0
    if resume_from:
        state = checkpoint.resume(engine, resume_from, world_size=world_size)
        start_step = state.step
        if state.total_steps != total_steps:
            raise TrainingError(f"{resume_from} belongs to a {state.total_steps}-step epoch, this config makes "
                                f"{total_steps} steps (batch size or data changed)")
        if rank == 0:
            log.info("resuming from %s at step %d/%d", resume_from, start_step, total_steps)
    stop_step = min(total_steps, start_step + t.max_steps) if t.max_steps else total_steps

    config_yaml, run_name = _yaml(cfg), cfg.train.stage
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    metrics = Metrics(Path(t.tensorboard_dir or output_dir / "tensorboard") / run_name, enabled=rank == 0,
                      total_steps=total_steps, start_step=start_step, config=to_dict(cfg),
                      config_yaml=config_yaml, description=run_name)
    sample_log = None
    if t.log_sample_keys:
        sample_log = output_dir / "samples" / f"rank-{rank:05d}.tsv"
        _truncate_sample_log(sample_log, start_step)
    encoder = built.model.divico.gap_encoder
    sums = SumsLayout(aux_names=tuple(getattr(encoder, "aux_weights", {})),
                      centres=tuple(cfg.divico.moe.centres) if cfg.divico.encoder == "moe" and encoder else ())
    run = Run(cfg=cfg, engine=engine, model=built.model, peft_model=built.peft_model, loader=loader,
              metrics=metrics, rank=rank, world_size=world_size, total_steps=total_steps,
              start_step=start_step, stop_step=stop_step, resumed_from=resume_from,
              visual_tokens=built.visual_tokens, config_yaml=config_yaml, sample_log=sample_log,
              sums=sums, collator=built.collator, overlay_samples=_overlay_samples(cfg) if rank == 0 else [])
    if start_step >= total_steps:
        if rank == 0:
            log.info("%s: the epoch is already complete (step %d); nothing to do", output_dir, start_step)
        metrics.close()
        return 0
    return fit(run)


def absolute_paths(cfg: RunConfig) -> None:
    """Local paths made absolute, so the config saved with each checkpoint works from any directory."""
    if Path(cfg.model.base).is_dir():
        cfg.model.base = str(Path(cfg.model.base).resolve())
    for section, name in (("data", "shards"), ("train", "output_dir"), ("train", "deepspeed_config"),
                          ("train", "tensorboard_dir")):
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            setattr(getattr(cfg, section), name, str(Path(value).resolve()))


def _yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, verified against its checksums on every rank (before the
    process group exists, so each rank decides alone; they read the same files)."""
    if resume == "auto":
        return checkpoint.newest_intact(output_dir)
    if resume == "none":
        latest = checkpoint.latest_checkpoint(output_dir)
        if latest is not None:
            raise TrainingError(f"{output_dir} already holds checkpoints (newest {latest.name}); pass "
                                "--resume auto to continue, or choose another train.output_dir")
        return None
    if not checkpoint.is_checkpoint(resume):
        raise TrainingError(f"--resume {resume}: not a checkpoint directory")
    return checkpoint.verified(resume)


def _collate_with_keys(collator, samples):
    return [s.key for s in samples], collator(samples)


def _truncate_sample_log(path: Path, keep_through_step: int) -> None:
    """Drop key lines of steps after the checkpoint we resume from (they will be redone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("")
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if int(line.split("\t", 1)[0]) <= keep_through_step]
    path.write_text("".join(kept))


# ----------------------------------------------------------------------------- fit

# Per-step sums all-reduced once at the step boundary: [loss, lm_loss, kl, micro-batches,
# tokens, samples, non-finite micro-batches, preemption requested, the gap encoder's
# ||mu|| / ||v_s|| and sigma, micro-batches that ran it (text-only ones do not)], then
# SumsLayout's: each auxiliary loss, and with a router its weights summed per tau bucket.
_LOSS, _LM, _KL, _MICRO, _TOKENS, _SAMPLES, _NONFINITE, _PREEMPT, _MU_OVER_VS, _SIGMA, _GAP_MICRO = range(11)
_NUM_SUMS = 11


@dataclass
class SumsLayout:
    """The slots after the fixed ones: the encoder's auxiliary losses, then for a router
    (experts with `centres`) the kept tokens' router weights summed per (tau bucket, expert)
    and the tokens per bucket. A token's bucket is the expert whose centre is nearest its rate
    in log tau, so "router weight of expert e in bucket b" reads: do rates near centre b go to e?"""

    aux_names: tuple[str, ...]
    centres: tuple[float, ...]

    @property
    def routing_size(self) -> int:
        experts = len(self.centres)
        return experts * experts + experts

    @property
    def size(self) -> int:
        return _NUM_SUMS + len(self.aux_names) + self.routing_size

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.float64)

    def routing_sums(self, routing: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(routing_size,) on the device: weight sums per (bucket, expert), then tokens per bucket."""
        from pipeline.model.moe import nearest_expert

        rates, weights = routing
        bucket = nearest_expert(rates, torch.tensor(self.centres, device=rates.device).log())
        experts = len(self.centres)
        per_bucket = weights.new_zeros(experts, experts).index_add_(0, bucket, weights)
        return torch.cat([per_bucket.flatten(), torch.bincount(bucket, minlength=experts).to(weights.dtype)])

    def scalars(self, window: torch.Tensor) -> dict[str, float]:
        """The aux-loss and router-weight means of a window of sums."""
        out = {}
        gap_micro = window[_GAP_MICRO].item()
        for i, name in enumerate(self.aux_names):
            if gap_micro > 0:
                out[f"train/aux/{name}"] = window[_NUM_SUMS + i].item() / gap_micro
        experts = len(self.centres)
        start = _NUM_SUMS + len(self.aux_names)
        per_bucket = window[start:start + experts * experts].view(experts, experts)
        counts = window[start + experts * experts:start + experts * experts + experts]
        for b, centre in enumerate(self.centres):
            if counts[b] > 0:
                for e, expert in enumerate(self.centres):
                    out[f"moe/router_weight/bucket_{tau_label(centre)}/expert_{tau_label(expert)}"] = (
                        per_bucket[b, e] / counts[b]).item()
        return out


def fit(run: Run) -> int:
    engine, t = run.engine, run.cfg.train
    accumulation = engine.gradient_accumulation_steps()
    batches = _start_loader(run.loader)
    if run.resumed_from:  # after the loader iterator drew its seed, exactly as the uninterrupted run's had
        checkpoint.restore_rng(run.resumed_from, run.rank)
    step, window_started, window = run.start_step, time.perf_counter(), run.sums.zeros()
    fit_started, totals, last = time.perf_counter(), run.sums.zeros(), {}
    while step < run.stop_step:
        sums = run.sums.zeros()
        keys_this_step = []
        # A mixture-of-experts model's rate and routing-prior weight for this step (rates.py).
        inputs = step_inputs(run.cfg.divico, run.cfg.moe.rate_schedule, run.cfg.moe.prior_anneal, t.seed, step,
                             run.total_steps)
        for micro in range(accumulation):
            keys, batch = next(batches)
            keys_this_step += keys
            out = engine(**_to_device(batch, engine), **inputs)
            engine.backward(out.loss)
            sums += _micro_batch_sums(out, run.sums, num_tokens=batch["num_tokens"], samples=len(keys))
            if micro < accumulation - 1:
                engine.step()
        sums[_PREEMPT] = float(preemption_requested())
        dist.all_reduce(sums)  # one collective per step: the losses, and every rank's flags
        if sums[_NONFINITE] > 0:
            good = checkpoint.latest_checkpoint(t.output_dir)
            raise TrainingError(f"non-finite loss at step {step + 1} (on {int(sums[_NONFINITE])} micro-batch(es)); "
                                f"the weights were not updated. Last good checkpoint: {good or 'none'}")
        # The lr each group is updated with now: the scheduler moves them on inside engine.step().
        lrs = {group["name"]: group["lr"] for group in engine.optimizer.param_groups}
        engine.step()
        step += 1
        window += sums
        totals += sums
        if run.sample_log is not None:
            rate = f"\t{inputs['keep_ratio']!r}" if "keep_ratio" in inputs else ""  # a MoE step's rate
            with run.sample_log.open("a") as file:
                file.writelines(f"{step}\t{key}{rate}\n" for key in keys_this_step)
        if step % t.log_every_steps == 0 or step == run.stop_step:
            elapsed = time.perf_counter() - window_started
            last = {**_scalars(run, window, elapsed, lrs), **run.sums.scalars(window), **_input_scalars(run, inputs)}
            run.metrics.log(step, last)
            window_started, window = time.perf_counter(), run.sums.zeros()
        if run.overlay_samples and (step % t.overlay_every_steps == 0 or step == run.stop_step):
            _log_overlays(run, step)
        run.metrics.advance()
        preempted = sums[_PREEMPT] > 0
        if preempted or step % t.save_every_steps == 0 or step == run.stop_step:
            _save(run, step)
        if preempted:
            if run.rank == 0:
                log.warning("preempted: checkpoint for step %d written; exiting with %d", step, EXIT_PREEMPTED)
            run.metrics.close()
            return EXIT_PREEMPTED
    if step == run.total_steps and run.rank == 0:
        seconds = time.perf_counter() - fit_started
        _write_summary(run, {**last, "run/tokens_per_s": totals[_TOKENS].item() / seconds,
                             "run/samples_per_s": totals[_SAMPLES].item() / seconds, "run/seconds": seconds})
    finished = step == run.total_steps
    run.metrics.close({name: last[f"train/{name}"] for name in ("loss", "lm_loss", "kl")} if finished else None)
    if run.rank == 0 and not finished:
        log.info("stopped after train.max_steps at step %d/%d; continue with --resume auto", step, run.total_steps)
    return 0


def _overlay_samples(cfg: RunConfig) -> list:
    """The first train.overlay_images samples with an image in train.overlay_data ([] when off)."""
    from pipeline.data.loader import ShardDataset

    t = cfg.train
    if not t.overlay_every_steps:
        return []
    shards = ShardDataset(t.overlay_data, rank=0, world_size=1, batch_size=1, seed=0)
    return list(itertools.islice((sample for sample in shards if sample.image is not None), t.overlay_images))


def _log_overlays(run: Run, step: int) -> None:
    """The visual tokens the model keeps for the overlay samples, drawn into TensorBoard."""
    from pipeline.report.overlay import draw, kept_visual_tokens

    kept = kept_visual_tokens(run.model, run.collator, run.overlay_samples)
    run.metrics.images(step, {f"divico/overlay/{index}": draw(sample.image, sample_kept, run.collator)
                              for index, (sample, sample_kept) in enumerate(zip(run.overlay_samples, kept))})


def _micro_batch_sums(out, layout: SumsLayout, *, num_tokens: int, samples: int) -> torch.Tensor:
    """One micro-batch's contribution to the step's sums. The device values travel to the host
    together, in one copy: a GPU waits once per micro-batch, not once per figure."""
    loss = out.loss.detach().float()
    zero = loss.new_zeros(())
    gap = out.gap_stats or {}
    on_device = [loss, out.lm_loss.detach().float() if out.lm_loss is not None else loss,
                 out.kl.detach().float() if out.kl is not None else zero, (~torch.isfinite(loss)).float(),
                 gap.get("mu_over_vs", zero), gap.get("sigma", zero)]
    on_device += [(out.aux_losses or {}).get(name, zero).detach().float() for name in layout.aux_names]
    values = torch.stack(on_device)
    if layout.centres:
        routing = layout.routing_sums(out.routing) if out.routing is not None else zero.repeat(layout.routing_size)
        values = torch.cat([values, routing.float()])
    loss, lm, kl, nonfinite, mu_over_vs, sigma, *rest = values.tolist()
    sums = layout.zeros()
    sums[[_LOSS, _LM, _KL, _MICRO, _TOKENS, _SAMPLES, _NONFINITE]] = torch.tensor(
        [loss, lm, kl, 1, num_tokens, samples, nonfinite], dtype=torch.float64)
    if gap:  # text-only batches and modes without a gap encoder do not count towards its means
        sums[[_MU_OVER_VS, _SIGMA, _GAP_MICRO]] = torch.tensor([mu_over_vs, sigma, 1], dtype=torch.float64)
        sums[_NUM_SUMS:] = torch.tensor(rest, dtype=torch.float64)
    return sums


def _input_scalars(run: Run, inputs: dict) -> dict[str, float]:
    """The visual tokens a sample keeps at the step's rate (the largest under all_centres), and
    a MoE step's drawn rate and routing-prior weight."""

    divico = run.cfg.divico
    rate = inputs.get("keep_ratio", max(inputs.get("branch_rates", [divico.tau])))
    kept = divico.kept_tokens(run.visual_tokens, rate)
    if kept is None:  # the first cut is the image's own (MustDrop's merge): the count its filter keeps
        kept = divico.compression.stage_kept(run.visual_tokens, rate)
    scalars = {"perf/visual_tokens_kept": float(kept),
               **{f"train/aux_weight/{name}": weight for name, weight in inputs.get("aux_weights", {}).items()}}
    if "keep_ratio" in inputs:
        scalars["moe/tau"] = inputs["keep_ratio"]
    return scalars


def _start_loader(loader: torch.utils.data.DataLoader):
    """Start the loader's workers with SIGTERM/SIGUSR1 blocked (they inherit the mask): a job-wide
    signal must not kill them, since the trainer still needs their batches to finish its step."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that came meanwhile is delivered now


def _to_device(batch: dict, engine) -> dict:
    """The model's inputs on the engine's device; pixels in the model's dtype."""
    from pipeline.data.collator import MODEL_INPUTS

    dtype = next(p.dtype for p in engine.module.parameters() if p.is_floating_point())
    moved = {}
    for key in MODEL_INPUTS:
        if key in batch:
            value = batch[key].to(engine.device, non_blocking=True)
            moved[key] = value.to(dtype) if value.is_floating_point() else value
    return moved


def _scalars(run: Run, window: torch.Tensor, elapsed: float, lrs: dict[str, float]) -> dict[str, float]:
    """The logging window's means; the lrs and grad norm are those of its last step."""
    micro = max(window[_MICRO].item(), 1.0)
    grad_norm = run.engine.get_global_grad_norm()
    scalars = {
        "train/loss": window[_LOSS].item() / micro,
        "train/lm_loss": window[_LM].item() / micro,
        "train/kl": window[_KL].item() / micro,
        "train/lr": lrs["language_model"],
        **{f"train/lr/{group}": lr for group, lr in lrs.items()},
        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "perf/tokens_per_s": window[_TOKENS].item() / elapsed,
        "perf/samples_per_s": window[_SAMPLES].item() / elapsed,
        "memory/peak_gib": peak_memory_gib(),
    }
    if window[_GAP_MICRO] > 0:  # modes with a gap encoder, on windows that held an image
        scalars["divico/mu_over_vs"] = window[_MU_OVER_VS].item() / window[_GAP_MICRO].item()
        scalars["divico/sigma"] = window[_SIGMA].item() / window[_GAP_MICRO].item()
    return scalars


def _save(run: Run, step: int) -> None:
    t = run.cfg.train
    samples = step * t.micro_batch_size * run.engine.gradient_accumulation_steps()
    state = checkpoint.TrainerState(step=step, samples_per_rank=samples, world_size=run.world_size,
                                    total_steps=run.total_steps)
    checkpoint.save(run.engine, run.model, run.peft_model, output_dir=t.output_dir, state=state,
                    config_yaml=run.config_yaml, keep_last=t.keep_last, rank=run.rank)


def _write_summary(run: Run, last: dict[str, float]) -> None:
    summary = {"stage": run.cfg.train.stage, "steps": run.total_steps, "run_name": run.cfg.train.stage,
               "checkpoint": str(checkpoint.latest_checkpoint(run.cfg.train.output_dir)), **last}
    (Path(run.cfg.train.output_dir) / TRAIN_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
