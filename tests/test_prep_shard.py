"""`divico prep shard` / `verify` end to end on synthetic data with the real file's defects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from data_prep import checks
from data_prep.shard import DECODE_CHUNK, ShardConfig, run_shard, ustar_header
from data_prep.synth import SynthConfig, generate
from data_prep.verify import verify
from pipeline.cli import main as divico
from pipeline.contract import DATA_FILE, EXIT_BAD_INPUT, EXIT_FAILURE
from pipeline.data.shard_format import MANIFEST_FILE, REJECTED_FILE


@pytest.fixture(scope="module")
def defect_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out=out, num_samples=400, seed=3, defects=0.25, width=96, height=96))
    return out


@pytest.fixture(scope="module")
def reference(defect_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 1-worker run: what every other run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    run_shard(_config(defect_set, out, workers=1))
    return out


def _config(dataset: Path, out: Path, **kw) -> ShardConfig:
    return ShardConfig(data=dataset / DATA_FILE, image_root=dataset / "images", out=out,
                       shard_size=kw.pop("shard_size", 37), seed=kw.pop("seed", 11), progress=False, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _shard_samples(folder: Path) -> list[list[dict]]:
    shards = []
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            shards.append([json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")])
    return shards


def test_accounting_identity(defect_set: Path, reference: Path) -> None:
    entries = json.loads((defect_set / DATA_FILE).read_text())
    manifest = json.loads((reference / MANIFEST_FILE).read_text())
    rejected = [json.loads(line) for line in (reference / REJECTED_FILE).read_text().splitlines()]
    shards = _shard_samples(reference)
    written = [s["index"] for shard in shards for s in shard]

    assert manifest["entries"] == len(entries) == manifest["written"] + manifest["rejected"]
    # every entry in exactly one place
    assert sorted(written + [r["index"] for r in rejected]) == list(range(len(entries)))
    assert len(written) == manifest["written"] and len(rejected) == manifest["rejected"]
    assert manifest["rejected_by_reason"] == dict(Counter(r["reason"] for r in rejected))
    assert set(manifest["rejected_by_reason"]) == set(checks.REASONS)  # 25% defects hit them all
    assert sum(s["written"] + s["rejected"] for s in manifest["sources"].values()) == len(entries)
    for r in rejected:
        assert r["id"] == checks.entry_id(entries[r["index"]]) and r["detail"]

    # balanced shards at the target size; every source dealt evenly, so every shard mixes all
    # sources (each has at least one sample per shard here), in shuffled order
    sizes = [s["samples"] for s in manifest["shards"]]
    assert sizes == [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 37
    assert len(sizes) == -(-manifest["written"] // 37)
    sources = {source for source, n in manifest["sources"].items() if n["written"]}
    assert len(sources) == 6 and all({s["source"] for s in shard} == sources for shard in shards)
    for source in sources:
        per_shard = [sum(s["source"] == source for s in shard) for shard in shards]
        assert max(per_shard) - min(per_shard) <= 1, (source, per_shard)
    assert written != sorted(written)

    # samples carry their entry; GIF/PNG-under-.jpg are stored as png, text-only without image
    with tarfile.open(reference / "shard-000000.tar") as tar:
        names = tar.getnames()
        for member in tar:
            assert "." not in member.name.split(".")[0]
            assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "")
    for shard in shards:
        for sample in shard:
            entry = entries[sample["index"]]
            assert sample["conversations"] == entry["conversations"] and sample["id"] == entry["id"]
            assert sample["image"] == entry.get("image")
    exts = Counter(n.rsplit(".", 1)[1] for p in sorted(reference.glob("*.tar"))
                   for n in tarfile.open(p).getnames())
    assert exts["png"] > 0 and exts["jpg"] > 0 and set(exts) == {"json", "jpg", "png"}
    assert len(names) == len(set(names))
    assert verify(reference) == []


@pytest.mark.slow
def test_same_bytes_for_any_worker_count(defect_set: Path, reference: Path, tmp_path: Path) -> None:
    run_shard(_config(defect_set, tmp_path / "two", workers=2))
    assert _files(tmp_path / "two") == _files(reference)
    run_shard(_config(defect_set, tmp_path / "fast", workers=2, fast_validate=True))
    # the synthetic defects are all caught by header + end-marker checks, so same samples
    fast = json.loads((tmp_path / "fast" / MANIFEST_FILE).read_text())
    ref = json.loads((reference / MANIFEST_FILE).read_text())
    assert fast["written"] == ref["written"] and fast["rejected_by_reason"] == ref["rejected_by_reason"]


def _kill_when(proc: subprocess.Popen, happened) -> None:
    """SIGKILL the run's whole process group as soon as `happened()`; fail if the run ended first."""
    deadline = time.monotonic() + 120
    while not happened():
        assert proc.poll() is None, "the run finished before the kill; the test would check nothing"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill; the test would check nothing"


