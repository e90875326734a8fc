"""`divico report efficiency`: the paper's Table III for any model, measured per mode and tau.

    divico report efficiency --model DIR|llava-7b [--width W] [--modes none fastv divico]
                             [--taus 0.067 0.111 0.167] [--batch 1 8] [--answer-tokens 8]
                             [--device cpu|cuda] [--dtype ...] [--repeats 5] [--fast] [--out DIR] [--json]

--model is a model folder (`divico eval`'s: a plain LLaVA, or with DiViCo settings, whose
trained encoder is then used) or `llava-7b`: LLaVA-1.5-7B's decoder geometry (32 layers, FFN
11008/4096 of the width, vocabulary 32002) at --width with random weights. A mode needing a gap
encoder the folder does not have gets an untrained one: it costs the same (timings and FLOPs
only). The prompt is the model's own geometry: --system-tokens + the vision tower's visual
tokens + --text-tokens, the image given as random projector features (the vision tower is the
same in every mode and is left out), or with --tower as random pixels, every row then running
the tower and the projector (the modes that act before the decoder need it; the FLOPs stay the
decoder's, the tower's count taken off the counted ones). Per batch size, mode and tau:

  kept            visual tokens kept per image after the first cut (the mean over the batch
                  where a mode decides per image); kept_last: after the last (PyramidDrop, MustDrop)
  flops           one prefill, analytic (pipeline.model.flops.prefill_flops x batch), and
  flops_counted   counted by torch's FlopCounterMode on the same prefill (eager attention);
                  flops_gap = counted / analytic - 1
  prefill_ms      the prefill that starts generation (median of --repeats, after --warmup)
  answer_ms       a whole answer: that prefill + --answer-tokens - 1 decode steps through the
                  (compressed) KV cache, EOS ignored so every mode decodes as many
  decode_tokens_per_s   batch x (answer-tokens - 1) / (answer_ms - prefill_ms)
  peak_mem_mib    peak memory of the tensors the whole answer allocates, weights excluded
                  (torch.cuda.max_memory_allocated; on CPU a tracking dispatch mode)
  kv_cache_mib    the KV cache after the prefill
and each ratio against `none` at the same batch. --fast times prefill_ms (generate() with one new
token) and answer_ms through fast generation (CompressedLlava.generate(fast=True): static cache,
CUDA graphs on a GPU); FLOPs, peak memory and the KV cache stay the eager path's. --out writes
efficiency.{md,json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration

from pipeline.bench.model_cost import (
    ModelBenchConfig,
    answer,
    bench_config,
    build_random_llava,
    count_flops,
    peak_mib,
    prefill,
    round_robin_medians,
)
from pipeline.bench.accuracy_report import markdown_table
from pipeline.contract import DIVICO_SETTINGS_FILE, EXIT_BAD_INPUT, TAUS
from pipeline.durable import write_text_atomically
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.flops import DecoderGeometry, own_visual_counts, prefill_flops
from pipeline.model import settings
from pipeline.model.settings import DiViCoConfig

log = logging.getLogger(__name__)

RANDOM_7B = "llava-7b"
MODES = (*settings.MODES, "moe")  # every registered mode, and moe: the divico mode of a Mixture-of-Experts model


@dataclass
class EfficiencyConfig:
    model: str = RANDOM_7B
    width: int = 512  # llava-7b only
    modes: list[str] = field(default_factory=lambda: ["none", "fastv", "divico"])
    taus: list[float] = field(default_factory=lambda: list(TAUS))
    batch: list[int] = field(default_factory=lambda: [1, 8])
    answer_tokens: int = 8
    system_tokens: int = 40  # LLaVA-1.5's system prompt and template
    text_tokens: int = 60
    layer: int | None = None  # K; None: the folder's saved setting, else DiViCo's default
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    # Every row runs the vision tower and the projector on random pixels (the modes that act before
    # the decoder need them) instead of feeding the decoder random projector features.
    tower: bool = False
    fast: bool = False  # time prefill and answers through fast generation

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        bad = [mode for mode in self.modes if mode not in MODES]
        if bad or not self.modes:
            raise ValueError(f"--modes {' '.join(self.modes)}: expected some of {', '.join(MODES)}")
        vision = [mode for mode in self.modes if mode != "moe" and DiViCoConfig(mode=mode).compression.before_decoder]
        if vision and not self.tower:
            raise ValueError(f"--modes {' '.join(vision)}: act in the vision tower; add --tower (every row then runs "
                             "the tower and the projector)")
        if any(not 0 < tau <= 1 for tau in self.taus) or not self.taus:
            raise ValueError(f"--taus {self.taus}: each must be in (0, 1]")
        if any(b < 1 for b in self.batch) or self.answer_tokens < 2 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("--batch sizes >= 1, --answer-tokens >= 2, --repeats >= 1, --warmup >= 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.model != RANDOM_7B and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"--model {self.model}: not a model folder (no config.json) nor {RANDOM_7B!r}")


def load(cfg: EfficiencyConfig) -> tuple[LlavaForConditionalGeneration, Path | None]:
    """The LLaVA model to measure and its folder (None for the random llava-7b geometry)."""
    if cfg.model == RANDOM_7B:
        return build_random_llava(ModelBenchConfig(width=cfg.width, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)), None
    llava = LlavaForConditionalGeneration.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
    llava.set_attn_implementation("sdpa")
    return llava.to(cfg.device).eval(), Path(cfg.model)


def wrap(llava: LlavaForConditionalGeneration, folder: Path | None, mode: str, tau: float,
         layer: int | None) -> CompressedLlava:
    """`llava` run in `mode` at `tau`: with the folder's trained gap encoder when it has one of the
    mode's kind (a MoE folder serves moe), else a fresh one."""
    overrides = {"tau": tau, **({"layer": layer} if layer is not None else {})}
    if folder is not None and (folder / DIVICO_SETTINGS_FILE).is_file():
        saved, _ = CompressedLlava.read_saved(folder)
        trained = saved.uses_gap_encoder and (mode == "moe") == (saved.encoder == "moe")
        if mode in ("none", "fastv", "random", "select_only") or trained:
            return CompressedLlava.from_saved(llava, folder, mode="divico" if mode == "moe" else mode, **overrides)
        layer = saved.layer if layer is None else layer
    config = bench_config(mode, tau, DiViCoConfig().layer if layer is None else layer)
    return CompressedLlava(llava, config).to(next(llava.parameters()).device).eval()


