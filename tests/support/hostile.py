"""A corpus of hostile inputs: each is either embedded or dead-lettered with one expected reason."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import msgpack
import numpy as np
from PIL import Image

from worker.devtools.samples import scene
from worker.errors import RejectReason
from worker.messages import encode_request

EMBED = "embed"


@dataclass(frozen=True)
class Hostile:
    """A request value and what must happen to it: ``embed`` or a DLQ reason."""

    name: str
    value: bytes
    outcome: str


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, bit_depth: int = 8, colour: int = 0, rows: bytes | None = None) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\0" * (width + 1) * min(height, 64), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _jpeg_with_dimensions(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("RGB", (16, 16), (90, 120, 200)), "JPEG"))
    marker = data.index(b"\xff\xc0")
    data[marker + 5 : marker + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_with_screen(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [scene(96, 64, seed) for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buffer.getvalue()


def _bad_exif_jpeg() -> bytes:
    jpeg = _save(scene(64, 48, 3), "JPEG")
    garbage_exif = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x13" * 40
    segment = b"\xff\xe1" + struct.pack(">H", len(garbage_exif) + 2) + garbage_exif
    return jpeg[:2] + segment + jpeg[2:]


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return _save(scene(80, 40, 4), "JPEG", exif=exif.tobytes())


def _deep_meta(depth: int) -> dict[str, object]:
    meta: dict[str, object] = {"leaf": 1}
    for _ in range(depth):
        meta = {"n": meta}
    return meta


def hostile_corpus() -> list[Hostile]:
    """At least 30 kinds of hostile or unusual input with their expected outcome."""
    picture = scene(120, 90, 1)
    jpeg = _save(picture, "JPEG", quality=90)
    png = _save(picture, "PNG")
    rng = np.random.default_rng(7)
    cases: list[tuple[str, bytes, str]] = [
        ("png-bomb", _png(60_000, 60_000), RejectReason.DECOMPRESSION_BOMB),
        ("jpeg-bomb", _jpeg_with_dimensions(60_000, 60_000), RejectReason.DECOMPRESSION_BOMB),
        ("gif-bomb", _gif_with_screen(65_535, 65_535), RejectReason.DECOMPRESSION_BOMB),
        ("huge-declared-png", _png(1, 2_000_000_000 // 1), RejectReason.DECOMPRESSION_BOMB),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], RejectReason.TRUNCATED_IMAGE),
        ("truncated-png", png[: len(png) // 2], RejectReason.TRUNCATED_IMAGE),
        ("jpeg-header-only", jpeg[:200], RejectReason.TRUNCATED_IMAGE),
        ("zero-bytes", b"", RejectReason.EMPTY_IMAGE),
        ("random-bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), RejectReason.NOT_AN_IMAGE),
        ("html-text", b"<html><body>not an image</body></html>", RejectReason.NOT_AN_IMAGE),
        ("pdf-header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", RejectReason.NOT_AN_IMAGE),
        ("one-pixel", _save(Image.new("RGB", (1, 1)), "PNG"), RejectReason.IMAGE_TOO_SMALL),
        ("two-by-thousand", _save(Image.new("RGB", (2, 1000)), "PNG"), RejectReason.IMAGE_TOO_SMALL),
        ("cmyk-jpeg", _save(picture.convert("CMYK"), "JPEG"), EMBED),
        ("ycck-adobe-jpeg", _save(picture.convert("CMYK"), "JPEG", quality=80, subsampling=0), EMBED),
        (
            "png-16bit-grey",
            _save(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG"),
            EMBED,
        ),
        ("png-palette-transparency", _save(picture.convert("P"), "PNG", transparency=0), EMBED),
        ("png-la", _save(picture.convert("LA"), "PNG"), EMBED),
        ("png-1bit", _save(picture.convert("1"), "PNG"), EMBED),
        ("animated-gif", _animated("GIF"), EMBED),
        ("animated-webp", _animated("WEBP"), EMBED),
        ("malformed-exif", _bad_exif_jpeg(), EMBED),
        ("exif-orientation-8", _exif_orientation(8), EMBED),
        ("exif-orientation-99", _exif_orientation(99), EMBED),
        (
            "tiff-float",
            _save(Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)), "TIFF"),
            EMBED,
        ),
        ("polyglot-jpeg-zip", jpeg + b"PK\x03\x04" + b"\0" * 26 + b"payload", EMBED),
        ("bmp-tiny-valid", _save(Image.new("RGB", (3, 3), (1, 2, 3)), "BMP"), EMBED),
        ("extreme-aspect", _save(Image.new("RGB", (4000, 3), (200, 10, 10)), "PNG"), EMBED),
    ]
    hostile = [Hostile(name, encode_request(name, data), str(outcome)) for name, data, outcome in cases]
    envelopes: list[tuple[str, bytes, str]] = [
        ("not-msgpack", b"\xc1" * 8, RejectReason.INVALID_MSGPACK),
        ("msgpack-trailing-garbage", encode_request("x", png) + b"\x00\x01", RejectReason.INVALID_MSGPACK),
        ("msgpack-int", msgpack.packb(42), RejectReason.INVALID_ENVELOPE),
        ("id-not-utf8", b"\x82\xa2id\xa2\xff\xfe\xa5image\xc4\x01x", RejectReason.INVALID_ENVELOPE),
        (
            "id-is-bytes",
            msgpack.packb({"id": b"abc", "image": png}, use_bin_type=True),
            RejectReason.INVALID_ENVELOPE,
        ),
        ("image-is-list", msgpack.packb({"id": "a", "image": [1, 2]}), RejectReason.INVALID_ENVELOPE),
        (
            "meta-is-string",
            msgpack.packb({"id": "a", "image": png, "meta": "x"}, use_bin_type=True),
            RejectReason.INVALID_ENVELOPE,
        ),
        (
            "version-2",
            msgpack.packb({"v": 2, "id": "a", "image": png}, use_bin_type=True),
            RejectReason.UNSUPPORTED_VERSION,
        ),
        ("deeply-nested-meta", encode_request("deep", png, _deep_meta(200)), EMBED),
        (
            "oversized-id",
            msgpack.packb({"id": "i" * 5000, "image": png}, use_bin_type=True),
            RejectReason.INVALID_ENVELOPE,
        ),
    ]
    hostile += [Hostile(name, value, str(outcome)) for name, value, outcome in envelopes]
    return hostile