def _unique_image_at(defect_set: Path, reference: Path, position: int) -> tuple[int, str]:
    """(index, image) of the first written image entry at or after `position` whose image no other
    entry uses."""
    entries = json.loads((defect_set / DATA_FILE).read_text())
    uses = Counter(e.get("image") for e in entries if isinstance(e, dict))
    written = sorted((s["index"], s["image"]) for shard in _shard_samples(reference) for s in shard
                     if s["image"] is not None)
    return next((index, image) for index, image in written if index >= position and uses[image] == 1)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("position", [70, 330])
def test_kill_mid_validation_and_resume(defect_set: Path, reference: Path, tmp_path: Path, position: int) -> None:
    """SIGKILL the real command (and its workers) while validation is held at one entry: its image
    is a FIFO, whose open() waits for a writer; then put the image back and --resume."""
    index, image = _unique_image_at(defect_set, reference, position)
    path = defect_set / "images" / image
    saved = path.read_bytes()
    out, state = tmp_path / "shards", tmp_path / "shards" / ".prep" / "validated.jsonl"
    done_before = index // DECODE_CHUNK  # chunks recorded before the held one (results go in entry order)
    path.unlink()
    os.mkfifo(path)
    try:
        proc = subprocess.Popen(_shard_cmd(defect_set, out, workers=2), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, lambda: _lines(state) == done_before)
    finally:
        path.unlink()
        path.write_bytes(saved)
    assert _lines(state) == done_before and not list(out.glob("shard-*"))
    subprocess.run(_shard_cmd(defect_set, out, workers=2) + ["--resume"], check=True, capture_output=True)
    assert _files(out) == _files(reference)


@pytest.mark.slow
def test_kill_mid_write_and_resume(defect_set: Path, reference: Path, tmp_path: Path) -> None:
    """SIGKILL the real command once its first shard is published (one worker writes the ~8 shards
    one after another, so most are still to come), then --resume."""
    out = tmp_path / "shards"
    proc = subprocess.Popen(_shard_cmd(defect_set, out, workers=1), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: any(out.glob("shard-*.tar")))
    published = sorted(out.glob("shard-*.tar"))
    assert not (out / MANIFEST_FILE).exists() and len(published) < len(list(reference.glob("shard-*.tar")))
    for shard in published:  # only complete shards under final names
        assert shard.read_bytes() == (reference / shard.name).read_bytes()
    subprocess.run(_shard_cmd(defect_set, out, workers=1) + ["--resume"], check=True, capture_output=True)
    assert _files(out) == _files(reference)


def _shard_cmd(defect_set: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "prep", "shard", "--data", str(defect_set / DATA_FILE),
            "--image-root", str(defect_set / "images"), "--out", str(out), "--workers", str(workers),
            "--shard-size", "37", "--seed", "11"]


