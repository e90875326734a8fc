"""`divico bench model`: prefill cost with and without compression, measured.

A decoder with LLaVA-1.5-7B's geometry (pipeline.model.tiny.llava_7b_config: 32 layers, head
dim 128, FFN width 11008/4096 of the hidden size, vocabulary 32002) at a width this machine
can hold (random weights), fed a realistic prompt: 40 system tokens + 576 visual tokens + 60
text tokens. The vision tower is the same for every mode, so it is left out: the projector's
output is given as random image features. For `none` and, at each tau, every mode that acts
inside the decoder (BENCH_MODES: fastv, divico, the Mixture-of-Experts model `moe` with three
experts and a router, dart, divico_dart, pdrop), one prefill (the one that starts generation:
KV cache filled, logits for the last position) is measured:

  visual_kept     the visual tokens the layers see, stage by stage (576 before layer K)
  flops           FLOPs counted by torch's FlopCounterMode on that forward (eager attention,
                  whose matmuls it counts on every device)
  flops_ratio     against `none`; theory_flops_ratio: the paper's eq. 10 at the sequence each
                  layer sees (pipeline.model.flops.theory_ratio; layers only)
  prefill_ms      median wall time over --repeats runs after --warmup runs (torch.inference_mode)
  time_ratio      against `none`
  peak_mem_mib    peak memory of the tensors the prefill allocates (weights excluded):
                  torch.cuda.max_memory_allocated on CUDA, a tracking dispatch mode on CPU
  overhead_share  median time of what the mode adds, run alone on the same shapes (scoring from
                  layer K-1's own projections or DART's choice from its keys, selection, the gap
                  encoder, PyramidDrop's later rankings), / prefill_ms
  layer_floor_ratio  the time ratio the decoder's own layers allow: one layer timed alone at
                  each length a layer sees, sum_l t(n_l) / (L t(N)). Where a short sequence
                  cannot use the machine as well as a long one (weight traffic, per-op
                  overhead), this sits above theory_flops_ratio; time_ratio - layer_floor_ratio
                  is what the compression itself costs

Targets (issue 3) at tau = 11.1%: 1 - flops_ratio within 1 point of 1 - theory_flops_ratio;
time_ratio <= 0.30; overhead_share <= 3%.

With --fast, generation at --batch on both paths of CompressedLlava.generate, side by side: the
eager one and the fast one (fast=True: a static KV cache, the layers after the last cut and each
decode step replayed from CUDA graphs on a GPU; on a CPU the same static code runs without
graphs). For `none` and every mode above at tau 11.1%:

  prefill_ms      generate() with one new token: the prefill and the first token's choice
  answer_ms       generate() with ANSWER_TOKENS new tokens, EOS ignored
  decode_tokens_per_s   batch x (ANSWER_TOKENS - 1) / (answer_ms - prefill_ms)
  prefill_ratio, answer_ratio   against `none` on the same path; prefill_vs_eager_none and
                  answer_vs_eager_none against `none` on the eager path (what a user runs today)
  same_tokens     how many of the answer's first tokens the two paths agree on (greedy)

Targets (issue 18) at batch 1 on a GPU: fast prefill_ratio <= 0.45; a fast answer <= 0.6 of the
uncompressed model's; fast decode tokens/s >= 1.5 x eager.

Then the training compute of the Mixture-of-Experts stage against the three specialists, in
tokens through the decoder per sample (pipeline.model.flops.decoder_tokens; counted, not timed):
the specialists (one epoch at each of the paper's taus), the MoE stage from the base with rates
drawn log-uniformly on its default range (the expectation), with all_centres, and warm-started
(the specialists first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, LlavaForConditionalGeneration

from pipeline.contract import EXIT_BAD_INPUT, TAUS
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.decoder import decoder_parts
from pipeline.model.divico import ProjectionCapture, query_attention_scores, rotated_keys, select_visual_tokens
from pipeline.model.flops import DecoderGeometry, decoder_tokens, layer_lengths, theory_ratio
from pipeline.model.modes import LayerState
from pipeline.model.settings import DiViCoConfig, MixtureSettings
from pipeline.model.tiny import LLAVA_IMAGE_TOKEN_ID, llava_7b_config


@dataclass
class ModelBenchConfig:
    width: int = 512
    layers: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    layer: int = 2  # K
    system_tokens: int = 40
    visual_tokens: int = 576
    text_tokens: int = 60
    batch: int = 1
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    fast: bool = False  # also time generation on the eager and the fast path

    def validate(self) -> None:
        llava_7b_config(self.width, self.layers)  # raises on a width the geometry cannot have
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")


def build_random_llava(cfg: ModelBenchConfig) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's decoder geometry at `cfg.width`, random weights, sdpa attention (the vision
    tower is never run: image features are given)."""
    config = llava_7b_config(cfg.width, cfg.layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, cfg.dtype))
    return model.eval()


