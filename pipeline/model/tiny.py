"""A debug-size LLaVA: tiny CLIP vision tower + tiny Llama in a LlavaForConditionalGeneration,
with a byte-level BPE tokenizer and a processor built locally.

It stands in for llava-hf/llava-1.5-7b-hf wherever weights cannot be downloaded (tests, the
embedded default pipeline). The folder it writes is an ordinary Hugging Face model folder:
`from_pretrained` loads it exactly as it loads the real checkpoints, so every code path
after loading is the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_TOKEN]

# The llava-hf chat template (llava-1.5-*-hf): "USER: <image>\n{text} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Text the BPE merges are learned from. Byte-level BPE encodes any string, so this only
# shapes how compact the encoding is; the synthetic data's words are the ones that matter.
_CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:
How many red green blue yellow purple orange white black gray circles squares triangles
stars are there in the image? Is there a circle square triangle star in the image? Yes No
What is written on the sign? What color is the shape in the top left top right bottom left
bottom right corner center of the picture? Answer the question using a single word or phrase.
Describe the image briefly. one two three four five six seven eight nine ten zero
left right top bottom middle above below next to the and of a an is are what which where
0 1 2 3 4 5 6 7 8 9 A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
"""


@dataclass
class TinyLlavaConfig:
    """Geometry of the debug model. 140 px / 14 px patches = 100 visual tokens, so the
    paper's tau grid keeps 7, 11 and 17 of them."""

    image_size: int = 140
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 128
    intermediate: int = 344
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2  # GQA, as in larger Llama models, so every code path sees it
    vocab_size: int = 1024
    max_positions: int = 2048
    seed: int = 0


def build_tokenizer(vocab_size: int, extra_text: str = "") -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS, extra_text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        add_bos_token=True,
    )


def build_processor(cfg: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    # CLIP's normalisation constants, as in openai/clip-vit-large-patch14-336.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token the "default" strategy drops
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava(cfg: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_llava(out_dir: str | Path, cfg: TinyLlavaConfig | None = None, extra_text: str = "") -> Path:
    """Write a randomly initialised tiny LLaVA with its processor to `out_dir`."""
    cfg = cfg or TinyLlavaConfig()
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(cfg.vocab_size, extra_text)
    processor = build_processor(cfg, tokenizer)
    model = build_tiny_llava(cfg, tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
