"""The one builder of synthetic LLaVA geometries (`llava_config`: LLaVA-1.5's layout at any
size; `llava_7b_config`: the 7B's decoder at a smaller width, for the benches), and the debug-size
LLaVA built with it: tiny CLIP vision tower + tiny Llama in a LlavaForConditionalGeneration,
with a byte-level BPE tokenizer and a processor built locally (`divico model tiny` writes it).

It stands in for llava-hf/llava-1.5-7b-hf wherever weights cannot be downloaded (tests, the
embedded default pipeline). The folder it writes is an ordinary Hugging Face model folder:
`from_pretrained` loads it exactly as it loads the real checkpoints, so every code path
after loading is the real one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from data_prep import grid
from pipeline.contract import EXIT_BAD_INPUT, IMAGE_TOKEN
from pipeline.durable import folder_written_whole

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_TOKEN]
# The chat template's role tags as it renders them, one token each.
ROLE_TAGS = ["USER:", " ASSISTANT:"]
FIT_ENTRIES = 4000  # entries of a --fit-text data file whose rendered chats the merges learn from

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


# LLaVA-1.5's vocabulary as the llava-hf checkpoints ship it: Llama's 32000 tokens, then <image>
# (32000) and <pad> (32001). The benches use it; the tiny model uses its own tokenizer's.
LLAVA_VOCAB = 32002
LLAVA_IMAGE_TOKEN_ID = 32000


def llava_config(*, width: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 image_token_id: int, image_size: int, patch_size: int = 14, vision_width: int = 64,
                 vision_layers: int = 1, vision_heads: int = 4, max_positions: int = 4096,
                 bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int | None = None,
                 init_std: float = 0.02) -> LlavaConfig:
    """A LlavaConfig of any size in LLaVA-1.5's layout: a CLIP vision tower (features from its
    second-to-last layer, CLS dropped: (image_size / patch_size)^2 visual tokens), the two-layer
    GELU projector, a Llama decoder. Head dim = width / heads, in the tower as in the decoder.

    The vocabulary rule, for every model built here: `vocab` is the size of the tokenizer the
    model is used with, image token included (the tiny model's own BPE; LLAVA_VOCAB for the
    benches, whose inputs are random ids). `init_std` is the decoder's and projector's weight
    init (transformers' `initializer_range`; 0.02 is Llama's); the tower keeps CLIP's own.
    """
    if width % heads or heads % kv_heads or vision_width % vision_heads:
        raise ValueError(f"width {width} / {heads} heads / {kv_heads} kv heads, vision width {vision_width} / "
                         f"{vision_heads} heads: widths must divide into heads, heads into kv heads")
    if not 0 <= image_token_id < vocab:
        raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary of {vocab}")
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_width)
    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=width // heads, max_position_embeddings=max_positions, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=False,
                       initializer_range=init_std)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", initializer_range=init_std)


def llava_7b_config(width: int, layers: int = 32) -> LlavaConfig:
    """LLaVA-1.5-7B's decoder at `width`: head dim 128 (width / 128 heads, no GQA), FFN width
    11008/4096 of the hidden size, its vocabulary; behind a 336 px / 14 px CLIP tower (576 visual
    tokens) of tiny width and two layers (the features, as LLaVA's, are the second-last layer's
    output, an attention layer's), since the benches time the decoder. width 4096, 32 layers: the 7B."""
    if width < 128 or width % 128:
        raise ValueError(f"width {width}: must be a positive multiple of 128 (LLaVA-1.5's head dim)")
    return llava_config(width=width, layers=layers, heads=width // 128, kv_heads=width // 128,
                        intermediate=round(width * 11008 / 4096 / 16) * 16, vocab=LLAVA_VOCAB,
                        image_token_id=LLAVA_IMAGE_TOKEN_ID, image_size=336, vision_layers=2)


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
    init_std: float = 0.02
    embed_std: float | None = None  # the token embedding table's init std (None: init_std, as in Llama)
    # > 0: the tower's position table starts as a row vector plus a column vector per patch (each
    # N(0, std^2)), so patches of one row or column look alike from the first step; 0: CLIP's init.
    grid_positions_std: float = 0.0
    seed: int = 0


def grid_geometry(side: int) -> TinyLlavaConfig:
    """The grid task's model (data_prep/grid.py): side * 14 px, one visual token per cell. A
    two-layer tower read at layer -2 as LLaVA reads CLIP, so the features carry one trained
    tower layer; its positions start with row + column structure; a 6-layer decoder of width 96
    with full multi-head attention.
    Init at PyTorch's default scales (linear weights std 0.06 ~ 1/sqrt(3 * 96), token embeddings
    N(0, 1)), not Llama's 0.02: at 0.02 the loss stayed flat at its plateau for 1,000 steps
    while this init left it (the README's learning curves)."""
    return TinyLlavaConfig(image_size=side * 14, vision_layers=2, hidden=96, intermediate=288, layers=6, kv_heads=4,
                           init_std=0.06, embed_std=1.0, grid_positions_std=0.5)


# The debug geometries `divico model tiny --geometry` writes (grid: at --grid-side).
GEOMETRIES = ("shapes", "grid")


def build_tokenizer(vocab_size: int, extra_text: str = "") -> PreTrainedTokenizerFast:
    """A byte-level BPE fitted on _CORPUS and `extra_text`, with the role tags as single tokens."""
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
    tokenizer.add_tokens([AddedToken(tag, normalized=False) for tag in ROLE_TAGS])
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


def chat_text(data_file: Path, limit: int = FIT_ENTRIES) -> str:
    """The first `limit` entries of a LLaVA data file as the model reads them: rendered with
    CHAT_TEMPLATE, so the merges learn the answers as they follow "ASSISTANT:" (" yes", " 3").
    Entries that are not well-formed conversations are skipped: this text only shapes merges."""
    from pipeline.data.conversation import conversation_rounds, render_chat_template

    entries = json.loads(data_file.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{data_file}: a JSON {type(entries).__name__}, not a list of entries")
    renderer = build_tokenizer(len(SPECIAL_TOKENS) + 256)  # applies the template; its merges do not matter
    texts = []
    for index, entry in enumerate(entries[:limit]):
        try:
            has_image = "image" in entry
            rounds = conversation_rounds(entry["conversations"], key=str(index), has_image=has_image)
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
        texts.append(render_chat_template(rounds, has_image=has_image, tokenizer=renderer,
                                          chat_template=CHAT_TEMPLATE).text)
    return "\n".join(texts)


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
    config = llava_config(
        width=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads, intermediate=cfg.intermediate,
        vocab=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_size=cfg.image_size, patch_size=cfg.patch_size, vision_width=cfg.vision_hidden,
        vision_layers=cfg.vision_layers, vision_heads=cfg.vision_heads, max_positions=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        init_std=cfg.init_std)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    if cfg.embed_std is not None:
        with torch.no_grad():
            model.model.language_model.embed_tokens.weight.normal_(0.0, cfg.embed_std)
    if cfg.grid_positions_std:
        side, width = cfg.image_size // cfg.patch_size, cfg.vision_hidden
        rows, cols = torch.randn(side, 1, width), torch.randn(1, side, width)
        with torch.no_grad():  # row 0 of the table is the CLS token's, which LLaVA drops
            model.model.vision_tower.embeddings.position_embedding.weight[1:] = (
                cfg.grid_positions_std * (rows + cols).reshape(side * side, width))
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


def write_tiny_llava(out_dir: Path, fit_text: str = "", cfg: TinyLlavaConfig | None = None) -> Path:
    """save_tiny_llava into `out_dir` atomically: written to `<out_dir>.tmp`, renamed when complete,
    so a folder with a config.json is a whole model. An existing model is kept."""
    if (out_dir / "config.json").is_file():
        log.info("tiny model: %s already holds a model, skipped", out_dir)
        return out_dir
    with folder_written_whole(out_dir) as partial:
        save_tiny_llava(partial, cfg, extra_text=fit_text)
    log.info("tiny model: wrote %s", out_dir)
    return out_dir


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tiny", help="write the tiny debug LLaVA (random init) and its processor")
    parser.add_argument("--out", type=Path, required=True, help="model folder (skipped when it holds a model)")
    parser.add_argument("--fit-text", type=Path, default=None, metavar="FILE",
                        help="a llava_v1_5_mix665k.json whose chats (rendered with the chat template) the "
                             "tokenizer's merges also learn: shorter sequences, one token per frequent answer")
    parser.add_argument("--geometry", choices=GEOMETRIES, default="shapes",
                        help="shapes: 100 visual tokens, 4 layers (the demo's first task); grid: one visual token "
                             "per grid cell, a 6-layer decoder (the grid task of `divico bench accuracy`)")
    parser.add_argument("--grid-side", type=int, default=grid.DEFAULT_SIDE, choices=grid.SIDES,
                        help="with --geometry grid: cells per side (data_prep/grid.py)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.fit_text is not None and not args.fit_text.is_file():
        print(f"error: --fit-text {args.fit_text}: no such file", file=sys.stderr)
        return EXIT_BAD_INPUT
    holds_other = args.out.is_dir() and not (args.out / "config.json").is_file() and any(args.out.iterdir())
    if args.out.is_file() or holds_other:
        print(f"error: --out {args.out}: exists and holds no model (config.json); give a new or empty folder",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        fit_text = chat_text(args.fit_text) if args.fit_text else ""
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        print(f"error: --fit-text {args.fit_text}: not a LLaVA JSON data file ({error})", file=sys.stderr)
        return EXIT_BAD_INPUT
    geometry = grid_geometry(args.grid_side) if args.geometry == "grid" else TinyLlavaConfig()
    write_tiny_llava(args.out, fit_text, geometry)
    print(f"tiny LLaVA in {args.out}")
    return 0
