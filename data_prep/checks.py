"""Validation of one LLaVA-665K entry and its image, with the reason codes of rejected.jsonl.

Every check returns a `Rejection` (reason code + human-readable detail) or the facts the
shard writer needs. The order is fixed: entry structure, <image> marker count, the path
string, then the file system (symlink escape, missing, empty, undecodable). An entry is
rejected for the first problem found, so each entry has exactly one reason.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from dataclasses import dataclass

from PIL import Image

from pipeline.contract import IMAGE_TOKEN

# Load PIL's common format plugins now, not at the first Image.open in every worker (~30 ms
# each): prep workers are forked from a server that imported this module.
Image.preinit()

# Reason codes written to rejected.jsonl and counted in manifest.json.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
UNREADABLE_IMAGE = "unreadable_image"
PATH_ESCAPES_ROOT = "path_escapes_root"
MALFORMED_ENTRY = "malformed_entry"
IMAGE_MARKER_COUNT = "image_marker_count"
REASONS = (MISSING_FILE, EMPTY_FILE, UNREADABLE_IMAGE, PATH_ESCAPES_ROOT, MALFORMED_ENTRY,
           IMAGE_MARKER_COUNT)

TEXT_SOURCE = "text"
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


@dataclass(frozen=True)
class ImageInfo:
    """What validation learned about an accepted image file."""
    width: int
    height: int
    ext: str         # member extension in the shard: "jpg" or "png"
    convert: bool    # True when the stored bytes are a PNG re-encoding (GIF, palette, other)
    size: int        # file size in bytes, re-checked when the shard is written


def entry_id(entry: object) -> str | None:
    """The entry's id as a string, or None when it has none (for rejected.jsonl)."""
    if isinstance(entry, dict) and isinstance(entry.get("id"), (str, int)) \
            and not isinstance(entry.get("id"), bool):
        return str(entry["id"])
    return None


def source_of(entry: object) -> str:
    """The entry's top-level image folder ("coco", "gqa", "ocr_vqa", "textvqa", "vg"), "text"
    for text-only entries, "unknown" when the entry has no usable image path."""
    if not isinstance(entry, dict):
        return "unknown"
    image = entry.get("image")
    if image is None:
        return TEXT_SOURCE
    if not isinstance(image, str) or image.startswith("/"):
        return "unknown"
    # the first path component, skipping "." and empty ones (a string split: pathlib costs ~7 us)
    return next((part for part in image.split("/") if part not in ("", ".")), "unknown")


