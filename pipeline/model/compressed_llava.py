"""A LLaVA model with DiViCo compression at decoder layer K: training forward, cached
batched generation, save/load.

Construction (the model may already carry PEFT LoRA adapters):

    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    llava = peft.get_peft_model(llava, lora_config)          # optional
    llava.gradient_checkpointing_enable()                    # optional, keeps working
    model = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1/9))
    out = model(input_ids, attention_mask, pixel_values, labels)   # .loss, .lm_loss, .kl, .gap_stats
    out = model(..., keep_ratio=0.08)                       # another rate (a MoE model), or one per sample
    out = model(..., branch_rates=(1/15, 1/9, 1/6))         # layers >= K once per rate (training)
    out.loss.backward()
    model.save_divico(adapter_dir)        # divico.json + divico.safetensors beside the adapter
    tokens = model.generate(input_ids, attention_mask, pixel_values, max_new_tokens=32)

`CompressedLlava.from_saved(llava, adapter_dir)` rebuilds the wrapper from those files.
The wrapper is an nn.Module whose parameters are the LLaVA model's (frozen or LoRA) plus
the gap encoder's; hand it to DeepSpeed as a whole.

How it runs: the decoder's layer loop is run here, not by LlamaModel.forward:
embeddings (+ image features from the model's own get_image_features) -> layers 0..K-1 on
the full sequence -> selection + gap encoder + dropping -> layers K..L-1 on the shorter
sequence -> norm -> lm_head. Decoder layers are called as modules, so gradient
checkpointing, PEFT and attention implementations (eager, sdpa, flash_attention_2) are
the library's own. Only pipeline/model/decoder.py knows the backbone's attribute names.

Sequence plumbing after dropping: kept tokens keep their order and original position ids
(cos/sin are gathered, not recomputed from new indices); dropped tokens and padding are
removed and each sample is re-padded on the left, so the last token stays last; the 2D
mask is always passed explicitly, so transformers never reads the position gaps as packed
sequences; next-token targets are formed on the full sequence and then gathered, so labels
stay aligned whatever is dropped.

Generation keeps a DynamicCache whose layers < K hold the full prompt and layers >= K the
compressed one; each decode step builds one mask per group from its own 2D mask and cache
length. A custom loop (greedy, or sampling with temperature / top-p) drives it, because
GenerationMixin derives a single mask and cache length per step. Decode steps do no
selection.
"""

from __future__ import annotations

import bisect
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from pipeline.contract import (
    DIVICO_FORMAT_VERSION,
    DIVICO_FORMATS_READ,
    DIVICO_SETTINGS_FILE,
    DIVICO_WEIGHTS_FILE,
    IGNORE_INDEX,
)
from pipeline.model.decoder import CACHE_ARG, DecoderParts, decoder_parts
from pipeline.model.divico import (
    DiViCo,
    ProjectionCapture,
    query_attention_scores,
    rotated_keys,
)
from pipeline.model.modes import LayerState, StageState
from pipeline.model.settings import DiViCoConfig
from pipeline.model.static_generation import StaticGeneration
from pipeline.model.vision import image_tokens

