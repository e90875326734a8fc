"""Fast generation at small batch sizes: a static KV cache, length buckets and CUDA graphs.

At batch 1 the eager forward of a 7B decoder is bound by the host launching its kernels, so
dropping visual tokens saves little time (README, "Efficiency"). A `StaticGeneration` serves
one CompressedLlava at one batch size, replaying everything after the last change of the
sequence's length:

  prefill  eager up to the tail (`CompressedLlava.layout`): embeddings, images, the layers
           before the cut, selection, the gap encoder, later stages. The tail, the layers whose
           sequence no longer changes (from layer K for DiViCo, from 0 for `none` and the modes
           acting in the vision tower, from the last stage for PyramidDrop and MustDrop), runs
           on the sequence left-padded to a multiple of BUCKET: one graph per bucket.
  decode   one step (embedding, every layer over its static cache, norm, lm_head): one graph.

Every layer caches into a transformers StaticLayer of `capacity` slots; the layers before the
tail take over what the prefill left in their DynamicLayers. Each group of layers that saw one
sequence (the prefill's cache_groups) reads its cache through one slot mask (B, capacity), the
slots that hold its tokens; the tail's padding slots stay masked like the batch's padding.

On CUDA each function is captured into a CUDA graph at its first call and replayed after; on
another device the same functions run as they are. The CPU tests check what a CPU can: the
tokens are the eager path's, and nothing inside a step waits on the device (which capture
refuses). Attention: sdpa or eager, whose masks are built here.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from pipeline.model.decoder import CACHE_ARG, DecoderParts

ATTENTION = ("sdpa", "eager")  # the implementations whose masks this file builds
BUCKET = 32  # tail lengths are rounded up to a multiple of this: one graph per bucket
CAPACITY_STEP = 256  # cache capacities are rounded up to a multiple of this, so a few serve every prompt


def round_up(length: int, step: int) -> int:
    return -(-length // step) * step


class Replayed:
    """`fn()`, which reads and writes only tensors that outlive it: on CUDA captured into a CUDA
    graph at the first call and replayed after; elsewhere run as it is. `state`: the tensors a
    run changes, which the warm-up run before capture must leave as it found them. `pool`: the
    memory pool of the graph's intermediates, shared with the other graphs of its generation."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device, state: Sequence[torch.Tensor] = (),
                 pool: tuple[int, int] | None = None):
        self.fn, self.device, self.state, self.pool = fn, device, list(state), pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.fn()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.output

    def _capture(self) -> None:
        saved = [tensor.clone() for tensor in self.state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # library handles and workspaces are set up outside the graph
            self.fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        for tensor, value in zip(self.state, saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = self.fn()


@dataclass
class TailInputs:
    """The static inputs of one bucket's tail."""

    hidden: torch.Tensor  # (B, n, d)
    cos: torch.Tensor  # (B, n, head_dim)
    sin: torch.Tensor
    mask: torch.Tensor  # (B, 1, n, capacity), in the attention implementation's form


class StaticGeneration:
    """The static cache, slot masks and replayed functions for a decoder at `batch_size` prompts
    of up to `capacity` tokens with their answers."""

    def __init__(self, parts: DecoderParts, batch_size: int, capacity: int) -> None:
        self.implementation = parts.config._attn_implementation
        if self.implementation not in ATTENTION:
            raise ValueError(f"fast generation builds its masks for {' or '.join(ATTENTION)} attention; "
                             f"the model uses {self.implementation!r}")
        self.parts, self.batch_size, self.capacity = parts, batch_size, capacity
        weight = parts.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        attention = parts.layers[0].self_attn
        empty = torch.empty(batch_size, attention.k_proj.out_features // attention.head_dim, 0, attention.head_dim,
                            device=self.device, dtype=self.dtype)
        self.cache = Cache(layers=[StaticLayer(capacity) for _ in parts.layers])
        for layer in self.cache.layers:  # allocated now, never inside a capture
            layer.lazy_initialization(empty, empty)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.slots: dict[int, torch.Tensor] = {}  # a group's first layer -> (B, capacity) bool
        self.tails: dict[tuple[int, int], tuple[Replayed, TailInputs]] = {}
        self.steps: dict[tuple[int, ...], Replayed] = {}
        self.tail_start = self.tail_padding = 0
        self.firsts: tuple[int, ...] = ()
        # One pool for every graph here, so a bucket's intermediates reuse another's memory. Safe
        # because each output is read before any graph of this generation replays again (the
        # state that persists, the cache and the inputs, lives outside the pool).
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    @classmethod
    def serving(cls, current: StaticGeneration | None, parts: DecoderParts, batch_size: int, prompt_length: int,
                max_new_tokens: int) -> StaticGeneration:
        """`current` if it serves such a generation (its graphs stay captured), else a new one
        with room to spare."""
        weight = parts.embed_tokens.weight
        needed = round_up(prompt_length, BUCKET) + max_new_tokens
        if (current is not None and batch_size == current.batch_size and needed <= current.capacity
                and parts.layers is current.parts.layers
                and parts.config._attn_implementation == current.implementation
                and (weight.device, weight.dtype) == (current.device, current.dtype)):
            return current
        return cls(parts, batch_size, round_up(needed, CAPACITY_STEP))

    # ------------------------------------------------------------------ prefill
    def prefill_cache(self, tail_start: int) -> Cache:
        """The cache a prefill fills: DynamicLayers before the tail, the static layers from it."""
        self.tail_start = tail_start
        return Cache(layers=[DynamicLayer() for _ in range(tail_start)] + self.cache.layers[tail_start:])

    def tail(self, hidden: torch.Tensor, first: int, mask_2d: torch.Tensor,
             position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Layers `first`.. over `hidden` (B, n, d) left-padded to its bucket (a TailRunner)."""
        length = mask_2d.shape[1]
        bucketed = round_up(length, BUCKET)
        if (first, bucketed) not in self.tails:
            self.tails[first, bucketed] = self._tail_function(first, bucketed)
        replayed, inputs = self.tails[first, bucketed]
        pad = bucketed - length
        for buffer, value in ((inputs.hidden, hidden), *zip((inputs.cos, inputs.sin), position_embeddings)):
            buffer[:, :pad].zero_()
            buffer[:, pad:].copy_(value)
        slots = torch.zeros(self.batch_size, self.capacity, dtype=torch.bool, device=self.device)
        slots[:, pad:bucketed] = mask_2d
        rows = torch.arange(bucketed, device=self.device)[:, None]
        columns = torch.arange(self.capacity, device=self.device)[None, :]
        # Causal over the filled slots; each row also sees itself, so a padding row stays finite.
        allowed = slots[:, None, None, :] & (columns <= rows) | (columns == rows)
        inputs.mask.copy_(self._attention_form(allowed))
        for layer in self.cache.layers[first:]:
            layer.cumulative_length.zero_()
        self.tail_padding = pad
        return replayed()

    def _tail_function(self, first: int, bucketed: int) -> tuple[Replayed, TailInputs]:
        attention = self.parts.layers[0].self_attn
        hidden = torch.zeros(self.batch_size, bucketed, self.parts.config.hidden_size, device=self.device,
                             dtype=self.dtype)
        rotary = torch.zeros(self.batch_size, bucketed, attention.head_dim, device=self.device, dtype=self.dtype)
        mask = self._attention_form(torch.zeros(self.batch_size, 1, bucketed, self.capacity, dtype=torch.bool,
                                                device=self.device))
        inputs = TailInputs(hidden, rotary, rotary.clone(), mask)

        def run() -> torch.Tensor:
            hidden = inputs.hidden
            for layer in self.parts.layers[first:]:
                hidden = layer(hidden, attention_mask=inputs.mask, position_embeddings=(inputs.cos, inputs.sin),
                               **{CACHE_ARG: self.cache}, use_cache=True)
            return hidden

        state = [layer.cumulative_length for layer in self.cache.layers[first:]]
        return Replayed(run, self.device, state, self.pool), inputs

    # ------------------------------------------------------------------ decode
    def start_decoding(self, cache: Cache, groups: list[tuple[int, torch.Tensor]],
                       next_position: torch.Tensor) -> None:
        """After a prefill into `prefill_cache()`: the layers before the tail copied into the
        static cache, each group's slot mask set (the last group sits behind the tail's padding),
        and each sample's next position (B, 1)."""
        firsts = tuple(first for first, _ in groups)
        for index, (first, mask) in enumerate(groups):
            pad = self.tail_padding if index == len(groups) - 1 else 0
            slots = self.slots.setdefault(first, torch.zeros(self.batch_size, self.capacity, dtype=torch.bool,
                                                             device=self.device))
            slots.zero_()
            slots[:, pad:pad + mask.shape[1]] = mask
        for index in range(self.tail_start):
            held, static = cache.layers[index], self.cache.layers[index]
            pad = self.tail_padding if index >= firsts[-1] else 0
            length = held.keys.shape[2]
            static.keys[:, :, pad:pad + length] = held.keys
            static.values[:, :, pad:pad + length] = held.values
            static.cumulative_length.fill_(pad + length)
        self.position.copy_(next_position)
        self.firsts = firsts

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one step on `token` (B, 1), after `start_decoding`."""
        self.token.copy_(token)
        if self.firsts not in self.steps:
            state = [self.position, *(self.slots[first] for first in self.firsts),
                     *(layer.cumulative_length for layer in self.cache.layers)]
            self.steps[self.firsts] = Replayed(partial(self._step, self.firsts), self.device, state, self.pool)
        return self.steps[self.firsts]()

    def _step(self, firsts: tuple[int, ...]) -> torch.Tensor:
        parts, layers = self.parts, self.cache.layers
        masks = []
        for first in firsts:  # the slot this step writes joins its group's mask
            slots = self.slots[first]
            slots.index_fill_(1, layers[first].cumulative_length.view(1), True)
            masks.append(self._attention_form(slots[:, None, None, :]))
        hidden = parts.embed_tokens(self.token)
        position_embeddings = parts.rotary_emb(hidden, self.position)
        for index, layer in enumerate(parts.layers):
            hidden = layer(hidden, attention_mask=masks[bisect.bisect_right(firsts, index) - 1],
                           position_embeddings=position_embeddings, **{CACHE_ARG: self.cache}, use_cache=True)
        self.position.add_(1)
        return parts.lm_head(parts.norm(hidden[:, -1]))

    def _attention_form(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the attention implementation takes it: as is (sdpa), or additive."""
        if self.implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)
