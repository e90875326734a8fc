"""The training loader: exact epochs over any world size / worker / shard count, order, resume, errors."""

from __future__ import annotations

import io
import json
import logging
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.bench.loader_throughput import measure_throughput
from pipeline.contract import DATA_FILE
from pipeline.data.loader import INDEX_NAME, Sample, ShardDataset, build_loader, group_by_modality_length
from pipeline.data.shard_format import MANIFEST_FILE

NUM_SAMPLES = 37  # prime: uneven shards, a remainder for every world size > 1
BATCH_SIZE = 3
TEXT_ONLY_EVERY = 5
# Tests run more loader workers than this machine's 2 cores, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def all_keys(num_samples: int = NUM_SAMPLES) -> set[str]:
    return {f"{index:07d}_id{index}" for index in range(num_samples)}


def dataset(shard_dir: Path, rank: int = 0, world_size: int = 1, **kwargs) -> ShardDataset:
    kwargs = {"batch_size": BATCH_SIZE, "seed": 1234, **kwargs}
    return ShardDataset(shard_dir, rank=rank, world_size=world_size, **kwargs)


def batched(samples, size: int) -> list[list[Sample]]:
    samples = iter(samples)
    return list(iter(lambda: list(islice(samples, size)), []))


def delivered_keys(data: ShardDataset, num_workers: int) -> list[str]:
    """The keys a DataLoader with `num_workers` delivers, from the dataset's per-worker streams.

    Models the DataLoader's in-order delivery: one batch from each worker in turn, skipping
    workers that have run out.
    """
    if num_workers == 0:
        return [sample.key for sample in data]
    per_worker = [batched(data.worker_samples(worker, num_workers), data.batch_size)
                  for worker in range(num_workers)]
    keys = []
    for round_number in range(max(len(batches) for batches in per_worker)):
        for batches in per_worker:
            if round_number < len(batches):
                keys += [sample.key for sample in batches[round_number]]
    return keys


def keys_of(batch: list[Sample]) -> list[str]:  # module level: picklable for any worker start method
    return [sample.key for sample in batch]


def loader_keys(data: ShardDataset, num_workers: int) -> list[str]:
    loader = build_loader(data, num_workers=num_workers, collate_fn=keys_of)
    return [key for batch in loader for key in batch]


@pytest.fixture(scope="module")
def shard_dirs(make_shard_dir) -> dict[int, Path]:
    return {shards: make_shard_dir(NUM_SAMPLES, shards, text_only_every=TEXT_ONLY_EVERY)
            for shards in (1, 2, 3, 7)}


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_every_sample_once_per_epoch_over_ranks_and_workers(shard_dirs, num_shards):
    for world_size in range(1, 9):
        ranks = [dataset(shard_dirs[num_shards], rank, world_size) for rank in range(world_size)]
        per_rank = NUM_SAMPLES // world_size
        assert [len(data) for data in ranks] == [per_rank] * world_size
        assert ranks[0].dropped_per_epoch == NUM_SAMPLES - per_rank * world_size <= world_size - 1
        reference = [delivered_keys(data, 0) for data in ranks]
        assert [len(keys) for keys in reference] == [per_rank] * world_size
        seen = [key for keys in reference for key in keys]
        assert len(seen) == len(set(seen)) == per_rank * world_size
        assert set(seen) <= all_keys()
        for num_workers in range(1, 5):
            for data, expected in zip(ranks, reference):
                # Each worker's share is disjoint, and together they make up the rank's sequence.
                shares = [[s.key for s in data.worker_samples(w, num_workers)] for w in range(num_workers)]
                assert sorted(key for share in shares for key in share) == sorted(expected)
                assert delivered_keys(data, num_workers) == expected, (world_size, num_workers)