# (hidden (B, n, d), its first layer, its 2D mask (B, n), its (cos, sin)) -> the last layer's output (B, n', d),
# whose last row is each sample's last token: the layers from the first to the last, with their cache.
TailRunner = Callable[[torch.Tensor, int, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


@dataclass
class CompressedLlavaOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + beta * kl
    lm_loss: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    past_key_values: Cache | None = None
    # The 2D mask of the sequence layers >= K see, and for each of its slots the input
    # position it came from (-1 for padding slots added by dropping).
    compressed_attention_mask: torch.Tensor | None = None
    compressed_positions: torch.Tensor | None = None
    # (first layer, 2D mask) of each run of layers that saw one sequence, ascending: what each
    # group of cache layers holds, for the decode steps.
    cache_groups: list[tuple[int, torch.Tensor]] | None = None
    # Gap-encoder health (pipeline.model.divico.Compression.gap_stats): {"mu_over_vs", "sigma"},
    # None when the mode has no gap encoder or the batch no image.
    gap_stats: dict[str, torch.Tensor] | None = None
    # The encoder's auxiliary losses, unweighted (loss adds them with their weights), and its
    # routing (Compression.routing); empty / None without them.
    aux_losses: dict[str, torch.Tensor] | None = None
    routing: tuple[torch.Tensor, torch.Tensor] | None = None


def zero_graph_anchor(module: nn.Module) -> torch.Tensor | None:
    """0 * the sum of a module's trainable weights: added to the loss of a batch that did
    not use the module, so every data-parallel rank produces a gradient (of zeros) for every
    trainable weight in every step (ZeRO-2 hangs or errors otherwise)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0.0 if params else None


def right_aligned_gather_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, N) bool -> (index, valid), both (B, N'): for each sample its kept tokens in
    order, right-aligned; slots left of them are padding (valid False, index 0)."""
    lengths = keep.sum(1)
    new_length = int(lengths.max())
    slot = keep.long().cumsum(1) - 1 + (new_length - lengths)[:, None]
    sample_idx, token_idx = keep.nonzero(as_tuple=True)
    index = torch.zeros(keep.shape[0], new_length, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], new_length, dtype=torch.bool, device=keep.device)
    index[sample_idx, slot[sample_idx, token_idx]] = token_idx
    valid[sample_idx, slot[sample_idx, token_idx]] = True
    return index, valid


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) -> (B, N', ...) along dim 1."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


def _kept(keep: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, position_ids: torch.Tensor,
          position_embeddings: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor | None,
          image_mask: torch.Tensor) -> tuple:
    """The sequence of the tokens `keep` (B, N) marks, each sample's right-aligned: (its 2D
    mask, hidden states, input positions (-1 at padding), position ids, (cos, sin), targets,
    image mask), every per-token tensor gathered alike."""
    index, valid = right_aligned_gather_index(keep)
    return (valid, _gather_tokens(hidden, index), positions.gather(1, index).masked_fill(~valid, -1),
            position_ids.gather(1, index), tuple(_gather_tokens(x, index) for x in position_embeddings),
            None if targets is None else targets.gather(1, index).masked_fill(~valid, IGNORE_INDEX),
            image_mask.gather(1, index) & valid)


def _hide_from_answers(positions: torch.Tensor, queries: torch.Tensor, hidden: torch.Tensor):
    """A mask function (transformers' and_mask_function) for a sequence of input `positions`
    (B, N'): tokens after their sample's query do not see the input positions `hidden` (B, N)."""
    def visible(batch_idx, head_idx, q_idx, kv_idx):
        after_query = positions[batch_idx, q_idx] > queries[batch_idx]
        return ~(after_query & hidden[batch_idx, positions[batch_idx, kv_idx].clamp(min=0)])
    return visible


def _cut_cache(cache: Cache, layers: range, groups: list[tuple[int, torch.Tensor]],
               group_positions: list[torch.Tensor], final_positions: torch.Tensor) -> None:
    """Each layer in `layers` keeps, of its cache, the entries at `final_positions` (B, N') (input
    positions, -1 at padding), in that order; its group's cache holds `group_positions`."""
    firsts = [first for first, _ in groups]
    for layer in layers:
        held = group_positions[bisect.bisect_right(firsts, layer) - 1]
        index = (held[:, None, :] == final_positions[:, :, None]).long().argmax(-1)  # (B, N')
        entry = cache.layers[layer]
        gather = index[:, None, :, None].expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1])
        entry.keys, entry.values = entry.keys.gather(2, gather), entry.values.gather(2, gather)


