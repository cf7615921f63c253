"""Generated sample images that look like pictures (sky, sun, hills, houses, trees), in many formats.

Used by the demo, the benchmarks and the tests, so nothing has to be downloaded.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Sample:
    """One encoded sample image."""

    name: str
    data: bytes
    description: str


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A landscape-like RGB picture: graded sky, sun, layered hills, a few houses and trees."""
    rng = random.Random(seed)
    top = np.array([rng.randint(20, 90), rng.randint(60, 140), rng.randint(150, 255)], dtype=np.float32)
    bottom = np.array([rng.randint(180, 255), rng.randint(150, 230), rng.randint(120, 220)], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1)
    image = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    sun_r = max(3, min(width, height) // rng.randint(8, 14))
    sx, sy = (
        rng.randint(sun_r, max(sun_r + 1, width - sun_r)),
        rng.randint(sun_r, max(sun_r + 1, height // 2)),
    )
    draw.ellipse((sx - sun_r, sy - sun_r, sx + sun_r, sy + sun_r), fill=(255, rng.randint(200, 250), 120))
    for layer in range(3):
        base = int(height * (0.55 + 0.12 * layer))
        shade = 40 + 35 * layer
        colour = (
            shade // 2 + rng.randint(0, 30),
            shade + rng.randint(40, 90),
            shade // 2 + rng.randint(0, 20),
        )
        points = [(0, height)]
        for x in range(0, width + 40, max(8, width // 12)):
            points.append((x, base - rng.randint(0, max(1, height // 6))))
        points.append((width, height))
        draw.polygon(points, fill=colour)
    for _ in range(rng.randint(1, 4)):
        _house(draw, rng, width, height)
    for _ in range(rng.randint(2, 7)):
        _tree(draw, rng, width, height)
    return image.filter(ImageFilter.SMOOTH)


def _house(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    w = max(4, width // rng.randint(8, 14))
    x = rng.randint(0, max(1, width - w))
    y = int(height * rng.uniform(0.7, 0.85))
    wall = (rng.randint(150, 240), rng.randint(120, 200), rng.randint(90, 160))
    draw.rectangle((x, y - w, x + w, y), fill=wall, outline=(60, 40, 30))
    draw.polygon(
        [(x - w // 6, y - w), (x + w // 2, y - w - w // 2), (x + w + w // 6, y - w)], fill=(150, 40, 30)
    )
    draw.rectangle((x + w // 3, y - w // 2, x + 2 * w // 3, y), fill=(80, 50, 30))


def _tree(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    r = max(3, width // rng.randint(16, 28))
    x = rng.randint(0, width)
    y = int(height * rng.uniform(0.72, 0.95))
    draw.rectangle((x - r // 4, y - r, x + r // 4, y + r), fill=(90, 60, 30))
    draw.ellipse((x - r, y - 3 * r, x + r, y - r // 2), fill=(30, rng.randint(100, 160), 40))


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _jpeg_with_orientation(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    return _save(image, "JPEG", quality=90, exif=exif.tobytes())


def _png16(image: Image.Image) -> bytes:
    grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return _save(Image.fromarray(grey), "PNG")


def _rgba_png(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    rgba.putalpha(200)
    return _save(rgba, "PNG")


_ENCODERS: list[tuple[str, str, Callable[[Image.Image], bytes]]] = [
    ("jpg", "JPEG, quality 90", lambda im: _save(im, "JPEG", quality=90)),
    ("png", "PNG, 8-bit RGB", lambda im: _save(im, "PNG")),
    ("webp", "WebP, quality 85", lambda im: _save(im, "WEBP", quality=85)),
    ("gif", "GIF, palette", lambda im: _save(im.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")),
    ("bmp", "BMP", lambda im: _save(im, "BMP")),
    ("tiff", "TIFF", lambda im: _save(im, "TIFF")),
    ("gray.jpg", "JPEG, grayscale", lambda im: _save(im.convert("L"), "JPEG", quality=90)),
    ("cmyk.jpg", "JPEG, CMYK", lambda im: _save(im.convert("CMYK"), "JPEG", quality=90)),
    ("rgba.png", "PNG with alpha", _rgba_png),
    ("16bit.png", "PNG, 16-bit grayscale", _png16),
    ("palette.png", "PNG, palette", lambda im: _save(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
    ("exif6.jpg", "JPEG with EXIF orientation 6", _jpeg_with_orientation),
]
_SIZES = [(640, 480), (480, 640), (512, 512), (800, 533), (300, 200), (1024, 768), (224, 224), (96, 160)]


def sample_images(count: int, seed: int = 0) -> list[Sample]:
    """``count`` pictures cycling through every supported format and several sizes."""
    samples = []
    for index in range(count):
        suffix, description, encode = _ENCODERS[index % len(_ENCODERS)]
        width, height = _SIZES[(index // len(_ENCODERS) + index) % len(_SIZES)]
        picture = scene(width, height, seed * 100_003 + index)
        samples.append(
            Sample(f"sample-{index:04d}.{suffix}", encode(picture), f"{description}, {width}x{height}")
        )
    return samples


def broken_samples() -> list[Sample]:
    """Inputs that must be dead-lettered: a truncated JPEG and a text file."""
    jpeg = _save(scene(320, 240, 7), "JPEG", quality=90)
    return [
        Sample("broken-truncated.jpg", jpeg[: len(jpeg) // 3], "JPEG cut to a third"),
        Sample("broken-not-an-image.txt", b"this is a text file, not a picture\n", "plain text"),
    ]


def jpeg_corpus(count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of about ``width`` px, the benchmark input."""
    return [_save(scene(width, height, seed + i), "JPEG", quality=90) for i in range(count)]
