"""Bytes to model pixels: format sniffing, guards, EXIF orientation, RGB conversion, preprocessing.

The default preprocessing (``fit="crop"``) reproduces transformers' ``CLIPImageProcessor`` (PIL backend),
which matches OpenAI's ``_transform``: shortest side to ``size`` with PIL bicubic, centre crop, scale to
[0, 1], normalise. ``fit="stretch"`` reproduces ``SiglipImageProcessor`` (PIL backend): the whole image to
``crop`` x ``crop`` without keeping its aspect ratio, with the processor's filter, then the same scaling.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from worker.errors import RejectedRecord, RejectReason

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A declared size this many times larger than the compressed bytes is a decompression bomb rather than
# merely a big photo (a real photo compresses to a few bits per pixel, a bomb to far below one).
BOMB_PIXELS_PER_BYTE = 1000
_EXIF_ORIENTATION = 0x0112
_JPEG_END_OF_IMAGE = b"\xff\xd9"

# Refuse to fill in truncated files: a truncated image is an error, not a grey rectangle.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel guard runs before decoding; PIL's global one would raise a different error type first.
Image.MAX_IMAGE_PIXELS = None


RESIZERS = ("pil", "torch", "device")
FITS = ("crop", "stretch")
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# The formats the worker decodes; anything else is not_an_image, whatever plugins Pillow has (EPS would
# run Ghostscript, for one). MPO is how Pillow names the JPEGs of many cameras and phones.
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
Image.init()  # registers every plugin, so that the list below names only those this Pillow has
_OPENABLE = tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN)
# Past this many times the crop, the intermediate image of "shortest side to 224, then crop" is mostly
# thrown away (a 3x30000 strip would become 224x2,240,000): such images are resized straight to the crop
# window instead, at a cost bounded by the source size (see crop_window).
MAX_INTERMEDIATE_RATIO = 4


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing parameters, read from the model's preprocessor config by its family.

    ``fit`` is how the image becomes a ``crop`` x ``crop`` square: ``crop`` scales the shortest side to
    ``size`` and cuts the centre out (CLIP); ``stretch`` scales the whole image to the square, aspect ratio
    not kept (SigLIP), with ``filter`` (``bicubic`` or ``bilinear``; ``crop`` is always bicubic).

    ``resize`` picks the bicubic implementation: ``pil`` is the reference itself; ``torch`` is torch's
    antialiased uint8 bicubic (a port of PIL's filter, about 5x faster on CPU, within 2/255 of PIL on a
    few pixels: docs/performance.md has its parity); ``device`` leaves resize, crop and normalisation to the
    model's device (:mod:`worker.imaging.device_preprocess`), so decoding yields uint8 RGB arrays.
    ``decode="device"`` (with ``resize="device"``) also leaves the JPEG decoding itself to the device
    (:mod:`worker.imaging.device_decode`).
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: str = "pil"
    jpeg_draft: bool = False
    decode: str = "pil"
    fit: str = "crop"
    filter: str = "bicubic"


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG that the decode threads checked and left encoded for the model's device to decode."""

    data: bytes
    width: int
    height: int


@dataclass(frozen=True)
class ImageLimits:
    """Guards applied before an image is decoded.

    ``max_bytes`` is the largest encoded image: an inline image can be no larger than its record
    (``--max-message-bytes``), and an image fetched by reference gets the same cap, enforced while it
    streams in.
    """

    max_pixels: int = 64_000_000
    min_side: int = 3
    max_bytes: int = 16 * 1024 * 1024


