"""The one builder of LLaVA geometries, and `divico model tiny`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipeline.cli import main as divico
from pipeline.contract import EXIT_BAD_INPUT, IMAGE_TOKEN
from pipeline.model.tiny import LLAVA_IMAGE_TOKEN_ID, LLAVA_VOCAB, llava_7b_config, llava_config

WORD = "quokkazebra"  # in no corpus the tokenizer knows: only --fit-text can teach it


def test_llava_7b_config_keeps_the_7b_decoder_shape() -> None:
    config = llava_7b_config(512, layers=6)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (512, 6)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 4)
    assert (text.head_dim, text.intermediate_size, text.vocab_size) == (128, 1376, LLAVA_VOCAB)
    assert config.image_token_id == LLAVA_IMAGE_TOKEN_ID
    assert (vision.image_size // vision.patch_size) ** 2 == 576
    full = llava_7b_config(4096).text_config  # the real 7B's numbers
    assert (full.num_attention_heads, full.intermediate_size, full.num_hidden_layers) == (32, 11008, 32)
    with pytest.raises(ValueError, match="width 192"):
        llava_7b_config(192)


def test_llava_config_head_dim_is_width_over_heads() -> None:
    config = llava_config(width=96, layers=1, heads=6, kv_heads=2, intermediate=64, vocab=50, image_token_id=49,
                          image_size=28, vision_width=32, vision_heads=2)
    assert (config.text_config.head_dim, config.vision_config.hidden_size // 2) == (16, 16)
    model = LlavaForConditionalGeneration(config)
    assert model.model.language_model.layers[0].self_attn.k_proj.out_features == 2 * 16
    with pytest.raises(ValueError, match="width 96 / 5 heads"):
        llava_config(width=96, layers=1, heads=5, kv_heads=1, intermediate=64, vocab=50, image_token_id=49,
                     image_size=28)
    with pytest.raises(ValueError, match="image_token_id 50"):
        llava_config(width=96, layers=1, heads=6, kv_heads=2, intermediate=64, vocab=50, image_token_id=50,
                     image_size=28)


def test_model_tiny_command(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit = tmp_path / "data.json"
    fit.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": "Say it twice."},
                                                                {"from": "gpt", "value": f"{WORD} {WORD}"}]}
                               for i in range(50)]))
    out = tmp_path / "tiny"
    with pytest.raises(SystemExit) as exit_:
        divico(["model", "tiny", "--out", str(out), "--fit-text", str(fit)])
    assert exit_.value.code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "tiny"]  # no tiny.tmp left
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert len(processor.tokenizer.tokenize(f" {WORD}")) == 1  # the merges learned the chats' words

    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.INFO, logger="pipeline.model.tiny"), pytest.raises(SystemExit) as exit_:
        divico(["model", "tiny", "--out", str(out)])
    assert exit_.value.code == 0
    assert "already holds a model, skipped" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


def test_model_tiny_without_fit_text_does_not_know_the_word(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        divico(["model", "tiny", "--out", str(tmp_path / "tiny")])
    assert exit_.value.code == 0
    assert len(AutoProcessor.from_pretrained(tmp_path / "tiny").tokenizer.tokenize(f" {WORD}")) > 1


def test_model_tiny_missing_fit_text_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, fit = tmp_path / "tiny", tmp_path / "absent.json"
    with pytest.raises(SystemExit) as exit_:
        divico(["model", "tiny", "--out", str(out), "--fit-text", str(fit)])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert f"error: --fit-text {fit}: no such file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_tiny_keeps_a_folder_of_other_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        divico(["model", "tiny", "--out", str(out)])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert f"error: --out {out}: exists and holds no model" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"] and [p.name for p in out.iterdir()] == ["notes.txt"]