def build_inputs(cfg: ModelBenchConfig, model: LlavaForConditionalGeneration) -> dict:
    generator = torch.Generator().manual_seed(cfg.seed)
    pieces = [torch.randint(3, LLAVA_IMAGE_TOKEN_ID, (cfg.batch, cfg.system_tokens), generator=generator),
              torch.full((cfg.batch, cfg.visual_tokens), LLAVA_IMAGE_TOKEN_ID),
              torch.randint(3, LLAVA_IMAGE_TOKEN_ID, (cfg.batch, cfg.text_tokens), generator=generator)]
    input_ids = torch.cat(pieces, dim=1).to(cfg.device)
    features = torch.randn(cfg.batch, cfg.visual_tokens, cfg.width, generator=generator) * 0.02
    return {"input_ids": input_ids, "image_features": features.to(cfg.device, getattr(torch, cfg.dtype))}


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the block and still alive: a
    CPU stand-in for torch.cuda.max_memory_allocated (views and in-place results are
    not new allocations and are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in inputs and key not in self.live:
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_robin_medians(fns: list, *, warmup: int, repeats: int, device: str) -> list[float]:
    """Median wall time (ms) of each function, the repeats interleaved across functions so
    that load from other processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            record.append((time.perf_counter() - started) * 1e3)
    return [statistics.median(record) for record in times]


def prefill(wrapper: CompressedLlava, inputs: dict):
    """The prefill that starts generation: the KV cache filled, logits for the last position."""
    cache = DynamicCache(config=wrapper.decoder.config)
    return wrapper(**inputs, past_key_values=cache, logits_to_keep=1)


def answer(wrapper: CompressedLlava, inputs: dict, tokens: int, fast: bool = False) -> torch.Tensor:
    """A greedy answer of `tokens` new tokens, EOS ignored (so every mode decodes as many)."""
    return wrapper.generate(**inputs, max_new_tokens=tokens, eos_token_id=[], pad_token_id=0, fast=fast)


def count_flops(model: LlavaForConditionalGeneration, fn: Callable[[], Any]) -> int:
    """FLOPs torch's FlopCounterMode counts in `fn()`, run with eager attention (whose matmuls it
    counts on every device)."""
    model.set_attn_implementation("eager")
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()
    finally:
        model.set_attn_implementation("sdpa")


def peak_mib(fn: Callable[[], Any], device: str) -> float:
    """Peak memory (MiB) of the tensors `fn()` allocates, weights and inputs excluded."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    tracker = PeakTensorBytes()
    with tracker:
        fn()
    return tracker.peak / 2**20


