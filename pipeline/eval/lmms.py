"""A DiViCo model for lmms-eval (the optional extra `lmms`: pip install -e ".[lmms]"), so any of
its tasks runs a model at a chosen mode and tau:

    lmms-eval --model divico --model_args pretrained=DIR,mode=divico,tau=0.111 --tasks pope --batch_size 8

pretrained is a model folder as `divico eval` takes it (plain LLaVA, or with DiViCo settings);
mode, tau, layer and seed override its settings exactly as there; template is the conversation
template each request is rendered in (LLaVA's vicuna_v1 by default; "chat_template" for the
checkpoint's own); device and fast (True: fast generation) as `divico eval`'s. The context
lmms-eval gives becomes the user turn, with "<image>\\n" in front when the request has an image
and the context no image marker.
Greedy decoding only (LLaVA's evaluation setting): a task asking to sample is refused. The
model registers through the entry point group "lmms_eval.models" (pyproject.toml); one process
(lmms-eval's multi-process launch is not supported: use `divico eval --task ... --chunk`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from pipeline.data.settings import CollatorSettings
from pipeline.eval.data import one_question
from pipeline.eval.generate import answer_batches
from pipeline.eval.tasks import BENCHMARK_TEMPLATE

MODEL_ID = "divico"
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA's


class DiViCoLmms(lmms):
    is_simple = True

    def __init__(self, pretrained: str, mode: str | None = None, tau: float | None = None, layer: int | None = None,
                 seed: int | None = None, template: str = BENCHMARK_TEMPLATE, device: str = "auto",
                 batch_size: int | str = 1, fast: bool = False, **unused: Any) -> None:
        from pipeline.eval.main import load_collator, load_model

        super().__init__()
        self.model = load_model(pretrained, mode=mode, tau=tau, layer=layer, seed=seed, device=device)
        self.collator = load_collator(Path(pretrained), CollatorSettings(template=template))
        self.batch_size = int(batch_size)
        self.fast = fast  # CompressedLlava's fast generation (static cache, CUDA graphs on a GPU)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in request order; requests with the same generation settings share batches."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        samples = []
        for number, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0) > 0:
                raise ValueError(f"{task}: asks to sample ({gen_kwargs}); the divico model decodes greedily only")
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            if len(visuals) > 1 or any(not isinstance(visual, Image.Image) for visual in visuals):
                raise ValueError(f"{task}, doc {doc_id}: {len(visuals)} visuals; the divico model takes one image")
            image = visuals[0].convert("RGB") if visuals else None
            samples.append(one_question(image, context, key=f"{task}/{doc_id}"))
            until = gen_kwargs.get("until") or []
            groups[gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                   (until,) if isinstance(until, str) else tuple(until)].append(number)
        answers: list[str] = [""] * len(requests)
        for (max_new_tokens, until), numbers in groups.items():
            batches = answer_batches(self.model, self.collator, [samples[n] for n in numbers],
                                     batch_size=self.batch_size, max_new_tokens=max_new_tokens, total=len(numbers),
                                     fast=self.fast)
            texts = [text for batch in batches for text in batch.texts]
            for number, text in zip(numbers, texts, strict=True):
                for stop in until:  # lmms-eval's stop strings: the answer ends before the first
                    text = text.split(stop)[0] if stop else text
                answers[number] = text
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the divico model answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the divico model answers generate_until tasks only")


MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{DiViCoLmms.__name__}")
