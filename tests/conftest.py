"""Shared test assets: a tiny LLaVA saved to disk and reloaded like a real checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline.contract import IMAGE_TOKEN
from pipeline.data.shard_format import (JSON_EXT, REJECTED_FILE, key_digits, sample_key, shard_name,
                                        write_manifest)
from pipeline.model.tiny import TinyLlavaConfig, save_tiny_llava

# Tests start `divico`, `deepspeed` and the launch scripts as programs: they must be the ones
# installed beside this interpreter, whether or not its environment was activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny LLaVA folder (model + processor), built once per run."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), TinyLlavaConfig())


@pytest.fixture(scope="session")
def processor(tiny_llava_dir: Path):
    """The tiny LLaVA's processor, loaded as a checkpoint's is (callers restore what they change)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="session")
def damaged_png() -> bytes:
    """A 97x61 PNG with 16 bytes inverted halfway through its pixel data: header, size and end
    marker intact, so only a full decode finds the damage (which JPEG decoders would not report)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((97, 61), 60).convert("RGB").save(out, format="PNG")
    data = bytearray(out.getvalue())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    return bytes(data)


@pytest.fixture(scope="session")
def make_shard_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory for small shard directories in the `divico prep shard` format (team contract).

    `make_shard_dir(num_samples, num_shards)` writes balanced shards with webdataset's
    TarWriter: tiny JPEG (some greyscale) and PNG images whose colour encodes the entry
    index, and every `text_only_every`-th entry text-only; plus the manifest.
    """
    import hashlib
    import io

    import webdataset as wds
    from PIL import Image

    sources = ["coco", "gqa", "ocr_vqa", "textvqa", "vg"]

    def image_member(index: int) -> tuple[str, bytes, int, int]:
        width, height = 8 + index % 5, 6 + index % 3
        colour = (index * 7 % 256, index * 13 % 256, index * 29 % 256)
        image = Image.new("RGB", (width, height), colour)
        ext = "png" if index % 2 else "jpg"
        if ext == "jpg" and index % 4 == 0:
            image = image.convert("L")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if ext == "png" else "JPEG")
        return ext, buffer.getvalue(), width, height

    def make(num_samples: int, num_shards: int, *, text_only_every: int = 5) -> Path:
        out = tmp_path_factory.mktemp(f"shards_{num_samples}x{num_shards}")
        shards, digits = [], key_digits(num_samples)
        for shard in range(num_shards):
            name = shard_name(shard)
            first, last = shard * num_samples // num_shards, (shard + 1) * num_samples // num_shards
            with wds.TarWriter(str(out / name)) as writer:
                for index in range(first, last):
                    text_only = index % text_only_every == text_only_every - 1
                    record = {"id": f"id{index}", "index": index,
                              "source": "text" if text_only else sources[index % len(sources)],
                              "image": None, "width": None, "height": None,
                              "conversations": [{"from": "human", "value": f"question {index}"},
                                                {"from": "gpt", "value": f"answer {index}"}]}
                    sample = {"__key__": sample_key(index, record["id"], digits)}
                    if not text_only:
                        ext, data, record["width"], record["height"] = image_member(index)
                        record["image"] = f"{record['source']}/{index}.{ext}"
                        record["conversations"][0]["value"] = f"{IMAGE_TOKEN}\nquestion {index}"
                        sample[ext] = data
                    sample[JSON_EXT] = record
                    writer.write(sample)
            data = (out / name).read_bytes()
            shards.append({"name": name, "samples": last - first, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        (out / REJECTED_FILE).write_text("")
        write_manifest(out, inputs={}, seed=0, entries=num_samples, written=num_samples, rejected=0,
                       rejected_by_reason={}, sources={}, shards=shards)
        return out

    return make