def _overhead_step(wrapper: CompressedLlava, inputs: dict, cfg: ModelBenchConfig):
    """A function running what compression adds, alone, on the prefill's shapes: scoring from
    layer K-1's captured projections (the projections are the layer's own work) or the mode's
    own choice from its keys (DART), selection, the gap encoder, and each later stage's ranking
    (PyramidDrop) on the sequence that stage cuts."""
    parts, mode = wrapper.decoder, wrapper.config.compression
    dtype = getattr(torch, cfg.dtype)

    def captured_layer(layer: int, image_mask: torch.Tensor):
        """Layer `layer`'s own projections over random hidden states of image_mask's shape."""
        hidden = torch.randn(*image_mask.shape, cfg.width, device=cfg.device, dtype=dtype) * 0.02
        attention_mask = torch.ones_like(image_mask)
        position_ids = torch.arange(image_mask.shape[1], device=cfg.device).expand_as(image_mask)
        position_embeddings = parts.rotary_emb(hidden, position_ids)
        queries = wrapper.query_positions(attention_mask, image_mask)
        with ProjectionCapture(parts.layers[layer].self_attn, queries) as captured:
            parts.layers[layer](hidden, attention_mask=None, position_embeddings=position_embeddings)
        return captured, hidden, attention_mask, position_embeddings, queries

    image_mask = inputs["input_ids"] == LLAVA_IMAGE_TOKEN_ID
    captured, hidden, attention_mask, position_embeddings, queries = captured_layer(wrapper.config.layer - 1,
                                                                                    image_mask)
    visual = image_mask.sum(1)
    rates = torch.full((cfg.batch,), wrapper.config.tau, dtype=torch.float64, device=cfg.device)
    stages = []
    for stage, rate in mode.later_stages(cfg.layers, wrapper.config.layer, wrapper.config.tau):
        num_tokens = layer_lengths(cfg.layers, image_mask.shape[1], cfg.visual_tokens, wrapper.config)[stage - 1]
        stage_mask = torch.zeros(cfg.batch, num_tokens, dtype=torch.bool, device=cfg.device)
        stage_mask[:, cfg.system_tokens:num_tokens - cfg.text_tokens] = True
        stages.append((rate, stage_mask, *captured_layer(stage - 1, stage_mask)))

    def step():
        scores = (query_attention_scores(captured, position_embeddings, attention_mask) if mode.reads_attention
                  else None)
        if mode.reads_keys:
            state = LayerState(hidden=hidden, keys=rotated_keys(captured, position_embeddings), image_mask=image_mask,
                               attention_mask=attention_mask, query_positions=queries, norm=parts.norm)
            keep_visual = mode.select_at_layer(state, rates)
        else:
            keep_visual = wrapper.divico.select(scores, image_mask)
        wrapper.divico(hidden, image_mask, keep_visual, None, wrapper.divico.pooled(scores, image_mask, keep_visual))
        for rate, stage_mask, stage_captured, _, stage_attention, stage_embeddings, _ in stages:
            stage_scores = query_attention_scores(stage_captured, stage_embeddings, stage_attention)
            select_visual_tokens(stage_scores, stage_mask, rate, of=visual)

    return step


def bench_config(mode: str, tau: float, layer: int) -> DiViCoConfig:
    """A row's DiViCo settings; `moe` is DiViCo with the Mixture-of-Experts encoder."""
    if mode == "moe":
        return DiViCoConfig(mode="divico", encoder="moe", kl_per_token=True, tau=tau, layer=layer)
    return DiViCoConfig(mode=mode, tau=tau, layer=layer)


def training_compute(cfg: ModelBenchConfig, num_tokens: int, draws: int = 10_000) -> dict[str, float]:
    """Tokens through the decoder per sample of each way to get models for every tau; the
    log-uniform expectation is a midpoint sum over `draws` quantiles of the default range."""
    low, high = MixtureSettings().tau_range
    centres = MixtureSettings().centres

    def tokens(taus: list[float]) -> int:
        return decoder_tokens(cfg.layers, cfg.layer, num_tokens, cfg.visual_tokens, taus)

    drawn = [low * (high / low) ** ((i + 0.5) / draws) for i in range(draws)]
    specialists = sum(tokens([tau]) for tau in TAUS)
    log_uniform = statistics.fmean(tokens([tau]) for tau in drawn)
    return {"uncompressed epoch": tokens([1.0]), "three specialists": specialists,
            "moe from base, log_uniform": log_uniform, "moe from base, all_centres": tokens(centres),
            "moe warm-started (specialists + log_uniform)": specialists + log_uniform}


def _layer_step(model: LlavaForConditionalGeneration, cfg: ModelBenchConfig, length: int):
    """A function running one decoder layer alone on `length` tokens (causal, no cache)."""
    parts = decoder_parts(model)
    hidden = torch.randn(cfg.batch, length, cfg.width, device=cfg.device, dtype=getattr(torch, cfg.dtype)) * 0.02
    position_embeddings = parts.rotary_emb(hidden, torch.arange(length, device=cfg.device)[None])
    layer = parts.layers[cfg.layer]
    return lambda: layer(hidden, attention_mask=None, position_embeddings=position_embeddings)


ANSWER_TOKENS = 16  # a whole answer (issue 18)


