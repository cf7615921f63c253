"""A request's image inputs: a data URI or bare base64 becomes the encoded bytes, anything with a scheme
(``https://``, ``s3://``, ``file://``) a reference for the worker's fetcher and its SSRF guard."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from worker.serving.api import ApiError, invalid

_DATA_URI = re.compile(
    r"^data:(?P<type>[\w.+/-]*)(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: its encoded ``data``, or the ``uri`` to fetch it from."""

    data: bytes | None = None
    uri: str | None = None


def parse_image(text: str, index: int, max_bytes: int) -> ImageInput:
    """Read input ``index``; raises :class:`ApiError` (400 for what is not base64, 413 past ``max_bytes``)."""
    match = _DATA_URI.match(text)
    if match is not None:
        if not match.group("b64"):
            raise invalid(f"input[{index}]: a data URI must be base64 (data:image/...;base64,...)", "input")
        return ImageInput(data=_decode(text[match.end() :], index, max_bytes))
    if _SCHEME.match(text):
        return ImageInput(uri=text)
    return ImageInput(data=_decode(text, index, max_bytes))


def _decode(encoded: str, index: int, max_bytes: int) -> bytes:
    # Refused by its length before it is decoded: base64 is four characters per three bytes.
    if (len(encoded) // 4) * 3 > max_bytes + 3:
        raise _too_large(index, max_bytes)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(
            f"input[{index}] is neither a URI, a data URI nor base64 (with modality 'image', each input "
            "is an image)",
            "input",
            "invalid_image_input",
        ) from None
    if len(data) > max_bytes:
        raise _too_large(index, max_bytes)
    return data


def _too_large(index: int, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"input[{index}] is larger than {max_bytes} bytes (--max-message-bytes)",
        "image_too_large",
        "input",
    )
