import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.devtools.samples import sample_images, scene
from worker.errors import RejectedRecord, RejectReason
from worker.imaging.host import (
    ImageLimits,
    Preprocessing,
    crop_window,
    decode_and_preprocess,
    load_rgb,
    preprocess,
    resized_shape,
)

LIMITS = ImageLimits(max_pixels=4_000_000, min_side=3)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def reject_reason(data: bytes, limits: ImageLimits = LIMITS) -> RejectReason:
    with pytest.raises(RejectedRecord) as caught:
        load_rgb(data, limits)
    return caught.value.reason


@pytest.mark.parametrize("sample", sample_images(12), ids=lambda s: s.name.split(".", 1)[1])
def test_every_sample_format_decodes_to_rgb_and_preprocesses(sample):
    image = load_rgb(sample.data, LIMITS)
    assert image.mode == "RGB"
    pixels = decode_and_preprocess(sample.data, LIMITS, Preprocessing())
    assert pixels.shape == (3, 224, 224)
    assert pixels.dtype == np.float32
    assert np.isfinite(pixels).all()


def test_exif_orientation_is_applied():
    picture = scene(200, 100, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(picture, "JPEG", quality=95, exif=exif.tobytes())
    assert load_rgb(data, LIMITS).size == (100, 200)


def test_sixteen_bit_png_keeps_its_tonal_range():
    ramp = (np.arange(256, dtype=np.uint16)[None, :].repeat(16, axis=0)) * 257
    data = encode(Image.fromarray(ramp), "PNG")
    rgb = np.asarray(load_rgb(data, LIMITS))
    assert rgb[0, 0, 0] == 0
    assert rgb[0, 255, 0] == 255
    assert rgb[0, 128, 0] == 128


def test_palette_with_transparency_and_rgba_decode():
    rgba = Image.new("RGBA", (32, 32), (10, 200, 30, 0))
    assert load_rgb(encode(rgba, "PNG"), LIMITS).mode == "RGB"
    palette = Image.new("P", (32, 32), 1)
    palette.info["transparency"] = 0
    assert load_rgb(encode(palette, "PNG", transparency=0), LIMITS).mode == "RGB"


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    red, _green, blue = load_rgb(buffer.getvalue(), LIMITS).getpixel((8, 8))  # type: ignore[misc]
    assert red > 200 and blue < 50


def test_zero_bytes_is_empty_image():
    assert reject_reason(b"") is RejectReason.EMPTY_IMAGE


def test_text_is_not_an_image():
    assert reject_reason(b"hello, this is not a picture") is RejectReason.NOT_AN_IMAGE


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_rejected(fmt):
    data = encode(scene(256, 256, 1), fmt)
    reason = reject_reason(data[: len(data) // 2])
    assert reason in (RejectReason.TRUNCATED_IMAGE, RejectReason.CORRUPT_IMAGE)
    if fmt == "JPEG":
        assert reason is RejectReason.TRUNCATED_IMAGE


def test_tiny_images_are_rejected():
    assert reject_reason(encode(Image.new("RGB", (2, 50)), "PNG")) is RejectReason.IMAGE_TOO_SMALL
    assert load_rgb(encode(Image.new("RGB", (3, 3)), "PNG"), LIMITS).size == (3, 3)


def test_image_over_the_pixel_limit_is_too_large():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    data = encode(noisy, "PNG")
    assert reject_reason(data, ImageLimits(max_pixels=100_000)) is RejectReason.IMAGE_TOO_LARGE


def png_bomb(width: int, height: int) -> bytes:
    """A grey PNG declaring width x height whose zeros compress to almost nothing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = zlib.compress(b"\x00" * ((width + 1) * 64), 9)  # only the first rows; the header is what matters
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_before_decoding():
    assert reject_reason(png_bomb(50_000, 50_000)) is RejectReason.DECOMPRESSION_BOMB


def test_gif_bomb_with_huge_logical_screen_is_rejected():
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    assert reject_reason(bytes(data)) in (RejectReason.DECOMPRESSION_BOMB, RejectReason.CORRUPT_IMAGE)


def test_preprocess_output_is_centre_cropped_and_normalised():
    white = Image.new("RGB", (448, 224), (255, 255, 255))
    pixels = preprocess(white, Preprocessing())
    expected = (1.0 - np.array(Preprocessing().mean)) / np.array(Preprocessing().std)
    np.testing.assert_allclose(pixels[:, 0, 0], expected, rtol=1e-6)


def thin_png(width: int, height: int) -> bytes:
    rows = b"".join(
        b"\0" + bytes(range(width * 3 % 256))[: width * 3].ljust(width * 3, b"\x80") for _ in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("resize", ["pil", "torch", "device"])
@pytest.mark.parametrize(("width", "height"), [(3, 30000), (30000, 3)])
def test_thin_images_cost_bounded_memory(resize, width, height):
    import tracemalloc

    data = thin_png(width, height)
    assert len(data) < 2000
    tracemalloc.start()
    try:
        pixels = decode_and_preprocess(data, ImageLimits(), Preprocessing(resize=resize))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Resizing the short side to 224 first would build a 224 x 2,240,000 intermediate (1.5 GB as uint8).
    assert peak < 64 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"
    assert pixels.shape == ((224, 224, 3) if resize == "device" else (3, 224, 224))


@pytest.mark.parametrize(("width", "height"), [(40, 1000), (1000, 40), (230, 2000), (300, 5000), (5000, 300)])
def test_the_crop_window_matches_the_reference_within_one_level(width, height):
    image = scene(width, height, seed=width)
    new_w, new_h = resized_shape(width, height, 224)
    full = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC)).astype(int)
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    window = np.asarray(crop_window(image, Preprocessing())).astype(int)
    assert np.abs(full[top : top + 224, left : left + 224] - window).max() <= 1


def test_formats_outside_the_list_are_not_images():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\n%%EOF\n"
    assert reject_reason(eps) == RejectReason.NOT_AN_IMAGE
    ppm = encode(scene(32, 32, 1), "PPM")
    assert reject_reason(ppm) == RejectReason.NOT_AN_IMAGE