def generation_paths(cfg: ModelBenchConfig, modes: list[tuple[str, CompressedLlava]], inputs: dict) -> list[dict]:
    """Each (mode, wrapper)'s generation on the eager and on the fast path (see the docstring),
    `none` first; every generation timed in one interleaved loop."""
    steps = [partial(answer, wrapper, inputs, tokens, fast)
             for _, wrapper in modes for fast in (False, True) for tokens in (1, ANSWER_TOKENS)]
    # at least one warm-up: the fast path captures its graphs at its first call
    medians = iter(round_robin_medians(steps, warmup=max(cfg.warmup, 1), repeats=cfg.repeats, device=cfg.device))
    rows = []
    for mode, wrapper in modes:
        eager, fast = (answer(wrapper, inputs, ANSWER_TOKENS, path)[:, -ANSWER_TOKENS:] for path in (False, True))
        agree = (eager == fast).all(0).long().cumprod(0)
        for path in ("eager", "fast"):
            prefill_ms, answer_ms = next(medians), next(medians)
            rows.append({"mode": mode, "tau": wrapper.config.tau, "path": path, "prefill_ms": prefill_ms,
                         "answer_ms": answer_ms, "same_tokens": int(agree.sum()),
                         # None where timing noise swallows the decode steps
                         "decode_tokens_per_s": cfg.batch * (ANSWER_TOKENS - 1) / (answer_ms - prefill_ms) * 1e3
                         if answer_ms > prefill_ms else None})
    for row in rows:
        none = next(r for r in rows if (r["mode"], r["path"]) == ("none", row["path"]))
        row["prefill_ratio"] = row["prefill_ms"] / none["prefill_ms"]
        row["answer_ratio"] = row["answer_ms"] / none["answer_ms"]
        row["prefill_vs_eager_none"] = row["prefill_ms"] / rows[0]["prefill_ms"]
        row["answer_vs_eager_none"] = row["answer_ms"] / rows[0]["answer_ms"]
    return rows


# The rows after `none`, at each tau: the modes that act inside the decoder, whose cost a prefill
# from the projector's output shows (before-decoder modes act in the vision tower, which this
# bench leaves out: `divico report efficiency --tower` times them).
BENCH_MODES = ("fastv", "divico", "moe", "dart", "divico_dart", "pdrop")


def run_bench(cfg: ModelBenchConfig) -> dict:
    cfg.validate()
    model = build_random_llava(cfg)
    inputs = build_inputs(cfg, model)
    num_tokens = inputs["input_ids"].shape[1]
    geometry = DecoderGeometry.from_config(model.config.text_config)
    settings = [("none", 1.0)] + [(mode, tau) for tau in TAUS for mode in BENCH_MODES]
    wrappers = [CompressedLlava(model, bench_config(mode, tau, cfg.layer)).eval() for mode, tau in settings]
    lengths = [layer_lengths(cfg.layers, num_tokens, cfg.visual_tokens, w.config) for w in wrappers]
    with torch.inference_mode():
        # One interleaved timing loop: prefills; what each compressing mode adds; and one decoder
        # layer at every sequence length a layer sees, for the layer floor.
        distinct = sorted({n for row in lengths for n in row}, reverse=True)
        prefills = [lambda w=w: prefill(w, inputs) for w in wrappers]
        overheads = [_overhead_step(w, inputs, cfg) for w in wrappers[1:]]
        layer_steps = [_layer_step(model, cfg, n) for n in distinct]
        medians = round_robin_medians(prefills + overheads + layer_steps, warmup=cfg.warmup, repeats=cfg.repeats,
                                      device=cfg.device)
        prefill_ms, medians = medians[:len(prefills)], medians[len(prefills):]
        overhead_ms = [0.0] + medians[:len(overheads)]  # `none` adds nothing
        layer_ms = dict(zip(distinct, medians[len(overheads):]))
        runs = []
        for (mode, tau), wrapper, row, ms, extra_ms in zip(settings, wrappers, lengths, prefill_ms, overhead_ms):
            step = partial(prefill, wrapper, inputs)
            runs.append({"mode": mode, "tau": tau, "flops": count_flops(model, step), "prefill_ms": ms,
                         "visual_kept": [n - num_tokens + cfg.visual_tokens for n in dict.fromkeys(row)],
                         "peak_mem_mib": peak_mib(step, cfg.device),
                         "overhead_share": extra_ms / ms,
                         "layer_floor_ratio": sum(layer_ms[n] for n in row) / (cfg.layers * layer_ms[num_tokens]),
                         "theory_flops_ratio": theory_ratio(geometry, num_tokens, row)})
    base = runs[0]
    for run in runs:
        run["flops_ratio"] = run["flops"] / base["flops"]
        run["time_ratio"] = run["prefill_ms"] / base["prefill_ms"]
    setup = {"width": cfg.width, "layers": cfg.layers, "layer_k": cfg.layer, "tokens": num_tokens,
             "visual_tokens": cfg.visual_tokens, "batch": cfg.batch, "device": cfg.device, "dtype": cfg.dtype,
             "repeats": cfg.repeats, "torch_threads": torch.get_num_threads(),
             "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"}
    figures = {"runs": runs, "setup": setup, "training_tokens": training_compute(cfg, num_tokens)}
    if cfg.fast:
        chosen = [(mode, w) for (mode, tau), w in zip(settings, wrappers) if mode == "none" or tau == TAUS[1]]
        figures["generation"] = generation_paths(cfg, chosen, inputs)
    return figures