def text_rows(positions: torch.Tensor, attention_mask: torch.Tensor, last_image: torch.Tensor,
              queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the text after each sample's last image token up to its query, in a sequence
    whose tokens sit at input `positions` (B, N): (index (B, Q), valid (B, Q)); padding rows
    point at the query."""
    index, valid = right_aligned_gather_index(attention_mask & (positions > last_image[:, None])
                                              & (positions <= queries[:, None]))
    query = (positions == queries[:, None]).long().argmax(1)
    return torch.where(valid, index, query[:, None]), valid


def question_vectors(embeddings: torch.Tensor, image_mask: torch.Tensor, attention_mask: torch.Tensor,
                     queries: torch.Tensor) -> torch.Tensor:
    """(B, d): each sample's question as the mean input embedding of its text between its last
    image token and its query token (the end of the first instruction), both excluded and
    included; zeros where there is none."""
    positions = torch.arange(image_mask.shape[1], device=image_mask.device)
    last_image = torch.where(image_mask, positions, -1).max(1).values
    question = attention_mask & (positions > last_image[:, None]) & (positions <= queries[:, None])
    weights = question.to(embeddings.dtype)
    return (weights[..., None] * embeddings).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (as GenerationMixin computes them): a left-padded
    sample gets the positions it would have alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CompressedLlava(nn.Module):
    """LlavaForConditionalGeneration (optionally PEFT-wrapped) + DiViCo at layer K."""

    def __init__(self, model: nn.Module, config: DiViCoConfig) -> None:
        super().__init__()
        self.model = model
        llava = self.llava
        if not isinstance(llava, LlavaForConditionalGeneration):
            raise TypeError(f"CompressedLlava needs a LlavaForConditionalGeneration (optionally PEFT-wrapped), "
                            f"got {type(llava).__name__}")
        parts = self.decoder
        config.validate(len(parts.layers))
        self.config = config
        embed_weight = parts.embed_tokens.weight
        self.divico = DiViCo(config, parts.config.hidden_size).to(embed_weight.device, embed_weight.dtype)
        self._static: StaticGeneration | None = None  # fast generation's cache and graphs, kept between calls
        self.train(model.training)  # start in the wrapped model's mode (from_pretrained gives eval)

    @property
    def llava(self) -> LlavaForConditionalGeneration:
        get_base_model = getattr(self.model, "get_base_model", None)  # PeftModel
        return get_base_model() if get_base_model is not None else self.model

    @property
    def decoder(self) -> DecoderParts:
        return decoder_parts(self.llava)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        logits_to_keep: int = 0,
        keep_ratio: float | torch.Tensor | None = None,
        branch_rates: tuple[float, ...] | None = None,
        aux_weights: dict[str, float] | None = None,
    ) -> CompressedLlavaOutput:
        """Full-sequence forward (training, evaluation, or the prefill of generation).

        input_ids, attention_mask, labels: (B, N); labels use -100 for unsupervised tokens
        and are aligned with input_ids (the shift happens here). pixel_values: one image per
        run of image tokens, as the LLaVA processor makes them; or `image_features`
        (num_images, N_i, d), the projector's output, to skip the vision tower.
        query_positions (B,): the token before each sample's first answer (the collator's
        `query_positions`); config.query decides whether they are used (`query_positions()`).
        position_ids default to positions that skip padding. logits_to_keep > 0 computes
        logits for the last positions only (not with labels).
        keep_ratio: the kept fraction, a float or one per sample (B,); config.tau when None.
        branch_rates: layers < K run once and layers >= K once per rate, on the batch repeated
        rate by rate (rows r*B..(r+1)*B-1 at rate r; logits come back (R*B, ...)); the losses
        are means over all of them (the MoE stage's `all_centres` schedule). Not with a cache.
        aux_weights: the weights of the gap encoder's auxiliary losses; its `aux_weights` when None.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        image_mask = input_ids == self.llava.config.image_token_id
        queries = self.query_positions(attention_mask, image_mask, labels, first_answer=query_positions)
        mode = self.config.compression
        if branch_rates is not None and (past_key_values is not None or keep_ratio is not None
                                         or mode.before_decoder or mode.reads_keys
                                         or mode.later_stages(len(self.decoder.layers), self.split, self.config.tau)):
            raise ValueError("branch_rates replaces keep_ratio and cannot be used with a cache or with a mode "
                             "that chooses by itself (before the decoder, from layer K-1's keys, or in stages)")
        return self._forward(input_ids, attention_mask, image_mask, queries, pixel_values, labels,
                             position_ids=position_ids, image_features=image_features,
                             past_key_values=past_key_values, logits_to_keep=logits_to_keep,
                             keep_ratio=keep_ratio, branch_rates=branch_rates, aux_weights=aux_weights)

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_mask: torch.Tensor,
        queries: torch.Tensor,
        pixel_values: torch.Tensor | None,
        labels: torch.Tensor | None,
        *,
        position_ids: torch.Tensor | None,
        image_features: torch.Tensor | None,
        past_key_values: Cache | None,
        logits_to_keep: int,
        keep_ratio: float | torch.Tensor | None = None,
        branch_rates: tuple[float, ...] | None = None,
        aux_weights: dict[str, float] | None = None,
        answers_miss: torch.Tensor | None = None,
        tail: TailRunner | None = None,
    ) -> CompressedLlavaOutput:
        """forward() with the selection query of each sample given (`queries` (B,)): generation
        keeps its prompt's query while it recomputes the longer sequence. `answers_miss` (B, N)
        bool: for a mode that cuts the cache (cuts_cache), the visual tokens the cut leaves out;
        the tokens after the query then do not see them in the cut layers, as in decoding from
        the cut cache (the uncached reference of generate()). `tail`: runs the layers after the
        last change of sequence length (`layout()`) instead of the loop here (the static prefill
        of fast generation)."""
        parts = self.decoder
        position_ids = (positions_from_mask(attention_mask) if position_ids is None
                        else position_ids.expand_as(input_ids))
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")

        mode = self.config.compression
        compress, split, stages = self.layout(image_mask)
        hidden, kept_before, protected = self._embed(input_ids, image_mask, pixel_values, image_features,
                                                     keep_ratio if compress and mode.before_decoder else None,
                                                     question=(attention_mask, queries))
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, IGNORE_INDEX)
            targets[:, :-1] = labels[:, 1:]

        # MustDrop's cache stage: layers from the first filter's to the last stage's keep only
        # the visual tokens that survive the last filter, once the prefill is done.
        cut = range(stages[0][0] - 1, stages[-1][0]) if mode.cuts_cache and stages else range(0)
        position_embeddings = parts.rotary_emb(hidden, position_ids)
        use_cache = past_key_values is not None
        every_position = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)

        def masks(kept_mask: torch.Tensor, positions: torch.Tensor, position_ids: torch.Tensor, first: int):
            """The 4D masks of the layers from `first` on: (any layer's, a cut layer's). Built when
            a run of layers needs them (`run`), so a tail runner never has them built."""
            def mask(and_mask=None):
                return create_causal_mask(config=parts.config, inputs_embeds=hidden, attention_mask=kept_mask,
                                          **{CACHE_ARG: past_key_values}, position_ids=position_ids, layer_idx=first,
                                          and_mask_function=and_mask)
            plain = mask()
            return plain, plain if answers_miss is None else mask(_hide_from_answers(positions, queries, answers_miss))

        def run(hidden: torch.Tensor, first: int, last: int, layer_masks: Callable[[], tuple]) -> torch.Tensor:
            built = layer_masks() if last > first else None
            for index in range(first, last):
                hidden = parts.layers[index](hidden, attention_mask=built[index in cut],
                                             position_embeddings=position_embeddings,
                                             **{CACHE_ARG: past_key_values}, use_cache=use_cache)
            return hidden

        layer_masks = partial(masks, attention_mask, every_position, position_ids, 0)
        # Selection reuses layer K-1's own q/k projections, captured while it runs.
        scoring = compress and mode.reads_attention
        capture = (ProjectionCapture(parts.layers[split - 1].self_attn, queries)
                   if scoring or (compress and mode.reads_keys) else contextlib.nullcontext())
        # Layers get no position_ids: RoPE comes from position_embeddings, and flash-attention
        # would read the gaps left by dropping as packed sequences.
        with capture:
            hidden = run(hidden, 0, split, layer_masks)

        kl = hidden.new_zeros((), dtype=torch.float32)
        gap_stats, aux_losses, routing = None, {}, None
        kept_mask = attention_mask
        kept_positions = every_position
        whole_prompt = split > 0 or not compress  # some layers see the whole prompt
        cache_groups = [(0, attention_mask)] if whole_prompt else []
        group_positions = [every_position] if whole_prompt else []  # the input positions each group's cache holds
        start = split
        if compress:
            scores = query_attention_scores(capture, position_embeddings, attention_mask) if scoring else None
            seeds = mode.sample_seeds(self.config.seed, image_mask, pixel_values, image_features)
            if branch_rates:  # the rest of the network once per rate, on the batch repeated
                repeats = len(branch_rates)
                keep_ratio = torch.tensor(branch_rates, device=hidden.device).repeat_interleave(hidden.shape[0])
                hidden, attention_mask, image_mask, position_ids = (
                    x.repeat(repeats, *([1] * (x.dim() - 1))) for x in (hidden, attention_mask, image_mask, position_ids))
                position_embeddings = tuple(x.repeat(repeats, 1, 1) for x in position_embeddings)
                scores = scores.repeat(repeats, 1) if scores is not None else None
                seeds = seeds * repeats if seeds is not None else None
                targets = targets.repeat(repeats, 1) if targets is not None else None
            if kept_before is not None:
                keep_visual = kept_before
            elif mode.reads_keys:
                rates = torch.as_tensor(self.config.tau if keep_ratio is None else keep_ratio, dtype=torch.float64,
                                        device=hidden.device).expand(hidden.shape[0])
                state = LayerState(hidden=hidden, keys=rotated_keys(capture, position_embeddings),
                                   image_mask=image_mask, attention_mask=attention_mask,
                                   query_positions=queries, norm=parts.norm)
                keep_visual = mode.select_at_layer(state, rates)
            else:
                keep_visual = self.divico.select(scores, image_mask, seeds, keep_ratio)
            if not mode.encodes_at_stage:
                pooled = self.divico.pooled(scores, image_mask, keep_visual, keep_ratio)
                hidden, kl, gap_stats, aux_losses, routing = self.divico(hidden, image_mask, keep_visual, keep_ratio,
                                                                         pooled)

            # Padding goes too: in a mixed batch a text-only sample would otherwise keep the
            # compressed sequence as long as the input.
            visual = image_mask.sum(1)
            every_position = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
            last_image = torch.where(image_mask, every_position, -1).amax(1)  # for reads_text_rows stages
            kept_mask, hidden, kept_positions, kept_position_ids, position_embeddings, targets, image_mask = _kept(
                attention_mask & (~image_mask | keep_visual), hidden, every_position, position_ids,
                position_embeddings, targets, image_mask)
            layer_masks = partial(masks, kept_mask, kept_positions, kept_position_ids, split)
            cache_groups.append((split, kept_mask))
            group_positions.append(kept_positions)
            # Further drops (PyramidDrop, MustDrop): at each stage layer s, the visual tokens left
            # are ranked by the attention of the query (or of the text rows) in layer s - 1.
            for stage, rate in stages:
                stage_queries = (kept_positions == queries[:, None]).long().argmax(1)
                rows, row_mask = (text_rows(kept_positions, kept_mask, last_image, queries) if mode.reads_text_rows
                                  else (stage_queries, None))
                with ProjectionCapture(parts.layers[stage - 1].self_attn, rows) as capture:
                    hidden = run(hidden, start, stage, layer_masks)
                protected_left = (None if protected is None
                                  else protected.gather(1, kept_positions.clamp(min=0)) & kept_mask)
                keep_visual = mode.keep_at_stage(StageState(
                    attention=query_attention_scores(capture, position_embeddings, kept_mask), rows=row_mask,
                    image_mask=image_mask, visual=visual, rate=rate, protected=protected_left))
                if mode.encodes_at_stage and stage == stages[-1][0]:  # over the last selection, the rest pooled
                    hidden, kl, gap_stats, aux_losses, routing = self.divico(hidden, image_mask, keep_visual,
                                                                             keep_ratio)
                kept_mask, hidden, kept_positions, kept_position_ids, position_embeddings, targets, image_mask = _kept(
                    kept_mask & (~image_mask | keep_visual), hidden, kept_positions, kept_position_ids,
                    position_embeddings, targets, image_mask)
                layer_masks = partial(masks, kept_mask, kept_positions, kept_position_ids, stage)
                cache_groups.append((stage, kept_mask))
                group_positions.append(kept_positions)
                start = stage
        if tail is not None:
            hidden = tail(hidden, start, kept_mask, position_embeddings)
        else:
            hidden = run(hidden, start, len(parts.layers), layer_masks)
        if use_cache and cut:
            _cut_cache(past_key_values, cut, cache_groups, group_positions, kept_positions)
            cache_groups = [group for group in cache_groups if group[0] < cut.start] + [(cut.start, kept_mask)]

        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = parts.lm_head(parts.norm(hidden))

        out = CompressedLlavaOutput(logits=logits, kl=kl, past_key_values=past_key_values,
                                    compressed_attention_mask=kept_mask, compressed_positions=kept_positions,
                                    cache_groups=cache_groups,
                                    gap_stats=gap_stats, aux_losses=aux_losses, routing=routing)
        if targets is not None:
            out.lm_loss = self._lm_loss(logits, targets)
            out.loss = out.lm_loss + self.config.beta * kl
            if aux_losses:
                weights = self.divico.gap_encoder.aux_weights if aux_weights is None else aux_weights
                out.loss = out.loss + sum(weights[name] * value for name, value in aux_losses.items())
            if self.training and torch.is_grad_enabled():
                out.loss = out.loss + self._unused_module_anchor(used_images=bool(image_mask.any()),
                                                                 used_encoder=compress)
        return out

    def query_positions(self, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                        labels: torch.Tensor | None = None, first_answer: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """(B,) index of the query token whose attention selects the visual tokens, by config.query.

        "first_answer": the token before each sample's first answer (the last token of the
        first instruction): `first_answer` when given (the collator's query_positions), else
        the token before the first supervised label; without either (inference), the last
        non-pad token, which is the same token for a prompt that ends where the answer starts.
        "last" (the released code's rule): the last non-pad token, whatever `first_answer`
        and `labels` say; in training it sees the answers.
        A sample whose query would come before its last image token (it could not see the
        image) uses its last non-pad token.
        """
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_token = torch.where(attention_mask, positions, -1).max(1).values
        query = last_token
        if self.config.query == "first_answer" and first_answer is not None:
            query = first_answer.to(last_token.device)
        elif self.config.query == "first_answer" and labels is not None:
            supervised = labels != IGNORE_INDEX
            first = torch.where(supervised, positions, attention_mask.shape[1]).min(1).values
            query = torch.where(supervised.any(1), (first - 1).clamp(min=0), last_token)
        last_image = torch.where(image_mask, positions, -1).max(1).values
        return torch.where(query < last_image, last_token, query)

    @property
    def split(self) -> int:
        """The layer whose input is compressed: K, or 0 for a mode that acts before the decoder."""
        return 0 if self.config.compression.before_decoder else self.config.layer

    def layout(self, image_mask: torch.Tensor) -> tuple[bool, int, list[tuple[int, float]]]:
        """For a batch whose image tokens are `image_mask` (B, N): (whether it is compressed, the
        first layer that sees the compressed sequence, the later stages' drops); uncompressed,
        every layer from 0 sees the whole prompt. The last of these layers starts the tail, the
        layers whose sequence no longer changes."""
        mode = self.config.compression
        if not (mode.compresses and bool(image_mask.any())):
            return False, 0, []
        return True, self.split, mode.later_stages(len(self.decoder.layers), self.split, self.config.tau)

    def _embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, pixel_values: torch.Tensor | None,
               image_features: torch.Tensor | None, keep_ratio: float | torch.Tensor | None,
               question: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The input embeddings, images in place; and for a mode that acts before the decoder
        (`keep_ratio` given, None: config.tau), the (B, N) kept visual tokens it chose and those
        no later stage may drop (None if it names none).
        `question`: (attention_mask, query positions), where a mode that reads it finds each
        sample's question."""
        hidden = self.decoder.embed_tokens(input_ids)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        kept = protected = None
        if self.config.compression.before_decoder and bool(image_mask.any()):
            if pixel_values is None:
                raise ValueError(f"mode {self.config.mode!r} reads the vision tower: pass pixel_values, "
                                 "not image_features")
            questions = (question_vectors(hidden, image_mask, *question)
                         if self.config.compression.reads_question else None)
            image_features, kept, protected = self._compress_images(image_mask, pixel_values, keep_ratio, questions)
        elif pixel_values is not None:
            vision_dtype = next(self.llava.model.vision_tower.parameters()).dtype
            features = self.llava.model.get_image_features(pixel_values=pixel_values.to(vision_dtype),
                                                           return_dict=True).pooler_output
            image_features = torch.cat(list(features), dim=0)
        num_image_tokens = int(image_mask.sum())
        if image_features is None:
            if num_image_tokens:
                raise ValueError(f"input_ids hold {num_image_tokens} image tokens but no pixel_values were given")
            return hidden, None, None
        image_features = image_features.reshape(-1, hidden.shape[-1])
        if image_features.shape[0] != num_image_tokens:
            raise ValueError(f"input_ids hold {num_image_tokens} image tokens but the images give "
                             f"{image_features.shape[0]} feature vectors")
        return hidden.masked_scatter(image_mask.unsqueeze(-1), image_features.to(hidden.dtype)), kept, protected

    def _compress_images(self, image_mask: torch.Tensor, pixel_values: torch.Tensor,
                         keep_ratio: float | torch.Tensor | None, questions: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The mode's compress_images on every image, each at its sample's rate and with its
        sample's question (B, d): (the projected features (num_images, N, d), the kept visual
        tokens (B, L) in sequence positions, the protected ones (B, L) or None)."""
        mode = self.config.compression
        run_starts = image_mask & ~F.pad(image_mask[:, :-1], (1, 0))
        images_per_sample = run_starts.sum(1)
        rates = torch.as_tensor(self.config.tau if keep_ratio is None else keep_ratio, dtype=torch.float64,
                                device=image_mask.device).expand(image_mask.shape[0])
        projector = self.llava.model.multi_modal_projector
        tokens = image_tokens(self.llava, pixel_values, mode.attention_after_features, mode.tower_merge)
        if mode.reads_question:
            tokens.question = questions.repeat_interleave(images_per_sample, dim=0)
            tokens.projected = projector(tokens.features)
        keep, features = mode.compress_images(tokens, rates.repeat_interleave(images_per_sample))
        kept = torch.zeros_like(image_mask)
        kept[image_mask] = keep.reshape(-1).to(image_mask.device)
        protected = None
        if tokens.protected is not None:
            protected = torch.zeros_like(image_mask)
            protected[image_mask] = tokens.protected.reshape(-1).to(image_mask.device)
        return projector(features.to(tokens.features.dtype)), kept, protected

    @staticmethod
    def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over supervised targets (0 when there are none)."""
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(logits.device),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def _unused_module_anchor(self, used_images: bool, used_encoder: bool) -> torch.Tensor | float:
        anchors = []
        if not used_images:
            anchors.append(zero_graph_anchor(self.llava.model.multi_modal_projector))
        if not used_encoder:
            anchors.append(zero_graph_anchor(self.divico))
        anchors = [a for a in anchors if a is not None]
        return sum(anchors) if anchors else 0.0

    # --------------------------------------------------------------- save / load
    def save_divico(self, directory: str | Path) -> None:
        """Write divico.json (settings) and, when the mode has a gap encoder,
        divico.safetensors (its weights) into `directory` (e.g. beside a PEFT adapter)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = {"format_version": DIVICO_FORMAT_VERSION, "hidden_size": self.decoder.config.hidden_size,
                    "config": self.config.to_dict()}
        (directory / DIVICO_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        if self.divico.gap_encoder is not None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.divico.gap_encoder.state_dict().items()}
            save_file(state, str(directory / DIVICO_WEIGHTS_FILE), metadata={"format": "pt"})

    @staticmethod
    def read_saved(directory: str | Path, **overrides) -> tuple[DiViCoConfig, int]:
        """The settings `save_divico` wrote into `directory` with `overrides` applied, validated
        (ValueError naming the file or the setting), and the hidden size they were saved for."""
        settings_path = Path(directory) / DIVICO_SETTINGS_FILE
        if not settings_path.is_file():
            raise FileNotFoundError(f"{settings_path}: no DiViCo settings (written by CompressedLlava.save_divico)")
        settings = json.loads(settings_path.read_text())
        if settings.get("format_version") not in DIVICO_FORMATS_READ:
            raise ValueError(f"{settings_path}: format_version {settings.get('format_version')!r}, "
                             f"this code reads {DIVICO_FORMATS_READ}")
        config = DiViCoConfig.from_dict({**settings["config"], **overrides})
        try:
            config.validate()
        except ValueError as error:
            raise ValueError(f"{settings_path} with {overrides}: {error}" if overrides else
                             f"{settings_path}: {error}") from error
        return config, settings["hidden_size"]

    @classmethod
    def from_saved(cls, model: nn.Module, directory: str | Path, **overrides) -> CompressedLlava:
        """Rebuild the wrapper around `model` from `save_divico`'s files. `overrides`
        replace saved settings (e.g. mode="fastv" to evaluate the same LoRA without the
        encoder, tau=T to run a mixture-of-experts model at another rate). Weights are read
        with safetensors (never unpickled)."""
        directory = Path(directory)
        settings_path = directory / DIVICO_SETTINGS_FILE
        config, hidden_size = cls.read_saved(directory, **overrides)
        wrapper = cls(model, config)
        if hidden_size != wrapper.decoder.config.hidden_size:
            raise ValueError(f"{settings_path}: saved for hidden size {hidden_size}, "
                             f"the model has {wrapper.decoder.config.hidden_size}")
        encoder = wrapper.divico.gap_encoder
        if encoder is not None:
            weights_path = directory / DIVICO_WEIGHTS_FILE
            if not weights_path.is_file():
                raise FileNotFoundError(f"{weights_path}: mode {wrapper.config.mode!r} needs gap-encoder weights")
            device = next(encoder.parameters()).device
            encoder.load_state_dict(load_file(str(weights_path), device=str(device)))
        return wrapper

    # --------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        fast: bool = False,
    ) -> torch.Tensor:
        """Greedy or sampled continuation of left-padded prompts: returns (B, N + T) token
        ids, prompt first; a sample that produced EOS is filled with pad_token_id.

        query_positions: each prompt's first-answer query (see `query_positions()`); under
        either rule the query is then fixed for the whole generation. use_cache=False
        recomputes the whole sequence each step (selection again, with the prompt's query),
        the reference the cached path must equal. fast=True: a static cache, the layers after
        the last cut and each decode step replayed from CUDA graphs on a GPU
        (pipeline/model/static_generation.py); the same tokens as the eager path.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts: attention_mask[:, -1] must be all 1 "
                             "(set tokenizer.padding_side = 'left')")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if fast and not use_cache:
            raise ValueError("fast=True decodes from a static cache: it cannot be combined with use_cache=False")
        generation_config = self.llava.generation_config
        eos_token_id = generation_config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           device=input_ids.device, dtype=torch.long)
        pad_token_id = generation_config.pad_token_id if pad_token_id is None else pad_token_id
        if pad_token_id is None:
            raise ValueError("generate() needs pad_token_id (none given and none in the generation config)")
        image_mask = input_ids == self.llava.config.image_token_id
        queries = self.query_positions(attention_mask, image_mask, first_answer=query_positions)

        next_position = attention_mask.sum(1, keepdim=True)
        static = None
        if fast:
            self._static = static = StaticGeneration.serving(self._static, self.decoder, *input_ids.shape,
                                                             max_new_tokens)
            _, split, stages = self.layout(image_mask)
            cache = static.prefill_cache(stages[-1][0] if stages else split)
        else:
            cache = DynamicCache(config=self.decoder.config) if use_cache else None
        out = self._forward(input_ids, attention_mask, image_mask, queries, pixel_values, None,
                            position_ids=None, image_features=image_features, past_key_values=cache,
                            logits_to_keep=1, tail=static.tail if fast else None)
        if fast:
            static.start_decoding(cache, out.cache_groups, next_position)
        full_mask, groups = attention_mask, out.cache_groups
        answers_miss = None
        if not use_cache and self.config.compression.cuts_cache:  # what decoding from the cut cache misses
            survivors = torch.zeros_like(image_mask).scatter(1, out.compressed_positions.clamp(min=0),
                                                             out.compressed_attention_mask)
            answers_miss = image_mask & ~survivors
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = out.logits[:, -1]
        for step in range(max_new_tokens):
            next_token = self._pick(logits, do_sample, temperature, top_p, generator)
            next_token = next_token.masked_fill(finished, pad_token_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= torch.isin(next_token, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            ones = torch.ones_like(full_mask[:, :1])
            full_mask = torch.cat([full_mask, ones], dim=1)
            if fast:
                logits = static.decode(next_token[:, None])
            elif use_cache:
                groups = [(first, torch.cat([mask, ones], dim=1)) for first, mask in groups]
                logits = self._decode_step(next_token[:, None], groups, next_position, cache)
                next_position = next_position + 1
            else:
                image_mask = tokens == self.llava.config.image_token_id
                logits = self._forward(tokens, full_mask, image_mask, queries, pixel_values, None,
                                       position_ids=None, image_features=image_features, past_key_values=None,
                                       logits_to_keep=1, answers_miss=None if answers_miss is None else F.pad(
                                           answers_miss, (0, tokens.shape[1] - answers_miss.shape[1]))).logits[:, -1]
        return tokens

    def _decode_step(self, token_ids: torch.Tensor, groups: list[tuple[int, torch.Tensor]],
                     position_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One cached step: each group of layers (the prefill's cache_groups: layers < K on the
        full prefix, the rest on the compressed one, or more groups after further drops) attends
        over its own 2D mask, sized by its own cache layers."""
        parts = self.decoder
        hidden = parts.embed_tokens(token_ids)
        position_embeddings = parts.rotary_emb(hidden, position_ids)
        firsts = [first for first, _ in groups]
        masks = [create_causal_mask(config=parts.config, inputs_embeds=hidden, attention_mask=mask_2d,
                                    **{CACHE_ARG: cache}, position_ids=position_ids, layer_idx=first)
                 for first, mask_2d in groups]
        for i, layer in enumerate(parts.layers):
            group = bisect.bisect_right(firsts, i) - 1
            hidden = layer(hidden, attention_mask=masks[group], position_embeddings=position_embeddings,
                           **{CACHE_ARG: cache}, use_cache=True)
        return parts.lm_head(parts.norm(hidden[:, -1]))

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = (logits.float() / temperature).softmax(-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
