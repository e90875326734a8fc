"""How samples become tokens and pixels: the collator settings that training (the recipe's
`data.*` keys) and evaluation (`divico eval` keys) share. Torch-free, so the configs can
declare them without loading the model stack."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.conversation import TEMPLATES

ASPECT_RATIOS = ("pad", "none")


@dataclass
class CollatorSettings:
    template: str = "auto"  # "auto" (from the tokenizer), "vicuna_v1" or "chat_template"
    model_max_length: int = 2048
    image_aspect_ratio: str = "pad"  # "pad": LLaVA-1.5's square canvas; "none": the processor's resize + crop

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.template not in ("auto", *TEMPLATES):
            raise ValueError(f"template={self.template!r}; choose one of {('auto', *TEMPLATES)}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio!r}; choose one of {ASPECT_RATIOS}")
        if self.model_max_length <= 0:
            raise ValueError(f"model_max_length={self.model_max_length} must be positive")
