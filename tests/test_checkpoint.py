"""Checkpoint bookkeeping that needs no engine: which directories count, RNG round trips."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from pipeline.train.checkpoint import (
    TrainerState,
    complete_checkpoints,
    latest_checkpoint,
    read_state,
    rng_state,
    set_rng_state,
)


def make(root, name, step):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps(
        {"step": step, "samples_per_rank": step * 4, "world_size": 2, "total_steps": 100}))
    return path


def test_only_complete_checkpoints_count_newest_last(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    make(tmp_path, "step-00000010", 10)
    make(tmp_path, "step-00000002", 2)
    make(tmp_path, "step-00000020.tmp", 20)  # a save that crashed: never counted
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    assert read_state(latest_checkpoint(tmp_path)) == TrainerState(step=10, samples_per_rank=40, world_size=2,
                                                                   total_steps=100)


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))  # what the checkpoint file holds
    expected = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(saved)
    got = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
