"""`divico bench train`: training throughput of DiViCo (tau = 1/9) against uncompressed LoRA.

Both runs use one model with LLaVA-1.5-7B's decoder geometry (pipeline.model.tiny.llava_7b_config:
576 visual tokens, 32 decoder layers, head dim 128; K = 2, a 200-token prompt + answer) at a
width this machine holds, random weights, LoRA on every linear layer of the language model,
frozen vision tower; a training step = forward + backward + AdamW step on the trainable
weights. Prints tokens/s and samples/s of each and their ratio (tokens = the input sequence
before compression).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from pipeline.contract import EXIT_BAD_INPUT, IGNORE_INDEX
from pipeline.device import default_dtype, resolve_device
from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.settings import DiViCoConfig
from pipeline.model.tiny import llava_7b_config
from pipeline.train.build import lora_targets

K = 2  # the layer DiViCo compresses at, as in the paper


def add_parser(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("train", help="training throughput: divico (tau=1/9) vs uncompressed LoRA",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256,
                        help="decoder width, a multiple of 128 (7B: 4096; attention weighs more at small widths)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after 1 warm-up step), alternating")
    parser.add_argument("--tau", type=float, default=1 / 9)
    parser.add_argument("--device", default="auto", help="auto (cuda if present, bf16), cpu, cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_main)


def build(mode: str, tau: float, config: LlavaConfig, device: str, dtype: torch.dtype) -> CompressedLlava:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 7B-width model never passes through CPU fp32
        llava = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    llava.config._attn_implementation = "sdpa"
    llava.requires_grad_(False)
    model = get_peft_model(llava, LoraConfig(r=16, lora_alpha=32, target_modules=lora_targets(llava)))
    llava.model.multi_modal_projector.requires_grad_(True)
    return CompressedLlava(model, DiViCoConfig(mode=mode, tau=tau, layer=K)).to(device).train()


def visual_tokens(config: LlavaConfig) -> int:
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def batch(config: LlavaConfig, batch_size: int, text_tokens: int, device: str,
          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """8 text tokens, the image, the rest of the text; the loss is on the text's second half."""
    generator = torch.Generator().manual_seed(0)
    visual, image_id, side = visual_tokens(config), config.image_token_id, config.vision_config.image_size
    text = torch.randint(3, image_id, (batch_size, text_tokens), generator=generator)
    input_ids = torch.cat([text[:, :8], torch.full((batch_size, visual), image_id), text[:, 8:]], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    answer = visual + text_tokens // 2
    labels[:, answer:] = input_ids[:, answer:]
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device),
            "pixel_values": torch.randn(batch_size, 3, side, side, generator=generator).to(device, dtype)}


class Runner:
    """One mode's model, optimizer and batch; `step()` times one training step."""

    def __init__(self, mode: str, config: LlavaConfig, args: argparse.Namespace, device: str,
                 dtype: torch.dtype) -> None:
        self.model = build(mode, args.tau, config, device, dtype)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.inputs = batch(config, args.batch_size, args.text_tokens, device, dtype)
        self.device, self.batch_size, self.seconds = device, args.batch_size, []

    def step(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        self.model(**self.inputs).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def figures(self) -> dict[str, float]:
        step_s = statistics.median(self.seconds)
        return {"tokens_per_s": self.inputs["input_ids"].numel() / step_s,
                "samples_per_s": self.batch_size / step_s, "step_ms": step_s * 1000}


def _main(args: argparse.Namespace) -> int:
    try:
        config = llava_7b_config(args.width, args.layers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for flag, value, least in (("--layers", args.layers, K + 1), ("--text-tokens", args.text_tokens, 16),
                               ("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1)):
        if value < least:
            print(f"error: {flag} {value}: must be at least {least}", file=sys.stderr)
            return EXIT_BAD_INPUT
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    runners = {mode: Runner(setting, config, args, device, dtype) for mode, setting in (("lora", "none"),
                                                                                      ("divico", "divico"))}
    for runner in runners.values():
        runner.step()  # warm-up: allocator, kernels, lazy initialisation
    # Alternate the modes step by step, so a busy machine slows both alike.
    for _ in range(args.steps):
        for runner in runners.values():
            runner.seconds.append(runner.step())
    lora, divico = runners["lora"].figures(), runners["divico"].figures()
    result = {"tokens_per_s_divico": divico["tokens_per_s"], "tokens_per_s_lora": lora["tokens_per_s"],
              "ratio": divico["tokens_per_s"] / lora["tokens_per_s"],
              "samples_per_s_divico": divico["samples_per_s"], "samples_per_s_lora": lora["samples_per_s"],
              "step_ms_divico": divico["step_ms"], "step_ms_lora": lora["step_ms"],
              "geometry": {"visual_tokens": visual_tokens(config), "text_tokens": args.text_tokens,
                           "layers": args.layers, "K": K, "width": args.width, "tau": args.tau,
                           "batch_size": args.batch_size},
              "device": device, "dtype": str(dtype).removeprefix("torch.")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"training step, {args.batch_size} x ({visual_tokens(config)} visual + {args.text_tokens} text) tokens, "
          f"{args.layers} layers, width {args.width}, K={K}, {device} {result['dtype']}")
    for name, figures in (("lora (uncompressed)", lora), (f"divico tau={args.tau:.3f}", divico)):
        print(f"  {name:22s} {figures['tokens_per_s']:9.0f} tokens/s  {figures['samples_per_s']:7.2f} samples/s  "
              f"{figures['step_ms']:8.1f} ms/step")
    print(f"  ratio divico / lora: {result['ratio']:.2f}x")
    return 0
