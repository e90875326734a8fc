"""Fast generation (pipeline/model/static_generation.py) on the tiny LLaVA: the eager path's tokens
in every mode, with padding, mixed prompt lengths and reuse of the static cache; what a CUDA
graph capture would refuse, checked on CPU; the bad inputs. DIVICO_TEST_DEVICE=cuda runs them
on a GPU, where the functions are captured and replayed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_helpers import load_llava, prompts_batch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.model.compressed_llava import CompressedLlava
from pipeline.model.settings import MODES, DiViCoConfig
from pipeline.model.static_generation import BUCKET, StaticGeneration


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llava(request, tiny_llava_dir):
    return load_llava(tiny_llava_dir, request.param)


def both_paths(wrapper: CompressedLlava, batch, **options) -> tuple[torch.Tensor, torch.Tensor]:
    eager = wrapper.generate(**batch, max_new_tokens=6, eos_token_id=[], **options)
    return eager, wrapper.generate(**batch, max_new_tokens=6, eos_token_id=[], fast=True, **options)


@pytest.mark.parametrize("mode", MODES)
def test_fast_tokens_are_the_eager_tokens(llava, processor, mode):
    """Padding and mixed prompt lengths (with and without an image), then a second batch of other
    lengths through the same static cache and graphs, then a text-only batch (no cut)."""
    wrapper = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))
    for images in ([True, False, True], [False, True, True], [False, False, False]):
        eager, fast = both_paths(wrapper, prompts_batch(processor, images))
        assert torch.equal(eager, fast), images
    alone = prompts_batch(processor, [True])
    assert torch.equal(*both_paths(wrapper, alone))


def test_fast_tokens_through_lora_adapters(tiny_llava_dir, processor):
    """A model under PEFT LoRA adapters, as an evaluation mid-training sees it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)")
    wrapper = CompressedLlava(get_peft_model(load_llava(tiny_llava_dir), config),
                              DiViCoConfig(mode="divico", tau=1 / 9)).eval()
    assert torch.equal(*both_paths(wrapper, prompts_batch(processor, [True, False, True])))


def test_fast_sampling_draws_the_eager_tokens(llava, processor):
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9))
    batch = prompts_batch(processor, [True, False, True])
    eager = wrapper.generate(**batch, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=2.0,
                             generator=torch.Generator(batch["input_ids"].device).manual_seed(3))
    fast = wrapper.generate(**batch, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=2.0,
                            generator=torch.Generator(batch["input_ids"].device).manual_seed(3), fast=True)
    assert torch.equal(eager, fast)


def test_the_static_cache_is_kept_while_it_fits(llava, processor):
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="divico", tau=1 / 9))
    batch = prompts_batch(processor, [True, False, True])
    wrapper.generate(**batch, max_new_tokens=4, fast=True)
    static = wrapper._static
    assert static.capacity % 256 == 0 and static.capacity >= batch["input_ids"].shape[1] + 4
    assert all(bucketed % BUCKET == 0 for _, bucketed in static.tails)
    wrapper.generate(**prompts_batch(processor, [False, True, True]), max_new_tokens=4, fast=True)
    assert wrapper._static is static
    wrapper.generate(**batch, max_new_tokens=static.capacity, fast=True)  # no room: a larger one
    assert wrapper._static is not static and wrapper._static.capacity > static.capacity
    wrapper.generate(**prompts_batch(processor, [True]), max_new_tokens=4, fast=True)  # another batch size
    assert wrapper._static.batch_size == 1


class HostSyncs(TorchDispatchMode):
    """The operators run inside that make the host wait for the device's values: a scalar read,
    or an output whose size depends on the data. A CUDA graph capture refuses them."""

    WAITING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.repeat_interleave.Tensor,
               torch.ops.aten.unique_dim.default, torch.ops.aten._unique2.default}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WAITING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_host_sync_check_sees_a_scalar_read():
    with HostSyncs() as syncs:
        int(torch.ones(3).sum())
        torch.arange(4).nonzero()
    with torch.inference_mode(), HostSyncs() as inference_syncs:
        int(torch.ones(3).sum())
    assert syncs.seen == ["aten._local_scalar_dense.default", "aten.nonzero.default"]
    assert inference_syncs.seen == ["aten.item.default"]


@pytest.mark.parametrize("mode", ["none", "divico", "pdrop", "mustdrop", "visionzip"])
def test_replayed_functions_never_wait_on_the_device(llava, processor, mode):
    """Each function fast generation replays (every tail bucket, every decode step) runs without a
    host synchronisation, so a CUDA graph can capture it."""
    wrapper = CompressedLlava(llava, DiViCoConfig(mode=mode, tau=1 / 9))
    wrapper.generate(**prompts_batch(processor, [True, False, True]), max_new_tokens=3, fast=True)
    static = wrapper._static
    replayed = [replay for replay, _ in static.tails.values()] + list(static.steps.values())
    assert len(replayed) >= 2
    for replay in replayed:
        with torch.inference_mode():
            for layer in static.cache.layers:  # room for another run
                layer.cumulative_length.zero_()
            with HostSyncs() as syncs:
                replay.fn()
        assert syncs.seen == []


def test_fast_generation_refuses_what_it_cannot_do(llava, processor):
    wrapper = CompressedLlava(llava, DiViCoConfig(mode="fastv"))
    batch = prompts_batch(processor, [True])
    with pytest.raises(ValueError, match="use_cache=False"):
        wrapper.generate(**batch, max_new_tokens=2, fast=True, use_cache=False)
    parts = wrapper.decoder
    config = type(parts.config).from_dict(parts.config.to_dict())
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        StaticGeneration(dataclasses.replace(parts, config=config), batch_size=1, capacity=256)