@pytest.mark.slow
@pytest.mark.parametrize("num_shards, world_size, num_workers", [
    (1, 8, 4),  # 32 slots on 1 shard; 4 samples per rank, so workers 2 and 3 get no batch
    (2, 3, 2),
    (3, 2, 3),
    (7, 5, 1),
])
def test_dataloader_with_workers_delivers_the_rank_sequence(shard_dirs, num_shards, world_size, num_workers):
    seen = []
    for rank in range(world_size):
        data = dataset(shard_dirs[num_shards], rank, world_size)
        keys = loader_keys(data, num_workers)
        assert keys == delivered_keys(data, 0)
        seen += keys
    assert len(seen) == len(set(seen)) == NUM_SAMPLES // world_size * world_size


def test_dropped_tail_is_logged(shard_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.data.loader"):
        data = dataset(shard_dirs[3], 0, 5)
    assert data.dropped_per_epoch == 2
    assert "37 samples over 5 rank(s) = 7 per rank, 2 dropped" in caplog.text


def test_dropped_samples_change_with_the_epoch(shard_dirs):
    def dropped(epoch: int) -> set[str]:
        kept = {s.key for rank in range(5) for s in dataset(shard_dirs[3], rank, 5, epoch=epoch)}
        return all_keys() - kept

    assert len(dropped(0)) == len(dropped(1)) == 2
    assert dropped(0) != dropped(1)


def test_order_depends_on_seed_and_epoch_only(shard_dirs):
    shard_dir = shard_dirs[3]
    base = delivered_keys(dataset(shard_dir, seed=1, epoch=0), 0)
    assert delivered_keys(dataset(shard_dir, seed=1, epoch=0), 2) == base
    assert sorted(base) == sorted(all_keys())
    assert base != sorted(base)
    assert delivered_keys(dataset(shard_dir, seed=1, epoch=1), 0) != base
    assert delivered_keys(dataset(shard_dir, seed=2, epoch=0), 0) != base


@pytest.mark.parametrize("workers_before, workers_after", [(0, 0), (2, 0), (0, 3), (4, 2)])
def test_resume_continues_the_same_order(shard_dirs, workers_before, workers_after):
    for world_size in (1, 3):
        full = delivered_keys(dataset(shard_dirs[7], 1 % world_size, world_size), workers_before)
        for consumed in sorted({0, 1, 2, BATCH_SIZE, 7, len(full) - 1, len(full)}):
            resumed = dataset(shard_dirs[7], 1 % world_size, world_size, start_sample=consumed)
            assert len(resumed) == len(full) - consumed
            assert full[:consumed] + delivered_keys(resumed, workers_after) == full, consumed


@pytest.mark.parametrize("count", [0, 1, 7, 24, 50])
def test_grouping_is_a_permutation_within_buffers(count):
    order = np.random.default_rng(0).permutation(count)
    has_image, lengths = order % 3 > 0, (order * 7919) % 101
    grouped = group_by_modality_length(order, has_image, lengths, batch_size=4, buffer_batches=3,
                                       rng=np.random.default_rng(1))
    for start in range(0, count, 12):  # each buffer of 3 batches keeps its own samples
        assert sorted(grouped[start:start + 12]) == sorted(order[start:start + 12])


def test_grouping_gives_one_modality_and_sorted_lengths_per_batch():
    order = np.random.default_rng(0).permutation(96)
    has_image, lengths = order % 3 > 0, (order * 7919) % 101
    grouped = group_by_modality_length(order, has_image, lengths, batch_size=4, buffer_batches=8,
                                       rng=np.random.default_rng(1))
    batches = grouped.reshape(-1, 4)
    mixed = [batch for batch in batches if len(set(has_image[batch])) > 1]
    assert len(mixed) <= 3  # at most each buffer's one leftover batch
    assert all((np.diff(lengths[batch]) >= 0).all() for batch in batches if len(set(has_image[batch])) == 1)
    spread = np.mean([np.ptp(lengths[batch]) for batch in batches])
    assert spread < np.mean([np.ptp(lengths[batch]) for batch in order.reshape(-1, 4)]) / 3
    again = group_by_modality_length(order, has_image, lengths, batch_size=4, buffer_batches=8,
                                     rng=np.random.default_rng(1))
    assert (again == grouped).all()


def test_grouped_epoch_is_exact_and_resumes(shard_dirs):
    for world_size in (1, 3):
        full = delivered_keys(dataset(shard_dirs[7], 1 % world_size, world_size, group_by_length=True), 2)
        plain = delivered_keys(dataset(shard_dirs[7], 1 % world_size, world_size), 2)
        assert sorted(full) == sorted(plain) and full != plain
        batches = batched(full, BATCH_SIZE)
        text_only = {key for key in all_keys() if int(key[:7]) % TEXT_ONLY_EVERY == TEXT_ONLY_EVERY - 1}
        assert sum(len({key in text_only for key in batch}) > 1 for batch in batches) <= 1
        for consumed in (0, BATCH_SIZE, 7, len(full)):
            resumed = dataset(shard_dirs[7], 1 % world_size, world_size, start_sample=consumed,
                              group_by_length=True)
            assert full[:consumed] + delivered_keys(resumed, 3) == full


@pytest.mark.slow
def test_resume_through_dataloaders(shard_dirs):
    full = loader_keys(dataset(shard_dirs[2]), num_workers=2)
    consumed = 4 * BATCH_SIZE  # killed after 4 optimizer steps
    resumed = loader_keys(dataset(shard_dirs[2], start_sample=consumed), num_workers=3)
    assert full[:consumed] + resumed == full
    assert len(full) == NUM_SAMPLES


def test_samples_are_decoded(shard_dirs):
    samples = {sample.key: sample for sample in dataset(shard_dirs[2])}
    assert samples.keys() == all_keys()
    for key, sample in samples.items():
        index = int(key.split("_")[0])
        assert sample.meta["index"] == index and sample.meta["id"] == f"id{index}"
        assert "conversations" not in sample.meta
        assert sample.conversations[1] == {"from": "gpt", "value": f"answer {index}"}
        if index % TEXT_ONLY_EVERY == TEXT_ONLY_EVERY - 1:
            assert sample.image is None and sample.meta["image"] is None
            continue
        assert sample.image.mode == "RGB"
        assert sample.image.size == (sample.meta["width"], sample.meta["height"])
        colour = (index * 7 % 256, index * 13 % 256, index * 29 % 256)
        if index % 4 == 0:  # stored as greyscale JPEG
            assert len(set(sample.image.getpixel((0, 0)))) == 1
        else:  # PNG exact, JPEG within compression error
            tolerance = 0 if index % 2 else 8
            assert all(abs(a - b) <= tolerance for a, b in zip(sample.image.getpixel((0, 0)), colour))


def test_index_is_cached_and_rebuilt_when_stale(make_shard_dir, caplog):
    shard_dir = make_shard_dir(12, 2)
    with caplog.at_level(logging.INFO, logger="pipeline.data.loader"):
        first = [s.key for s in dataset(shard_dir)]
        assert (shard_dir / INDEX_NAME).is_file() and "indexed 12 samples" in caplog.text
        caplog.clear()
        assert [s.key for s in dataset(shard_dir)] == first
        assert "indexed" not in caplog.text
        other = make_shard_dir(14, 2)
        shutil.copy(shard_dir / INDEX_NAME, other / INDEX_NAME)  # an index of a different shard set
        assert len(dataset(other)) == 14
        assert "stale" in caplog.text


def test_index_path_can_point_elsewhere(shard_dirs, tmp_path):
    data = dataset(shard_dirs[2], index_path=tmp_path / "index.npz")
    assert (tmp_path / "index.npz").is_file()
    assert {s.key for s in data} == all_keys()


def test_unwritable_index_location_falls_back_to_memory(shard_dirs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        data = dataset(shard_dirs[2], index_path=tmp_path / "no-such-folder" / "index.npz")
    assert "could not cache the shard index" in caplog.text
    assert {s.key for s in data} == all_keys()


def test_corrupt_index_is_rebuilt(make_shard_dir, caplog):
    shard_dir = make_shard_dir(9, 1)
    (shard_dir / INDEX_NAME).write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        assert len(dataset(shard_dir)) == 9
    assert "unreadable" in caplog.text


@pytest.fixture
def shard_copy(shard_dirs, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dirs[3], copy, ignore=shutil.ignore_patterns(INDEX_NAME))  # scan afresh
    return copy


def test_missing_manifest(shard_copy):
    (shard_copy / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        dataset(shard_copy)


def test_missing_shard(shard_copy):
    (shard_copy / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 1 shard\(s\) missing .*shard-000001.tar"):
        dataset(shard_copy)


def test_count_mismatch(shard_copy):
    manifest = json.loads((shard_copy / MANIFEST_FILE).read_text())
    manifest["shards"][2]["samples"] += 1
    (shard_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-000002.tar holds 13 samples but .*manifest.json records 14"):
        dataset(shard_copy)


def test_truncated_shard(shard_copy):
    shard = shard_copy / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="shard-000000.tar is 1000 bytes but"):
        dataset(shard_copy)


def test_bad_arguments(shard_dirs):
    with pytest.raises(ValueError, match="rank 4 is not in"):
        dataset(shard_dirs[1], 4, 4)
    with pytest.raises(ValueError, match="start_sample 13 is outside 0..12"):
        dataset(shard_dirs[1], 0, 3, start_sample=13)
    with pytest.raises(ValueError, match="fewer than world_size 40"):
        dataset(shard_dirs[1], 0, 40)


def test_measure_throughput_decodes_the_epoch(shard_dirs):
    figures = measure_throughput(shard_dirs[2], num_workers=0, batch_size=4)
    assert figures["samples"] == NUM_SAMPLES and figures["samples_per_s"] > 0


def test_unexpected_member(shard_copy):
    shard = shard_copy / "shard-000001.tar"
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "0000000_x", "json": {"conversations": []}, "txt": "stray"})
    manifest = json.loads((shard_copy / MANIFEST_FILE).read_text())
    manifest["shards"][1]["bytes"] = shard.stat().st_size
    (shard_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard-000001.tar: member '0000000_x.txt' is neither json nor an image"):
        dataset(shard_copy)


def test_manifest_without_samples(shard_copy):
    manifest = json.loads((shard_copy / MANIFEST_FILE).read_text())
    manifest["shards"] = []
    (shard_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lists no samples"):
        dataset(shard_copy)


def test_unreadable_tar(shard_copy):
    shard = shard_copy / "shard-000002.tar"
    shard.write_bytes(b"x" * shard.stat().st_size)
    with pytest.raises(ValueError, match="shard-000002.tar is not a readable tar file"):
        dataset(shard_copy)


@pytest.mark.slow
def test_reads_real_prep_output_like_webdataset(tmp_path):
    """`divico prep shard` output (with defect-injected input): the loader's epoch over 3 ranks is
    the set webdataset reads from the shards, with the same json and the same decoded images."""
    from data_prep.shard import ShardConfig, run_shard
    from data_prep.synth import SynthConfig, generate

    generate(SynthConfig(out=tmp_path / "raw", num_samples=80, seed=5, defects=0.1, width=48, height=40))
    run_shard(ShardConfig(data=tmp_path / "raw" / DATA_FILE, image_root=tmp_path / "raw" / "images",
                          out=tmp_path / "shards", workers=1, shard_size=16, progress=False))
    manifest = json.loads((tmp_path / "shards" / MANIFEST_FILE).read_text())
    expected = {}
    for shard in manifest["shards"]:
        for sample in wds.WebDataset(str(tmp_path / "shards" / shard["name"]), shardshuffle=False):
            image = next((sample[ext] for ext in ("jpg", "png") if ext in sample), None)
            expected[sample["__key__"]] = (json.loads(sample["json"]), image)
    assert len(expected) == manifest["written"] > 0 and manifest["rejected"] > 0

    world_size = 3
    seen = {}
    for rank in range(world_size):
        for sample in dataset(tmp_path / "shards", rank, world_size):
            record, image = expected[sample.key]
            assert {"conversations": sample.conversations, **sample.meta} == record
            if image is None:
                assert sample.image is None
            else:
                with Image.open(io.BytesIO(image)) as reference:
                    assert sample.image.tobytes() == reference.convert("RGB").tobytes()
            seen[sample.key] = rank
    assert len(seen) == len(expected) // world_size * world_size