def check_entry(entry: object) -> Rejection | None:
    """Structure, marker count and path string of one entry (no file system access)."""
    if not isinstance(entry, dict):
        return Rejection(MALFORMED_ENTRY, f"entry is a JSON {type(entry).__name__}, not an object")
    if entry_id(entry) is None:
        return Rejection(MALFORMED_ENTRY, "missing or non-string 'id'")
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return Rejection(MALFORMED_ENTRY, "'image' is not a non-empty string")
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        return Rejection(MALFORMED_ENTRY, "missing or empty 'conversations' list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return Rejection(MALFORMED_ENTRY, f"turn {i} is not an object")
        expected = ROLES[i % 2]
        if turn.get("from") != expected:
            return Rejection(MALFORMED_ENTRY, f"turn {i} is from {turn.get('from')!r}, expected "
                                              f"{expected!r} (human/gpt alternating, human first)")
        value = turn.get("value")
        if not isinstance(value, str):
            return Rejection(MALFORMED_ENTRY, f"turn {i} value is {type(value).__name__}, not a string")
        if not value.strip():
            return Rejection(MALFORMED_ENTRY, f"turn {i} value is empty")
    if len(turns) < 2:
        return Rejection(MALFORMED_ENTRY, "conversation has no gpt answer")

    markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if image is not None and markers != 1:
        return Rejection(IMAGE_MARKER_COUNT, f"{markers} {IMAGE_TOKEN} markers for one image")
    if image is None and markers:
        return Rejection(IMAGE_MARKER_COUNT, f"{markers} {IMAGE_TOKEN} markers but no image")

    if image is not None:
        parts = image.replace("\\", "/").split("/")
        if image.startswith(("/", "\\")) or ":" in parts[0]:
            return Rejection(PATH_ESCAPES_ROOT, f"absolute path {image!r}")
        if ".." in parts:
            return Rejection(PATH_ESCAPES_ROOT, f"'..' in path {image!r}")
    return None


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    # Images sit in a handful of folders: resolve each folder's symlinks once per worker.
    return os.path.realpath(path)


def resolve_image(root_real: str, image: str) -> str | Rejection:
    """The real path of `image` under the (already resolved) root, or why it escapes.

    A missing file resolves to its would-be path; opening it then reports it missing.
    """
    folder, name = os.path.split(os.path.join(root_real, image))
    real = os.path.join(_real_dir(folder), name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    # a prefix test on the normalised real paths: what commonpath checks, at 1/50 of its cost
    if real != root_real and not real.startswith(os.path.join(root_real, "")):
        return Rejection(PATH_ESCAPES_ROOT, f"{image!r} resolves outside the image root (symlink)")
    return real


# Fast validation reads this much of a file first; JPEG headers with a large EXIF block or
# ICC profile need the rest of the file read too.
_HEAD_BYTES = 16384
_TAIL_BYTES = 64
# JPEG start-of-frame markers (C4 DHT, C8 JPG and CC DAC share the range but are not frames)
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # markers without a length field
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG bit depths allowed per colour type; palette images (type 3) are converted, so PIL decodes them
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 4: (8, 16), 6: (8, 16)}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments before it;
    None if `data` ends first or holds anything unusual (PIL then has the last word)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker == 0xDA:  # scan data before any frame header
            return None
        elif marker in _JPEG_FRAMES:
            # length, precision, height, width, components (PIL handles 1, 3 and 4)
            if pos + 10 > len(data) or data[pos + 9] not in (1, 3, 4):
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        else:
            length = (data[pos + 2] << 8) | data[pos + 3]
            if length < 2:
                return None
            pos += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a non-palette PNG's IHDR chunk (CRC checked); None otherwise."""
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, colour, compression, filters, interlace = \
        struct.unpack_from(">IIBBBBB", data, 16)
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filters or interlace > 1:
        return None
    if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    return width, height


def _header_size(data: bytes) -> tuple[str, int, int] | None:
    """(member extension, width, height) of a JPEG or non-palette PNG from its first bytes."""
    if data.startswith(b"\xff\xd8\xff"):
        size = _jpeg_size(data)
        return None if size is None else ("jpg", *size)
    if data.startswith(_PNG_SIGNATURE):
        size = _png_size(data)
        return None if size is None else ("png", *size)
    return None


def _fast_check(fd: int, size: int, image: str) -> ImageInfo | Rejection | None:
    """Header + end-marker check of a JPEG or non-palette PNG without PIL (a few
    microseconds instead of PIL's ~50); None for any other file, which PIL then opens.
    Positioned reads on the raw descriptor: no buffered file object to build (~15 us)."""
    head = os.pread(fd, _HEAD_BYTES, 0)
    header = _header_size(head)
    if header is None and len(head) < size:
        head = os.pread(fd, size, 0)
        header = _header_size(head)
    if header is None:
        return None
    ext, width, height = header
    if len(head) >= size:
        tail = head[-_TAIL_BYTES:]
    else:
        tail = os.pread(fd, _TAIL_BYTES, size - _TAIL_BYTES)
    if not (_jpeg_complete(tail) if ext == "jpg" else _png_complete(tail)):
        kind = "JPEG" if ext == "jpg" else "PNG"
        return Rejection(UNREADABLE_IMAGE, f"{image!r}: {kind} end marker missing (truncated file)")
    return ImageInfo(width, height, ext, False, size)


def _jpeg_complete(tail: bytes) -> bool:
    # Some encoders pad after the end-of-image marker; the marker must still be there.
    return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _png_complete(tail: bytes) -> bool:
    return tail.endswith(b"IEND\xaeB`\x82")


def _stored_format(image: Image.Image) -> tuple[str, bool]:
    """(member extension, needs conversion) for an opened image.

    JPEG and non-palette PNG bytes are stored as they are (no re-encoding, no quality loss);
    GIF, palette images and any other format are re-encoded losslessly as PNG so that the
    loader only ever meets jpg and png.
    """
    if image.format in ("JPEG", "MPO"):  # MPO: camera JPEGs with an extra preview frame
        return "jpg", False
    if image.format == "PNG" and image.mode not in ("P", "PA"):
        return "png", False
    return "png", True


def check_image_file(root_real: str, image: str, *, fast: bool) -> ImageInfo | Rejection:
    """Validate an image file: full decode by default, header + end marker if `fast`.

    The file is opened once; PIL reads from it directly. In fast mode JPEG and non-palette
    PNG headers are parsed here, without PIL; images that must be converted are always fully
    decoded, since the conversion will decode them anyway.
    """
    real = resolve_image(root_real, image)
    if isinstance(real, Rejection):
        return real
    try:
        with open(real, "rb", buffering=0) as raw:
            size = os.fstat(raw.fileno()).st_size
            if size == 0:
                return Rejection(EMPTY_FILE, f"{image!r} is a zero-byte file")
            if fast:
                checked = _fast_check(raw.fileno(), size, image)
                if isinstance(checked, ImageInfo):
                    return _check_size(checked, image)
                if checked is not None:
                    return checked
            f = io.BufferedReader(raw)  # PIL parses headers in many small reads
            with Image.open(f) as img:
                ext, convert = _stored_format(img)
                width, height = img.size
                if fast and not convert:
                    f.seek(max(0, size - _TAIL_BYTES))
                    tail = f.read()
                    complete = _jpeg_complete(tail) if ext == "jpg" else _png_complete(tail)
                    if not complete:
                        return Rejection(UNREADABLE_IMAGE, f"{image!r}: {img.format} end marker "
                                                           "missing (truncated file)")
                else:
                    img.load()
    except FileNotFoundError:
        return Rejection(MISSING_FILE, f"{image!r} does not exist under the image root")
    except IsADirectoryError:
        return Rejection(MISSING_FILE, f"{image!r} is a directory, not a file")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Rejection(UNREADABLE_IMAGE, f"{image!r}: {err}")
    return _check_size(ImageInfo(width, height, ext, convert, size), image)


def _check_size(info: ImageInfo, image: str) -> ImageInfo | Rejection:
    """An empty size, or one past PIL's decompression-bomb limit (which PIL's own open
    enforces, but the fast header check does not go through PIL)."""
    pixels, limit = info.width * info.height, Image.MAX_IMAGE_PIXELS
    if pixels <= 0:
        return Rejection(UNREADABLE_IMAGE, f"{image!r}: empty size {info.width}x{info.height}")
    if limit and pixels > 2 * limit:
        return Rejection(UNREADABLE_IMAGE, f"{image!r}: {info.width}x{info.height} is over PIL's "
                                           f"decompression-bomb limit of {2 * limit} pixels")
    return info


def stored_image_bytes(root_real: str, image: str, info: ImageInfo) -> bytes:
    """The bytes to store in the shard: the original file, or its lossless PNG conversion.

    Raises RuntimeError if the file changed since it was validated.
    """
    with open(os.path.join(root_real, image), "rb") as f:
        data = f.read()
    if len(data) != info.size:
        raise RuntimeError(f"image {image!r} changed size since validation "
                           f"({info.size} -> {len(data)} bytes); re-run without --resume")
    if not info.convert:
        return data
    with Image.open(io.BytesIO(data)) as img:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        converted = img.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()