def visual_tokens(llava: LlavaForConditionalGeneration) -> int:
    vision = llava.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def prompt_inputs(llava: LlavaForConditionalGeneration, cfg: EfficiencyConfig, batch: int) -> dict[str, torch.Tensor]:
    """System + visual + text token ids (no image id among the text) and random projector
    features, or with cfg.tower random pixels."""
    config = llava.config
    visual = visual_tokens(llava)
    vocab, image_id = config.text_config.vocab_size, config.image_token_id
    generator = torch.Generator().manual_seed(cfg.seed)

    def text(length: int) -> torch.Tensor:
        ids = torch.randint(3, vocab - 1, (batch, length), generator=generator)
        return ids + (ids >= image_id).long() if image_id < vocab else ids

    input_ids = torch.cat([text(cfg.system_tokens), torch.full((batch, visual), image_id), text(cfg.text_tokens)], 1)
    if cfg.tower:
        size = config.vision_config.image_size
        images = {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    else:
        images = {"image_features": torch.randn(batch, visual, config.text_config.hidden_size, generator=generator) * 0.02}
    return {"input_ids": input_ids.to(cfg.device),
            **{name: value.to(cfg.device, getattr(torch, cfg.dtype)) for name, value in images.items()}}


def kept_per_sample(wrapper: CompressedLlava, inputs: dict, visual: int) -> list[list[int]]:
    """Each sample's visual tokens after each cut (the first, then each later stage): the mode's
    own counts, or measured by a prefill where it decides them per image."""
    batch, config = inputs["input_ids"].shape[0], wrapper.config
    if not config.compresses:
        return [[visual]] * batch
    own = own_visual_counts(len(wrapper.decoder.layers), visual, config)
    if None not in own:
        return [own] * batch
    out = wrapper(**inputs, logits_to_keep=1)
    text = inputs["input_ids"].shape[1] - visual
    groups = out.cache_groups if config.compression.before_decoder else out.cache_groups[1:]
    return torch.stack([mask.sum(1) - text for _, mask in groups], dim=1).tolist()


def batch_mean(values: list[int]) -> int | float:
    """The count all samples share, or their mean to one decimal."""
    return values[0] if len(set(values)) == 1 else round(sum(values) / len(values), 1)


def kv_cache_mib(wrapper: CompressedLlava, inputs: dict) -> float:
    cache = DynamicCache(config=wrapper.decoder.config)
    wrapper(**inputs, past_key_values=cache, logits_to_keep=1)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / 2**20


@torch.inference_mode()
def measure(cfg: EfficiencyConfig) -> dict[str, Any]:
    cfg.validate()
    llava, folder = load(cfg)
    geometry = DecoderGeometry.from_config(llava.config.text_config)
    settings = [("none", 1.0)] * ("none" in cfg.modes) + [(m, t) for t in cfg.taus for m in cfg.modes if m != "none"]
    wrappers = [wrap(llava, folder, mode, tau, cfg.layer) for mode, tau in settings]
    rows = []
    for batch in cfg.batch:
        inputs = prompt_inputs(llava, cfg, batch)
        num_tokens, visual = inputs["input_ids"].shape[1], visual_tokens(llava)
        # The tower and the projector are the same for every row and not in the analytic count.
        vision_flops = (count_flops(llava, partial(llava.model.get_image_features, pixel_values=inputs["pixel_values"]))
                        if cfg.tower else 0)
        steps = [partial(prefill, w, inputs) for w in wrappers]
        answers = [partial(answer, w, inputs, cfg.answer_tokens) for w in wrappers]
        timed = ([partial(answer, w, inputs, tokens, True) for tokens in (1, cfg.answer_tokens) for w in wrappers]
                 if cfg.fast else steps + answers)
        # the fast path captures its graphs at its first call: at least one warm-up
        medians = round_robin_medians(timed, warmup=max(cfg.warmup, int(cfg.fast)), repeats=cfg.repeats,
                                      device=cfg.device)
        for index, ((mode, tau), wrapper) in enumerate(zip(settings, wrappers)):
            prefill_ms, answer_ms = medians[index], medians[len(steps) + index]
            kept = kept_per_sample(wrapper, inputs, visual)
            text_rows = cfg.text_tokens if wrapper.config.compression.reads_text_rows else None
            analytic = sum(prefill_flops(geometry, num_tokens, visual, wrapper.config, num_kept=counts,
                                         text_rows=text_rows)["total"] for counts in kept)
            counted = count_flops(llava, steps[index]) - vision_flops
            rows.append({
                "batch": batch, "mode": mode, "tau": None if mode == "none" else tau, "layer": wrapper.config.layer,
                "visual_tokens": visual,
                # the mean over the batch after the first cut and, for a mode that drops in
                # stages, after the last
                "kept": batch_mean([counts[0] for counts in kept]),
                "kept_last": batch_mean([counts[-1] for counts in kept]),
                "flops": analytic, "flops_counted": counted, "flops_gap": counted / analytic - 1,
                "prefill_ms": prefill_ms, "answer_ms": answer_ms,
                # None where timing noise swallows the decode steps (answer_ms <= prefill_ms)
                "decode_tokens_per_s": batch * (cfg.answer_tokens - 1) / (answer_ms - prefill_ms) * 1e3
                if answer_ms > prefill_ms else None,
                "peak_mem_mib": peak_mib(answers[index], cfg.device),
                "kv_cache_mib": kv_cache_mib(wrapper, inputs)})
    for row in rows:
        base = next((r for r in rows if r["batch"] == row["batch"] and r["mode"] == "none"), None)
        for name in ("flops", "prefill_ms", "answer_ms", "peak_mem_mib", "kv_cache_mib"):
            row[f"{name}_ratio"] = row[name] / base[name] if base else None
    setup = {**asdict(cfg), "tokens": num_tokens, "hidden": geometry.hidden, "layers": geometry.layers,
             "torch_threads": torch.get_num_threads(),
             "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"}
    return {"setup": setup, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    s = report["setup"]
    lines = [f"# Efficiency: {s['model']}", "",
             f"{s['layers']} layers, hidden {s['hidden']}, {s['tokens']} prompt tokens ({s['system_tokens']} system + "
             f"{report['rows'][0]['visual_tokens']} visual + {s['text_tokens']} text), answers of "
             f"{s['answer_tokens']} tokens; {s['device_name']} {s['dtype']}, {s['torch_threads']} threads; median of "
             f"{s['repeats']}{', fast generation' if s['fast'] else ''}. Ratios against `none` at the same batch.",
             ""]
    head = ["batch", "mode", "tau", "kept", "GFLOPs", "ratio", "counted/analytic", "prefill ms", "ratio",
            "answer ms", "ratio", "decode tok/s", "peak MiB", "KV MiB"]

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    body = [[str(r["batch"]), r["mode"], "" if r["tau"] is None else f"{100 * r['tau']:.1f}%",
             str(r["kept"]) if r["kept_last"] == r["kept"] else f"{r['kept']} -> {r['kept_last']}",
             f"{r['flops'] / 1e9:,.4g}", ratio(r["flops_ratio"]), f"{1 + r['flops_gap']:.4f}",
             f"{r['prefill_ms']:,.1f}", ratio(r["prefill_ms_ratio"]), f"{r['answer_ms']:,.1f}",
             ratio(r["answer_ms_ratio"]),
             "n/a" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:,.1f}",
             f"{r['peak_mem_mib']:,.1f}",
             f"{r['kv_cache_mib']:,.2f}"] for r in report["rows"]]
    return "\n".join([*lines, *markdown_table(head, body)])


def csv_text(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("efficiency", help="FLOPs, latency, decode speed, memory and KV cache per mode "
                                                      "and tau (the paper's Table III)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = EfficiencyConfig()
    parser.add_argument("--model", default=defaults.model, help=f"a model folder, or {RANDOM_7B}")
    parser.add_argument("--width", type=int, default=defaults.width, help=f"{RANDOM_7B}'s hidden size")
    parser.add_argument("--modes", nargs="+", default=defaults.modes, metavar="MODE", help=", ".join(MODES))
    parser.add_argument("--taus", nargs="+", type=float, default=defaults.taus)
    parser.add_argument("--batch", nargs="+", type=int, default=defaults.batch)
    parser.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens)
    parser.add_argument("--layer", type=int, default=None, help="K (default: the folder's, else DiViCo's)")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--tower", action="store_true",
                        help="run the vision tower and the projector in every row (needed by the modes that act "
                             "before the decoder); FLOPs stay the decoder's")
    parser.add_argument("--fast", action="store_true",
                        help="time prefill and answers through fast generation (static cache, CUDA graphs)")
    parser.add_argument("--out", type=Path, default=None, help="write efficiency.md, .json and .csv here")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown table")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    cfg = EfficiencyConfig(model=args.model, width=args.width, modes=args.modes, taus=args.taus, batch=args.batch,
                           answer_tokens=args.answer_tokens, layer=args.layer, device=args.device,
                           dtype=args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"),
                           repeats=args.repeats, warmup=args.warmup, tower=args.tower, fast=args.fast)
    try:
        cfg.validate()
    except ValueError as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    report = measure(cfg)
    if args.out:
        write_text_atomically(args.out / "efficiency.md", markdown(report) + "\n")
        write_text_atomically(args.out / "efficiency.json", json.dumps(report, indent=2) + "\n")
        write_text_atomically(args.out / "efficiency.csv", csv_text(report["rows"]))
    print(json.dumps(report) if args.json else markdown(report))
    return 0