def test_resume_guards(defect_set: Path, reference: Path, tmp_path: Path, capsys) -> None:
    args = ["prep", "shard", "--data", str(defect_set / DATA_FILE), "--image-root",
            str(defect_set / "images"), "--out", str(reference), "--shard-size", "37", "--seed", "11"]
    before = _files(reference)
    with pytest.raises(SystemExit) as exit_:
        divico(args)
    assert exit_.value.code == EXIT_BAD_INPUT and "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        divico(args + ["--resume"])  # a finished job: nothing to do
    assert exit_.value.code == 0
    assert _files(reference) == before

    # killed after the manifest, while removing the work folder: the job is finished
    cleaning = tmp_path / "cleaning"
    (cleaning / ".prep").mkdir(parents=True)
    for name, data in before.items():
        (cleaning / name).write_bytes(data)
    (cleaning / ".prep" / "validated.jsonl").write_text('["ok"')
    with pytest.raises(SystemExit) as exit_:
        divico(args[:-5] + [str(cleaning)] + args[-4:] + ["--resume"])
    assert exit_.value.code == 0
    assert not (cleaning / ".prep").exists() and _files(cleaning) == before

    partial = tmp_path / "partial"
    (partial / ".prep").mkdir(parents=True)
    run_cfg = _config(defect_set, partial, workers=1)
    (partial / ".prep" / "job.json").write_text(json.dumps({"seed": 99}))
    with pytest.raises(SystemExit) as exit_:
        divico(["prep", "shard", "--data", str(run_cfg.data), "--image-root", str(run_cfg.image_root),
                "--out", str(partial), "--resume"])
    assert exit_.value.code == EXIT_BAD_INPUT and "differ from the interrupted job" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["bad_json", "not_a_list", "missing_json", "missing_root"])
def test_cli_input_errors_write_nothing(defect_set: Path, tmp_path: Path, capsys, problem: str) -> None:
    data, root = defect_set / DATA_FILE, defect_set / "images"
    if problem == "bad_json":
        data = tmp_path / "broken.json"
        data.write_text('[{"id": "1", "conversations": []}, {"id": ')
    elif problem == "not_a_list":
        data = tmp_path / "object.json"
        data.write_text('{"id": "1"}')
    elif problem == "missing_json":
        data = tmp_path / "absent.json"
    else:
        root = tmp_path / "no-such-root"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        divico(["prep", "shard", "--data", str(data), "--image-root", str(root), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_BAD_INPUT
    assert (str(data) if problem != "missing_root" else str(root)) in err
    assert not out.exists()


@pytest.mark.parametrize("fast", [False, True], ids=["default", "fast-validate"])
def test_damage_in_the_middle_is_rejected_by_default_only(tmp_path: Path, damaged_png: bytes, fast: bool) -> None:
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    (images / "damaged.png").write_bytes(damaged_png)
    (tmp_path / DATA_FILE).write_text(json.dumps([{"id": "d", "image": "coco/damaged.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}]))
    args = ["prep", "shard", "--data", str(tmp_path / DATA_FILE), "--image-root", str(tmp_path / "images"),
            "--out", str(tmp_path / "out"), "--workers", "1"]
    with pytest.raises(SystemExit) as exit_:
        divico(args + ["--fast-validate"] * fast)
    assert exit_.value.code == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert (manifest["written"], manifest["rejected_by_reason"]) == ((1, {}) if fast else
                                                                     (0, {checks.UNREADABLE_IMAGE: 1}))


def test_verify_detects_damage(reference: Path, tmp_path: Path, capsys) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in _files(reference).items():
        (damaged / name).write_bytes(data)
    with pytest.raises(SystemExit) as exit_:
        divico(["prep", "verify", str(damaged)])
    assert exit_.value.code == 0

    shard = damaged / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload: tar still reads, hash differs
    shard.write_bytes(bytes(data))
    (damaged / "shard-000002.tar").unlink()
    with pytest.raises(SystemExit) as exit_:
        divico(["prep", "verify", str(damaged)])
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_FAILURE
    assert "shard-000001.tar: sha256 differs" in err and "shard-000002.tar is in the manifest but missing" in err
    assert "written=" in err  # the total no longer matches either


@pytest.mark.parametrize("name", ["a", "0000007_12345.json", "0000007_" + "x" * 64 + ".jpg", "k" * 100])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 123_456, 8**11 - 1])
def test_member_headers_are_tarfiles_own(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")

