"""`divico bench train`: training throughput of DiViCo (tau = 1/9) against uncompressed LoRA.

Both runs use one model with LLaVA-1.5-7B's geometry where it matters for the ratio (576
visual tokens, 32 decoder layers, K = 2, a 200-token prompt + answer) at a width this machine
holds, random weights, LoRA on every linear layer of the language model, frozen vision tower;
a training step = forward + backward + AdamW step on the trainable weights. Prints tokens/s
and samples/s of each and their ratio (tokens = the input sequence before compression).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.device import default_dtype, resolve_device


def add_parser(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("train", help="training throughput: divico (tau=1/9) vs uncompressed LoRA",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="decoder width (7B: 4096; attention weighs more at small widths)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after 1 warm-up step), alternating")
    parser.add_argument("--tau", type=float, default=1 / 9)
    parser.add_argument("--device", default="auto", help="auto (cuda if present, bf16), cpu, cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_main)


def build(mode: str, tau: float, hidden: int, layers: int, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pipeline.model.compressed_llava import CompressedLlava
    from pipeline.model.divico import DiViCoConfig

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=336, patch_size=14),  # 24 x 24 = 576
        text_config=LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                                max_position_embeddings=2048),
        image_token_id=1000, vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device(device):  # built where it runs: a 7B-width model never passes through CPU fp32
        llava = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    llava.config._attn_implementation = "sdpa"
    llava.requires_grad_(False)
    targets = [f"model.language_model.{name}" for name, module in llava.model.language_model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    model = get_peft_model(llava, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    llava.model.multi_modal_projector.requires_grad_(True)
    return CompressedLlava(model, DiViCoConfig(mode=mode, tau=tau, layer=2)).to(device).train()


def batch(batch_size: int, text_tokens: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    prompt = text_tokens // 2
    text = torch.randint(3, 999, (batch_size, text_tokens), generator=generator)
    image = torch.full((batch_size, 576), 1000)
    input_ids = torch.cat([text[:, :8], image, text[:, 8:]], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, 576 + prompt:] = input_ids[:, 576 + prompt:]  # the answer half of the text
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device),
            "pixel_values": torch.randn(batch_size, 3, 336, 336, generator=generator).to(device, dtype)}


class Runner:
    """One mode's model, optimizer and batch; `step()` times one training step."""

    def __init__(self, mode: str, args: argparse.Namespace, device: str, dtype: torch.dtype) -> None:
        self.model = build(mode, args.tau, args.hidden, args.layers, device, dtype)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.inputs = batch(args.batch_size, args.text_tokens, device, dtype)
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
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    runners = {"lora": Runner("none", args, device, dtype), "divico": Runner("divico", args, device, dtype)}
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
              "geometry": {"visual_tokens": 576, "text_tokens": args.text_tokens, "layers": args.layers, "K": 2,
                           "hidden": args.hidden, "tau": args.tau, "batch_size": args.batch_size},
              "device": device, "dtype": str(dtype).removeprefix("torch.")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"training step, {args.batch_size} x ({576} visual + {args.text_tokens} text) tokens, {args.layers} layers, "
          f"width {args.hidden}, K=2, {device} {result['dtype']}")
    for name, figures in (("lora (uncompressed)", lora), (f"divico tau={args.tau:.3f}", divico)):
        print(f"  {name:22s} {figures['tokens_per_s']:9.0f} tokens/s  {figures['samples_per_s']:7.2f} samples/s  "
              f"{figures['step_ms']:8.1f} ms/step")
    print(f"  ratio divico / lora: {result['ratio']:.2f}x")
    return 0
