"""`divico report efficiency` on the tiny LLaVA and on LLaVA-1.5-7B's geometry at a small width:
every figure present and the counted ones consistent with the analytic ones."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_divico

from pipeline.model.flops import compressed_length


def test_efficiency_report_of_a_model_folder(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_divico(["report", "efficiency", "--model", str(tiny_llava_dir), "--modes", "none", "fastv", "divico",
                       "--taus", "0.111", "--batch", "1", "2", "--repeats", "1", "--warmup", "0",
                       "--answer-tokens", "3", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / "efficiency.json").read_text()) == report
    assert (out / "efficiency.csv").read_text().count("\n") == 1 + len(report["rows"])
    assert "| batch | mode | tau | kept |" in (out / "efficiency.md").read_text()
    rows = {(r["batch"], r["mode"]): r for r in report["rows"]}
    assert sorted(rows) == [(1, "divico"), (1, "fastv"), (1, "none"), (2, "divico"), (2, "fastv"), (2, "none")]
    layers, tokens = report["setup"]["layers"], report["setup"]["tokens"]
    for (batch, mode), row in rows.items():
        assert abs(row["flops_gap"]) < 0.01  # the analytic count is what torch counts
        assert row["prefill_ms"] > 0 and row["answer_ms"] > 0 and row["peak_mem_mib"] > 0
        assert row["flops"] == pytest.approx(batch * rows[1, mode]["flops"])
        if mode != "none":  # the cache holds the full prompt below K, the compressed one from K on
            short = compressed_length(tokens, row["visual_tokens"], 0.111)
            k = row["layer"]
            assert row["kept"] == round(0.111 * row["visual_tokens"])
            assert row["kv_cache_mib_ratio"] == pytest.approx((k * tokens + (layers - k) * short) / (layers * tokens))
            assert row["flops_ratio"] < 1
    assert rows[2, "none"]["kv_cache_mib"] == pytest.approx(2 * rows[1, "none"]["kv_cache_mib"])


def test_efficiency_report_through_fast_generation(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_divico(["report", "efficiency", "--model", str(tiny_llava_dir), "--modes", "none", "divico",
                       "--taus", "0.111", "--batch", "1", "2", "--repeats", "1", "--warmup", "0",
                       "--answer-tokens", "3", "--fast", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["fast"] and ", fast generation." in (out / "efficiency.md").read_text()
    for row in report["rows"]:
        assert 0 < row["prefill_ms"] and 0 < row["answer_ms"] and abs(row["flops_gap"]) < 0.01, row


def test_efficiency_report_on_llava_7b_geometry(capsys):
    assert run_divico(["report", "efficiency", "--model", "llava-7b", "--width", "128", "--modes", "none", "moe",
                       "--taus", "0.0667", "--batch", "1", "--repeats", "1", "--warmup", "0",
                       "--answer-tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["setup"]["layers"] == 32 and report["setup"]["tokens"] == 40 + 576 + 60
    moe = next(r for r in report["rows"] if r["mode"] == "moe")
    assert moe["kept"] == 38 and abs(moe["flops_gap"]) < 0.01 and moe["flops_ratio"] < 0.2


def test_modes_before_the_decoder_run_with_the_tower(tiny_llava_dir, capsys, caplog):
    """--tower: every row runs the tower; the decoder's FLOPs still match the counted ones, and a
    mode acting before the decoder shortens every layer's cache."""
    args = ["report", "efficiency", "--model", str(tiny_llava_dir), "--modes", "none", "fastv", "fastervlm",
            "visionzip", "deco", "dart", "--taus", "0.111", "--batch", "2", "--repeats", "1", "--warmup", "0",
            "--answer-tokens", "2", "--json"]
    assert run_divico(args) == 2 and "act in the vision tower; add --tower" in caplog.text
    assert run_divico([*args, "--tower"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in report["rows"]}
    tokens = report["setup"]["tokens"]
    for mode in ("fastervlm", "visionzip", "deco"):
        row = rows[mode]
        assert abs(row["flops_gap"]) < 0.01, mode  # the [CLS] row and the merges are tiny beside the decoder
        assert row["kv_cache_mib_ratio"] == pytest.approx((tokens - 100 + row["kept"]) / tokens), mode
    assert rows["deco"]["kept"] == 9 and rows["fastervlm"]["kept"] == rows["dart"]["kept"] == 11
    assert abs(rows["dart"]["flops_gap"]) < 1e-9 and rows["fastervlm"]["kv_cache_mib_ratio"] < rows["fastv"]["kv_cache_mib_ratio"]


def test_mustdrop_reports_its_counts_and_its_cut_cache(tiny_llava_dir, capsys):
    """MustDrop's counts are measured cut by cut (the analytic FLOPs then match the counted
    ones); after the prefill every layer of the tiny 4-layer decoder holds the last filter's
    tokens (its first filter reads layer 0)."""
    assert run_divico(["report", "efficiency", "--model", str(tiny_llava_dir), "--modes", "none", "mustdrop",
                       "mustdrop_budget", "--taus", "0.111", "--batch", "2", "--repeats", "1", "--warmup", "0",
                       "--answer-tokens", "2", "--tower", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in report["rows"]}
    tokens = report["setup"]["tokens"]
    for mode in ("mustdrop", "mustdrop_budget"):
        row = rows[mode]
        assert abs(row["flops_gap"]) < 0.01, mode
        assert row["kept_last"] <= row["kept"] <= 100
        assert row["kv_cache_mib_ratio"] == pytest.approx((tokens - 100 + row["kept_last"]) / tokens), mode
    assert rows["mustdrop_budget"]["kept_last"] == 11


def test_bad_arguments_exit_2(tmp_path, caplog):
    assert run_divico(["report", "efficiency", "--model", str(tmp_path), "--repeats", "1"]) == 2
    assert "not a model folder (no config.json)" in caplog.text
    assert run_divico(["report", "efficiency", "--modes", "none", "fast"]) == 2 and "--modes none fast" in caplog.text
    assert run_divico(["report", "efficiency", "--taus", "1.5"]) == 2 and "each must be in (0, 1]" in caplog.text
