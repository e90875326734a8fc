"""The compression modes: what each keeps and what it adds, one small class per mode.

A mode acts either between decoder layers K-1 and K (DiViCoConfig.layer): the layers before it
see the whole sequence, the layers from K on the text and the kept visual tokens; or, with
`before_decoder`, on each image's patches before the decoder, so every layer sees the short
sequence. A mode says

    compresses       False: the unmodified model (nothing is selected or dropped)
    before_decoder   it acts on the vision side: compress_images() picks each image's patches
                     (and may rewrite their features) before the projector
    attention_after_features  ... reading [CLS]'s attention in the vision layer after the
                     feature layer (PruMerge's), not in the feature layer itself
    tower_merge      ... merging patches after the first vision layer: a function (patches
                     (n, N, d)) -> (tokens (n, N, d), present (n, N) bool), see vision.image_tokens
    reads_question   ... and reading the question: ImageTokens.question and .projected are filled
    reads_attention  its scores are the query token's attention in layer K-1 (query_attention_scores),
                     captured while that layer runs; the FLOP count charges them
    reads_keys       it reads layer K-1's keys (after RoPE) and layer K's input: select_at_layer()
    gap_encoder      the kept tokens become v_s + mu from the gap encoder (whose weights are saved)
    variational      ... + eps * sigma while training, and the KL term: the full method
    trainable        False: a training-free baseline, which `divico train` refuses
    sample_seeds()   per-sample seeds for a mode that draws its own scores (None: it does not)
    scores()         (B, N) scores of the visual tokens; the top round(tau N_i) are kept
    compress_images()  before_decoder modes: each image's kept patches and their features
    select_at_layer()  reads_keys modes: the kept visual tokens, chosen by the mode itself
    later_stages()   further drops deeper in the decoder, [(layer, share of the visual tokens)]
    stage_kept()     how many such a drop leaves (None: the method decides per image)
    encodes_at_stage  gap_encoder modes: the encoder acts at the last later stage, over its
                     selection (every visual token it drops pooled), not at the first cut
    cuts_cache       at the end of a cached prefill, the layers from the first later stage's
                     ranking layer to the last stage keep only the tokens the last stage kept
    keep_at_stage()  what such a drop keeps (default: the share of the original count the query
                     attends to most in the layer before)
    reads_text_rows  ... ranking by the attention of every text token after the image up to the
                     query (StageState.attention is (B, Q, N)), not the query's alone
    scoring_flops()  what choosing costs, in FLOPs (pipeline/model/flops.py's convention)
    tau_problem()    why the mode cannot run at a tau (a method published at a few budgets), or None
    kept_tokens()    how many of an image's N visual tokens go on: round(tau N) unless the method
                     says otherwise (DeCo's pooled grid); None when the method decides per image
                     (Recoverable Compression as published): then the count is measured

and CompressedLlava, DiViCo and the FLOP count ask the mode, never its name. A mode is chosen
by name from pipeline/model/settings.py's MODES ("module:Class"): a new one is a class in a file
of its own plus one line there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.model.divico import image_seed, kept_count, random_scores, select_visual_tokens
from pipeline.model.vision import ImageTokens

if TYPE_CHECKING:  # settings.py builds the modes
    from pipeline.model.settings import DiViCoConfig


@dataclass
class LayerState:
    """What a reads_keys mode sees between layers K-1 and K, for B samples of N positions."""

    hidden: torch.Tensor  # (B, N, d): layer K's input
    keys: torch.Tensor  # (B, N, H_kv * head_dim): layer K-1's keys after RoPE
    image_mask: torch.Tensor  # (B, N) bool
    attention_mask: torch.Tensor  # (B, N) bool: False at padding
    query_positions: torch.Tensor  # (B,): each sample's query token, the end of its prompt (config.query)
    norm: torch.nn.Module  # the decoder's final norm


@dataclass
class StageState:
    """What a later stage's drop (CompressionMode.later_stages) sees, for B samples of the N
    positions left after the drops before it."""

    # (B, N): the query's attention in the layer before the stage; (B, Q, N): each text row's (reads_text_rows)
    attention: torch.Tensor
    rows: torch.Tensor | None  # (B, Q) bool: the rows of `attention` that are text rows, not padding (reads_text_rows)
    image_mask: torch.Tensor  # (B, N) bool: the visual tokens left
    visual: torch.Tensor  # (B,): each sample's visual tokens before the first drop
    rate: float  # the stage's share of `visual`
    protected: torch.Tensor | None  # (B, N) bool: tokens no stage may drop (ImageTokens.protected), if any


class CompressionMode:
    """Keep the visual tokens the query attends to most in layer K-1; add nothing."""

    compresses = True
    before_decoder = False
    attention_after_features = False
    tower_merge = None
    reads_question = False
    reads_attention = True
    reads_keys = False
    reads_text_rows = False
    cuts_cache = False
    gap_encoder = False
    encodes_at_stage = False
    variational = False
    trainable = True

    def __init__(self, config: DiViCoConfig | None = None) -> None:
        self.config = config  # the settings it was built from (DiViCoConfig.compression); None: the defaults

    def sample_seeds(self, seed: int, image_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_features: torch.Tensor | None) -> list[int] | None:
        return None

    def tau_problem(self, tau: float) -> str | None:
        return None

    def kept_tokens(self, num_visual: int, tau: float, counts: str = "project") -> int | None:
        return kept_count(num_visual, tau, counts) if self.compresses else num_visual

    def scores(self, attention: torch.Tensor | None, image_mask: torch.Tensor,
               sample_seeds: Sequence[int] | None) -> torch.Tensor:
        if attention is None:
            raise ValueError(f"{type(self).__name__} selects by attention scores: none were given")
        return attention

    def select_at_layer(self, state: LayerState, keep_ratio: torch.Tensor) -> torch.Tensor:
        """reads_keys modes: (B, N) bool, the kept visual tokens, at each sample's rate (B,)."""
        raise TypeError(f"{type(self).__name__} selects by scores(): it does not read layer K-1's keys")

    def later_stages(self, num_layers: int, layer: int, tau: float) -> list[tuple[int, float]]:
        """After the drop at layer K (`layer`), the layers where the visual tokens left are ranked
        again by the query's attention in the layer before and cut to a share of their original
        count, ascending: none unless the method drops in stages."""
        return []

    def stage_kept(self, num_visual: int, rate: float) -> int | None:
        """How many of an image's `num_visual` visual tokens a later stage at `rate` leaves; None
        when the method decides per image (then the count is measured)."""
        return kept_count(num_visual, rate)

    def keep_at_stage(self, state: StageState) -> torch.Tensor:
        """(B, N) bool: the visual tokens a later stage keeps."""
        return select_visual_tokens(state.attention, state.image_mask, state.rate, of=state.visual)

    def scoring_flops(self, hidden: int, num_tokens: int, num_visual: int, num_kept: int) -> int:
        """FLOPs of choosing, for one sample: one row of attention scores (2 N d) when the mode
        reads them, else none counted (the vision side is not counted: pipeline/model/flops.py)."""
        return 2 * num_tokens * hidden if self.reads_attention else 0

    def compress_images(self, tokens: ImageTokens, keep_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """before_decoder modes: (keep (n, N) bool, features (n, N, d_v)) for n images at their
        rates `keep_ratio` (n,): the patches that go on to the decoder, in their places and with
        their original positions, and the features the projector maps (unkept rows are unused)."""
        raise TypeError(f"{type(self).__name__} acts inside the decoder, not on the vision tower's patches")


class Uncompressed(CompressionMode):
    """none: the unmodified model."""

    compresses = False
    reads_attention = False


class FastV(CompressionMode):
    """fastv: top-tau by attention, the rest dropped, nothing learned (the paper's FastV baseline)."""

    trainable = False


class SelectOnly(CompressionMode):
    """select_only: FastV's forward under a LoRA fine-tune; ablation (a), no gap encoder."""


class PointEstimate(CompressionMode):
    """point_estimate: ablation (b), v_s + mu, no sampling, no KL."""

    gap_encoder = True


class DiViCoMode(CompressionMode):
    """divico: the full method, v_s + mu + eps * sigma in training and the KL term (eq. 9)."""

    gap_encoder = True
    variational = True


class RandomKeep(CompressionMode):
    """random: a random tau of each image's tokens, the rest dropped (the control). The draw is
    seeded by the config seed and the image's own bytes, so it is batch-invariant."""

    reads_attention = False

    def sample_seeds(self, seed: int, image_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_features: torch.Tensor | None) -> list[int]:
        # Each sample's image input: its pixel_values (one image per run of image tokens) or its
        # rows of image_features; empty for a text-only sample.
        if pixel_values is not None:
            run_starts = image_mask & ~F.pad(image_mask[:, :-1], (1, 0))
            images = torch.split(pixel_values, run_starts.sum(1).tolist())
        else:
            images = torch.split(image_features.reshape(-1, image_features.shape[-1]), image_mask.sum(1).tolist())
        return [image_seed(seed, image) for image in images]

    def scores(self, attention: torch.Tensor | None, image_mask: torch.Tensor,
               sample_seeds: Sequence[int] | None) -> torch.Tensor:
        if sample_seeds is None:
            raise ValueError("DiViCo.select: random mode needs sample_seeds (one image_seed per sample)")
        return random_scores(image_mask, sample_seeds)
