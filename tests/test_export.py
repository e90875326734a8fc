"""`divico export`: a checkpoint becomes a plain Hugging Face folder that reloads and generates."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from train_helpers import run, train_args

from pipeline.contract import CHECKSUMS_FILE, EXIT_BAD_INPUT, EXIT_FAILURE, TRAINABLES_FILE
from pipeline.train.checkpoint import latest_checkpoint, load_trainables

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_llava_dir, make_shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    result = run(train_args(tiny_llava_dir, make_shard_dir(32, 1), out, "train.max_steps=3", "optim.lr=5e-3"))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_export_reloads_with_from_pretrained_matches_the_checkpoint_and_generates(trained, tiny_llava_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pipeline.train.config import load_config
    from pipeline.model.compressed_llava import CompressedLlava

    folder = tmp_path / "exported"
    result = run(["export", str(trained), "--out", str(folder), "--dtype", "fp32"])
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("config.json", "model.safetensors", "divico.json", "divico.safetensors", "tokenizer.json",
                 "train_config.yaml"):
        assert (folder / name).is_file(), name

    exported = CompressedLlava.from_saved(LlavaForConditionalGeneration.from_pretrained(folder), folder).eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())  # merged, self-contained

    # The same model as training left it: base + adapter + trainables, unmerged.
    ckpt = latest_checkpoint(trained)
    cfg = load_config([ckpt / "config.yaml"])
    peft = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), ckpt / "adapter")
    reference = CompressedLlava(peft, cfg.divico)
    load_trainables(reference, ckpt)
    reference.eval()

    processor = AutoProcessor.from_pretrained(folder)

    prompt = "USER: <image>\nWhat color is the shape in the top left? ASSISTANT:"
    inputs = processor(images=Image.new("RGB", (140, 140), (220, 30, 30)), text=prompt, return_tensors="pt")
    with torch.no_grad():
        got = exported(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
        want = reference(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    for module in ("model.language_model.layers.0.self_attn.q_proj", "model.multi_modal_projector.linear_1"):
        trained_weight = exported.llava.get_submodule(module).weight
        assert not torch.allclose(base.get_submodule(module).weight, trained_weight), module  # LoRA merged in

    tokens = exported.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=4)
    assert tokens.shape[1] > inputs["input_ids"].shape[1]


def test_export_refuses_an_existing_folder_and_a_dir_without_checkpoints(trained, tmp_path):
    (tmp_path / "taken").mkdir()
    result = run(["export", str(trained), "--out", str(tmp_path / "taken")])
    assert result.returncode == 2 and "exists" in result.stderr
    result = run(["export", str(tmp_path), "--out", str(tmp_path / "new")])
    assert result.returncode == 2 and "neither a checkpoint nor a run directory" in result.stderr
    result = run(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")])
    assert result.returncode == 2 and f"{tmp_path / 'nowhere'}: no such directory" in result.stderr


def test_export_of_a_damaged_checkpoint_exits_1_and_of_a_missing_base_model_2_naming_it(
        trained, tiny_llava_dir, tmp_path):
    ckpt, out = tmp_path / "step-00000003", tmp_path / "exported"
    shutil.copytree(latest_checkpoint(trained), ckpt)
    weights = (ckpt / TRAINABLES_FILE).read_bytes()
    (ckpt / TRAINABLES_FILE).write_bytes(weights[:len(weights) // 2])
    result = run(["export", str(ckpt), "--out", str(out)])
    assert result.returncode == EXIT_FAILURE
    assert f"{ckpt}: DAMAGED: {TRAINABLES_FILE}: {len(weights) // 2} bytes, recorded {len(weights)}" in result.stderr
    assert "Traceback" not in result.stderr

    (ckpt / CHECKSUMS_FILE).unlink()  # as an older version wrote it: the unreadable file is still named
    result = run(["export", str(ckpt), "--out", str(out)])
    assert result.returncode == EXIT_FAILURE
    assert f"{ckpt / TRAINABLES_FILE}: " in result.stderr and "Traceback" not in result.stderr

    (ckpt / TRAINABLES_FILE).write_bytes(weights)
    config = (ckpt / "config.yaml").read_text()
    assert str(tiny_llava_dir) in config
    (ckpt / "config.yaml").write_text(config.replace(str(tiny_llava_dir), str(tmp_path / "moved")))
    result = run(["export", str(ckpt), "--out", str(out)])
    assert result.returncode == EXIT_BAD_INPUT
    assert f"model.base={tmp_path / 'moved'} (the base model {ckpt}/config.yaml names): no such folder" in result.stderr
    assert not out.exists()