def load_rgb(data: bytes, limits: ImageLimits, draft_shortest_side: int | None = None) -> Image.Image:
    """Decode image bytes into an RGB PIL image with EXIF orientation applied.

    With ``draft_shortest_side``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when its
    shortest side stays at least that long (libjpeg's draft mode): much less to decode and resize.
    Raises :class:`RejectedRecord` with a typed reason for every way the bytes can be unusable.
    """
    image = _open_checked(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.seek(0)  # first frame of animated GIF/WebP/TIFF
            if draft_shortest_side and image.format == "JPEG":
                _draft(image, draft_shortest_side)
            image.load()
            # exif_transpose copies the image even when there is nothing to rotate: ask first.
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            rotated = ImageOps.exif_transpose(image) if orientation not in (1, None) else image
            return to_rgb(rotated)
    except RejectedRecord:
        raise
    except (OSError, SyntaxError, EOFError) as exc:
        if _looks_truncated(exc):
            raise RejectedRecord(RejectReason.TRUNCATED_IMAGE, f"image data ends early: {exc}") from None
        raise RejectedRecord(RejectReason.CORRUPT_IMAGE, f"cannot decode image: {exc}") from None
    except Exception as exc:  # decoders raise assorted types on hostile input
        raise RejectedRecord(
            RejectReason.CORRUPT_IMAGE, f"cannot decode image: {type(exc).__name__}: {exc}"
        ) from None


def _open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read the header only (format, size, mode) and apply the guards; raises :class:`RejectedRecord`."""
    if not data:
        raise RejectedRecord(RejectReason.EMPTY_IMAGE, "image is zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=_OPENABLE)
    except UnidentifiedImageError:
        raise RejectedRecord(RejectReason.NOT_AN_IMAGE, "bytes are not a supported image format") from None
    except Exception as exc:
        if _looks_truncated(exc):
            raise RejectedRecord(RejectReason.TRUNCATED_IMAGE, f"image header ends early: {exc}") from None
        raise RejectedRecord(RejectReason.CORRUPT_IMAGE, f"cannot read image header: {exc}") from None
    _check_dimensions(image, len(data), limits)
    return image


def device_decodable(data: bytes, limits: ImageLimits) -> EncodedJpeg | None:
    """The JPEG to leave for the model's device to decode (``--decode device``), or None to decode here.

    Only the header is read. Baseline RGB and greyscale JPEGs without an EXIF rotation that end in their
    end-of-image marker go to the device; everything else (other formats, CMYK, progressive scans,
    rotations, truncated files) is decoded on the host as usual, so it keeps the host decoder's parity and
    typed errors. Raises :class:`RejectedRecord` when the header already fails the guards.
    """
    image = _open_checked(data, limits)
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    if image.info.get("progressive") or image.info.get("progression"):
        return None
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
        return None
    if not data.rstrip(b"\0").endswith(_JPEG_END_OF_IMAGE):
        return None  # truncated, or trailing bytes: the host decoder says which
    return EncodedJpeg(data, image.width, image.height)


def _draft(image: Image.Image, shortest_side: int) -> None:
    scale = min(image.size) / shortest_side
    if scale >= 2:
        # draft() picks the largest reduction that keeps both sides at least the requested size.
        image.draft(image.mode, (int(image.width / scale), int(image.height / scale)))


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text


def _check_dimensions(image: Image.Image, n_bytes: int, limits: ImageLimits) -> None:
    width, height = image.size
    pixels = width * height
    if pixels > limits.max_pixels:
        if pixels > BOMB_PIXELS_PER_BYTE * n_bytes:
            raise RejectedRecord(
                RejectReason.DECOMPRESSION_BOMB,
                f"{width}x{height} pixels declared in {n_bytes} bytes (limit {limits.max_pixels} pixels)",
            )
        raise RejectedRecord(
            RejectReason.IMAGE_TOO_LARGE,
            f"{width}x{height} = {pixels} pixels exceeds the limit of {limits.max_pixels}"
            " (raise --max-image-pixels to accept it)",
        )
    if min(width, height) < limits.min_side:
        raise RejectedRecord(
            RejectReason.IMAGE_TOO_SMALL,
            f"{width}x{height} is smaller than {limits.min_side} px on a side",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, keeping the tonal range of 16-bit and float images."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.uint32 if mode == "I" else np.uint16)
        scale = 65535 if mode != "I" or array.max(initial=0) > 255 else 255
        eight_bit = (array.astype(np.float64) * (255.0 / scale)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if mode == "F":
        floats: np.ndarray = np.asarray(image, dtype=np.float32)
        scaled = np.multiply(floats, 255.0) if floats.max(initial=0) <= 1.0 else floats
        eight_bit = np.clip(scaled, 0, 255)
        return Image.fromarray(eight_bit.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """Width and height after scaling the shortest side to ``size`` (CLIPImageProcessor's rounding)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def target_shape(width: int, height: int, params: Preprocessing) -> tuple[int, int]:
    """Width and height of the resized image, before any centre crop."""
    if params.fit == "stretch":
        return params.crop, params.crop
    return resized_shape(width, height, params.size)


def is_elongated(width: int, height: int, params: Preprocessing) -> bool:
    """Whether resizing the shortest side first would make an intermediate far larger than the crop."""
    if params.fit == "stretch":
        return False  # resized straight to the square: its cost is bounded by the source
    new_w, new_h = resized_shape(width, height, params.size)
    return max(new_w, new_h) > MAX_INTERMEDIATE_RATIO * params.crop


def crop_window(image: Image.Image, params: Preprocessing) -> Image.Image:
    """The centre crop of the resized image, computed without the resized image.

    PIL resamples the same source window with the same filter support as the reference's resize-then-crop.
    Only the order of its two 8-bit passes may differ (PIL picks it per image), so a pixel can be one level
    off on natural images (tests/unit/test_images.py). Only for ``crop <= size``.
    """
    new_w, new_h = resized_shape(image.width, image.height, params.size)
    scale_x, scale_y = image.width / new_w, image.height / new_h
    left, top = (new_w - params.crop) // 2, (new_h - params.crop) // 2
    crop, bicubic = params.crop, Image.Resampling.BICUBIC
    # Two passes, horizontal then vertical, each rounded to 8 bits.
    columns = image.resize(
        (crop, image.height), bicubic, box=(left * scale_x, 0, (left + crop) * scale_x, image.height)
    )
    return columns.resize((crop, crop), bicubic, box=(0, top * scale_y, crop, (top + crop) * scale_y))


def preprocess(image: Image.Image, params: Preprocessing) -> np.ndarray:
    """RGB image to a normalised float32 CHW array of shape ``(3, crop, crop)``."""
    if params.fit == "stretch":
        return normalise(_stretched(image, params), params)
    if params.crop <= params.size and is_elongated(image.width, image.height, params):
        return normalise(np.asarray(crop_window(image, params), dtype=np.float32), params)
    new_w, new_h = resized_shape(image.width, image.height, params.size)
    if params.resize == "torch":
        pixels = _torch_resize(image, new_w, new_h)
    else:
        resized = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32)
    top = (new_h - params.crop) // 2
    left = (new_w - params.crop) // 2
    if top < 0 or left < 0:
        pixels = _pad_to(pixels, params.crop)
        top, left = max(top, 0), max(left, 0)
    return normalise(pixels[top : top + params.crop, left : left + params.crop], params)


def normalise(pixels: np.ndarray, params: Preprocessing) -> np.ndarray:
    """Cropped HWC pixels (0-255) to the model's normalised float32 CHW input."""
    mean = np.asarray(params.mean, dtype=np.float32)
    std = np.asarray(params.std, dtype=np.float32)
    normalised = (pixels * np.float32(1 / 255) - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def _stretched(image: Image.Image, params: Preprocessing) -> np.ndarray:
    """The whole image resized to ``crop`` x ``crop`` as float32 HWC pixels (0-255)."""
    crop = params.crop
    if params.resize == "torch":
        return _torch_resize(image, crop, crop, params.filter)
    return np.asarray(image.resize((crop, crop), resample=FILTERS[params.filter]), dtype=np.float32)


def _torch_resize(image: Image.Image, width: int, height: int, mode: str = "bicubic") -> np.ndarray:
    import torch

    if (width, height) == image.size:
        return np.asarray(image, dtype=np.float32)
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(chw, size=(height, width), mode=mode, antialias=True)
    result: np.ndarray = resized[0].permute(1, 2, 0).numpy().astype(np.float32)
    return result


def _pad_to(pixels: np.ndarray, crop: int) -> np.ndarray:
    # Only reached when crop > size; CLIPImageProcessor zero-pads centred in that case.
    height, width = pixels.shape[:2]
    out = np.zeros((max(height, crop), max(width, crop), 3), dtype=pixels.dtype)
    top = -(-(out.shape[0] - height) // 2)
    left = -(-(out.shape[1] - width) // 2)
    out[top : top + height, left : left + width] = pixels
    return out


def decode_and_preprocess(data: bytes, limits: ImageLimits, params: Preprocessing) -> np.ndarray:
    """Bytes to the model's input tensor for one image (``resize="device"``: to its uint8 RGB array, which
    the model's device preprocesses); raises :class:`RejectedRecord` on bad input."""
    rgb = load_rgb(data, limits, params.size if params.jpeg_draft else None)
    if params.resize == "device":
        if params.crop <= params.size and is_elongated(rgb.width, rgb.height, params):
            # The device would resize it to a huge intermediate too: hand it the crop window, which its
            # resize then leaves as it is.
            return np.asarray(crop_window(rgb, params))
        return np.asarray(rgb)
    try:
        return preprocess(rgb, params)
    except Exception as exc:
        raise RejectedRecord(RejectReason.CORRUPT_IMAGE, f"cannot preprocess image: {exc}") from None


def prepare(data: bytes, limits: ImageLimits, params: Preprocessing) -> np.ndarray | EncodedJpeg:
    """What the decode threads hand to the batcher: :func:`decode_and_preprocess`'s result, or with
    ``decode="device"`` a JPEG that the device can decode, left encoded (:func:`device_decodable`)."""
    if params.decode == "device":
        jpeg = device_decodable(data, limits)
        if jpeg is not None and not is_elongated(jpeg.width, jpeg.height, params):
            return jpeg
    return decode_and_preprocess(data, limits, params)
