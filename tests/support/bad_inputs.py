"""Request values that must be dead-lettered, each with the reason the worker must give."""

from __future__ import annotations

import io
import struct
import zlib

import msgpack
from PIL import Image

from worker.devtools.samples import scene
from worker.errors import RejectReason
from worker.messages import encode_request


def _png_bomb(side: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * side, 9))
        + chunk(b"IEND", b"")
    )


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    scene(width, height, 11).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def bad_requests() -> list[tuple[str, bytes, RejectReason]]:
    """``(key, record value, expected reason)``; keys start with ``raw:`` as the value is sent as is."""
    jpeg = _jpeg(300, 200)
    tiny = io.BytesIO()
    Image.new("RGB", (2, 2)).save(tiny, format="PNG")
    return [
        ("raw:not-msgpack", b"\xc1\xc1\xc1", RejectReason.INVALID_MSGPACK),
        ("raw:a-list", msgpack.packb([1, 2]), RejectReason.INVALID_ENVELOPE),
        ("raw:no-image", msgpack.packb({"id": "x"}), RejectReason.INVALID_ENVELOPE),
        ("raw:image-is-text", msgpack.packb({"id": "x", "image": "abc"}), RejectReason.INVALID_ENVELOPE),
        (
            "raw:version-9",
            msgpack.packb({"v": 9, "id": "x", "image": b"1"}, use_bin_type=True),
            RejectReason.UNSUPPORTED_VERSION,
        ),
        ("raw:zero-bytes", encode_request("zero", b""), RejectReason.EMPTY_IMAGE),
        ("raw:text-file", encode_request("text", b"just some text\n" * 10), RejectReason.NOT_AN_IMAGE),
        ("raw:truncated-jpeg", encode_request("trunc", jpeg[: len(jpeg) // 2]), RejectReason.TRUNCATED_IMAGE),
        ("raw:png-bomb", encode_request("bomb", _png_bomb(60_000)), RejectReason.DECOMPRESSION_BOMB),
        ("raw:two-pixels", encode_request("small", tiny.getvalue()), RejectReason.IMAGE_TOO_SMALL),
    ]
