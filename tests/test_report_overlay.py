"""`divico report overlay`: the kept visual tokens, found from the model's own forward and drawn
on the square the vision tower sees."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from cli_helpers import run_divico

from pipeline.data.settings import CollatorSettings
from pipeline.eval.data import one_question
from pipeline.eval.main import load_collator, load_model
from pipeline.model.divico import kept_count
from pipeline.report.overlay import DISPLAY_SIDE, draw, kept_visual_tokens


def test_kept_tokens_are_the_models_and_the_drawing_darkens_the_rest(tiny_llava_dir, tmp_path, capsys):
    image = Image.effect_noise((90, 60), 80).convert("RGB")
    model = load_model(tiny_llava_dir, mode="fastv", tau=0.2, device="cpu")
    collator = load_collator(tiny_llava_dir, CollatorSettings())
    samples = [one_question(image, "What is shown?"), one_question(image.rotate(90), "Where is it?")]
    kept = kept_visual_tokens(model, collator, samples)
    visual = collator.num_visual_tokens
    assert kept.shape == (2, visual) and kept.sum(1).tolist() == [kept_count(visual, 0.2)] * 2
    assert not model.training
    picture = np.asarray(draw(image, kept[0], collator)).astype(float)
    plain = np.asarray(draw(image, kept[0].new_ones(visual), collator)).astype(float)
    assert picture.shape == (DISPLAY_SIDE, DISPLAY_SIDE, 3)
    darker = (picture.sum(2) < plain.sum(2) - 30).mean()
    assert darker == pytest.approx(1 - kept[0].float().mean().item(), abs=0.05)  # the dropped cells' share

    image.save(tmp_path / "image.png")
    args = ["report", "overlay", "--model", str(tiny_llava_dir), "--image", str(tmp_path / "image.png"),
            "--question", "What is shown?", "--mode", "fastv", "--tau", "0.2", "--device", "cpu"]
    assert run_divico([*args, "--out", str(tmp_path / "kept.png")]) == 0
    assert f"{kept_count(visual, 0.2)} of {visual} visual tokens kept" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "kept.png")), picture.astype(np.uint8))


def test_a_model_that_keeps_everything_or_a_bad_image_exit_2(tiny_llava_dir, tmp_path, caplog):
    base = ["report", "overlay", "--model", str(tiny_llava_dir), "--question", "q", "--out", str(tmp_path / "o.png")]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert run_divico([*base, "--image", str(tmp_path / "bad.png")]) == 2 and "does not compress" in caplog.text
    assert run_divico([*base, "--image", str(tmp_path / "bad.png"), "--mode", "fastv", "--tau", "0.2"]) == 2
    assert "bad.png: not a readable image" in caplog.text