def print_report(figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = figures["setup"]
    table = Table(title=f"divico bench model: LLaVA-1.5-7B geometry at width {s['width']} ({s['layers']} layers, "
                        f"K={s['layer_k']}), {s['tokens']} tokens ({s['visual_tokens']} visual), batch {s['batch']}, "
                        f"{s['device']} {s['dtype']}, median of {s['repeats']}")
    for column in ("mode", "tau", "visual by stage", "GFLOPs", "FLOPs ratio", "theory", "prefill ms", "time ratio",
                   "layer floor", "peak MiB", "overhead"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in figures["runs"]:
        table.add_row(r["mode"], f"{r['tau']:.1%}", "/".join(map(str, r["visual_kept"])), f"{r['flops'] / 1e9:,.1f}",
                      f"{r['flops_ratio']:.3f}", f"{r['theory_flops_ratio']:.3f}", f"{r['prefill_ms']:,.1f}",
                      f"{r['time_ratio']:.3f}", f"{r['layer_floor_ratio']:.3f}", f"{r['peak_mem_mib']:,.1f}",
                      f"{r['overhead_share']:.2%}")
    console = Console(width=max(Console().width, 130))
    console.print(table)
    console.print("targets at tau 11.1%: reduction within 1 point of theory, time ratio <= 0.30, overhead <= 3%")
    training = figures["training_tokens"]
    table = Table(title="training compute for models at every tau: tokens through the decoder per sample")
    for column in ("way", "token-layers", "vs the three specialists"):
        table.add_column(column, justify="left" if column == "way" else "right")
    for way, tokens in training.items():
        table.add_row(way, f"{tokens:,.0f}", f"{tokens / training['three specialists']:.3f}")
    console.print(table)
    console.print("target: the MoE stage from the base at most 0.4x the three specialists")
    if "generation" not in figures:
        return
    table = Table(title=f"generation at batch {s['batch']}, {ANSWER_TOKENS}-token answers, eager and fast path "
                        f"({s['device_name']})")
    for column in ("mode", "tau", "path", "prefill ms", "ratio", "vs eager none", "answer ms", "ratio",
                   "vs eager none", "decode tok/s", "same tokens"):
        table.add_column(column, justify="left" if column in ("mode", "path") else "right")
    for r in figures["generation"]:
        table.add_row(r["mode"], f"{r['tau']:.1%}", r["path"], f"{r['prefill_ms']:,.1f}", f"{r['prefill_ratio']:.3f}",
                      f"{r['prefill_vs_eager_none']:.3f}", f"{r['answer_ms']:,.1f}", f"{r['answer_ratio']:.3f}",
                      f"{r['answer_vs_eager_none']:.3f}",
                      "n/a" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:,.1f}",
                      f"{r['same_tokens']}/{ANSWER_TOKENS}")
    console.print(table)
    console.print("targets at batch 1, tau 11.1%, on a GPU: fast prefill ratio <= 0.45, fast answer <= 0.6 of none's, "
                  "fast decode tok/s >= 1.5x eager")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="prefill FLOPs, time and memory: none and the modes acting inside the "
                                                 "decoder at each tau; the MoE stage's training compute")
    parser.add_argument("--width", type=int, default=512, help="hidden size (multiple of 128; 4096 = LLaVA-1.5-7B)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fast", action="store_true",
                        help=f"also time {ANSWER_TOKENS}-token generation on the eager and the fast path "
                             "(static cache and CUDA graphs), side by side")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    cfg = ModelBenchConfig(width=args.width, layers=args.layers, device=args.device, dtype=dtype, batch=args.batch,
                           repeats=args.repeats, warmup=args.warmup, fast=args.fast)
    try:
        cfg.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    figures = run_bench(cfg)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_report(figures)
    return 0
