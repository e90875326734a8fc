"""`divico bench model` and `divico bench train` at their smallest sizes: every figure is reported,
finite and positive, and the counted FLOPs agree with the paper's formula; both generation paths
(--fast) give the same tokens."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.cli import main as divico
from pipeline.contract import EXIT_BAD_INPUT, TAUS
from pipeline.model.divico import kept_count
from pipeline.model.flops import DecoderGeometry, encoder_flops
from pipeline.model.settings import DiViCoConfig


def run_json(capsys: pytest.CaptureFixture, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_:
        divico(args)
    assert exit_.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_bench_model_reports_every_figure(capsys: pytest.CaptureFixture) -> None:
    figures = run_json(capsys, ["bench", "model", "--json", "--width", "128", "--layers", "8",
                                "--repeats", "1", "--warmup", "0", "--fast"])
    setup, runs = figures["setup"], figures["runs"]
    assert (setup["width"], setup["layers"], setup["layer_k"], setup["visual_tokens"]) == (128, 8, 2, 576)
    modes = ("fastv", "divico", "moe", "dart", "divico_dart", "pdrop")
    assert [(r["mode"], r["tau"]) for r in runs] == [("none", 1.0)] + [(mode, tau) for tau in TAUS for mode in modes]
    for run in runs[1:]:  # PyramidDrop's second stage (layer L/2 = 4) keeps tau^2 of the 576
        later = [kept_count(576, run["tau"] ** 2)] if run["mode"] == "pdrop" else []
        assert run["visual_kept"] == [576, kept_count(576, run["tau"]), *later], run
    measured = ("flops", "prefill_ms", "peak_mem_mib", "layer_floor_ratio", "flops_ratio", "time_ratio")
    for run in runs:
        for key in (*measured, "overhead_share", "theory_flops_ratio"):
            assert math.isfinite(run[key]), (run["mode"], run["tau"], key)
        assert all(run[key] > 0 for key in measured), run
    none, compressed = runs[0], runs[1:]
    assert (none["flops_ratio"], none["time_ratio"], none["overhead_share"]) == (1.0, 1.0, 0.0)
    for run in compressed:
        assert run["overhead_share"] > 0 and run["flops"] < none["flops"]
        assert run["flops_ratio"] == pytest.approx(run["flops"] / none["flops"])
        assert run["theory_flops_ratio"] < 1
        if run["mode"] == "moe":  # the single encoder's FLOPs, plus two more experts and the router
            divico = next(r for r in compressed if (r["mode"], r["tau"]) == ("divico", run["tau"]))
            kept = kept_count(576, run["tau"])
            geometry = DecoderGeometry(hidden=128, intermediate=344, layers=8, heads=1, kv_heads=1, vocab=1)
            extra = (encoder_flops(geometry, kept, DiViCoConfig(encoder="moe"))
                     - encoder_flops(geometry, kept, DiViCoConfig()))
            assert run["flops"] - divico["flops"] == extra > 0
            continue
        # counted FLOPs hold what the formula leaves out (scoring, the gap encoder, the last
        # position's logits), within the 1 point even at this small width
        assert abs(run["flops_ratio"] - run["theory_flops_ratio"]) < 0.01, run
    # The MoE stage's training compute against the three specialists, in tokens through the decoder.
    tokens = figures["training_tokens"]
    specialists, from_base = tokens["three specialists"], tokens["moe from base, log_uniform"]
    assert specialists == sum(2 * 676 + 6 * (100 + kept_count(576, tau)) for tau in TAUS)
    assert 0.3 < from_base / specialists < 0.4 < tokens["moe from base, all_centres"] / specialists
    assert tokens["moe warm-started (specialists + log_uniform)"] == pytest.approx(specialists + from_base)
    # --fast: generation on both paths, none and each mode at tau 11.1%, the same greedy tokens on CPU
    generation = figures["generation"]
    assert [(r["mode"], r["path"]) for r in generation] == [(mode, path) for mode in ("none", *modes)
                                                            for path in ("eager", "fast")]
    for row in generation:
        assert row["tau"] == (1.0 if row["mode"] == "none" else TAUS[1])
        assert row["same_tokens"] == 16 and 0 < row["prefill_ms"] < row["answer_ms"], row
        assert row["decode_tokens_per_s"] > 0 and row["prefill_ratio"] > 0
    assert [(r["prefill_ratio"], r["answer_ratio"]) for r in generation[:2]] == [(1.0, 1.0)] * 2
    for step in ("prefill", "answer"):
        assert generation[0][f"{step}_vs_eager_none"] == 1.0
        assert generation[1][f"{step}_vs_eager_none"] == generation[1][f"{step}_ms"] / generation[0][f"{step}_ms"]


def test_bench_train_reports_every_figure(capsys: pytest.CaptureFixture) -> None:
    figures = run_json(capsys, ["bench", "train", "--json", "--width", "128", "--layers", "3",
                                "--text-tokens", "16", "--steps", "1", "--device", "cpu"])
    assert figures["geometry"] == {"visual_tokens": 576, "text_tokens": 16, "layers": 3, "K": 2, "width": 128,
                                   "tau": pytest.approx(1 / 9), "batch_size": 1}
    assert (figures["device"], figures["dtype"]) == ("cpu", "float32")
    for mode in ("divico", "lora"):
        values = [figures[f"{name}_{mode}"] for name in ("tokens_per_s", "samples_per_s", "step_ms")]
        assert all(math.isfinite(v) and v > 0 for v in values), (mode, values)
        # tokens are the input sequence before compression: 576 visual + 16 text per sample
        assert figures[f"tokens_per_s_{mode}"] == pytest.approx(592 * figures[f"samples_per_s_{mode}"])
        assert figures[f"step_ms_{mode}"] == pytest.approx(1000 / figures[f"samples_per_s_{mode}"])
    assert figures["ratio"] == pytest.approx(figures["tokens_per_s_divico"] / figures["tokens_per_s_lora"])


@pytest.mark.parametrize("args,named", [
    (["model", "--width", "100"], "width 100"),
    (["train", "--width", "200"], "width 200"),
    (["train", "--width", "128", "--layers", "2"], "--layers 2"),
    (["train", "--width", "128", "--steps", "0"], "--steps 0"),
])
def test_bench_bad_size_is_exit_2(capsys: pytest.CaptureFixture, args: list[str], named: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        divico(["bench", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_BAD_INPUT
    assert [line for line in err.splitlines() if line.startswith("error:") and named in line], err
