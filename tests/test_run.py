"""`divico run` (the embedded default) at a toy size: every stage runs, the summary prints, and a
rerun skips what is complete."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from train_helpers import run

pytestmark = pytest.mark.slow


def test_divico_run_trains_every_stage_evaluates_and_skips_them_on_rerun(tmp_path):
    root = tmp_path / "demo"
    args = ["run", "--root", str(root), "--train-samples", "48", "--finetune-samples", "16",
            "--heldout-samples", "16", "--taus", "0.111"]
    first = run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("base", "divico-tau111"):
        assert (root / stage / "model" / "config.json").is_file()
        assert (root / "tensorboard" / stage).is_dir()
    assert json.loads((root / "divico-tau111" / "model" / "divico.json").read_text())["config"]["tau"] == 0.111
    assert not (root / "base" / "model" / "adapter_config.json").exists()  # the base stage trains in full
    # The base stage trains the random tiny CLIP tower too (tiny_base.yaml); the DiViCo stages keep it frozen.
    towers = {name: {k: v for k, v in load_file(root / name / "model.safetensors").items() if "vision_tower" in k}
              for name in ("tiny_llava", "base/model", "divico-tau111/model")}
    assert towers["tiny_llava"] and towers["tiny_llava"].keys() == towers["base/model"].keys()
    assert any(not towers["tiny_llava"][k].equal(towers["base/model"][k]) for k in towers["tiny_llava"])
    assert all(towers["base/model"][k].equal(towers["divico-tau111/model"][k]) for k in towers["base/model"])
    for name in ("base", "fastv-tau111", "divico-tau111"):
        result = json.loads((root / "eval" / f"{name}.json").read_text())
        assert result["samples"] == 16 and 0 <= result["accuracy"] <= 1
    assert json.loads((root / "eval" / "divico-tau111.json").read_text())["visual_tokens_kept"] == 11
    for column in ("accuracy", "chance", "divico-tau111", "fastv-tau111", "tensorboard --logdir"):
        assert column in first.stdout

    again = run(args)
    assert again.returncode == 0
    assert "stage base: complete, skipped" in again.stderr
    assert "stage divico-tau111: complete, skipped" in again.stderr
    assert "Loading weights" not in again.stderr.split("complete, skipped")[0]  # nothing retrained
