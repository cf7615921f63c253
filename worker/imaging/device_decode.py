"""JPEG decoding on the model's device (``--decode device``): nvJPEG through torchvision on a GPU.

The decode threads only read each header (:func:`worker.imaging.host.device_decodable`); the inference thread
decodes a batch's JPEGs in one call straight into GPU memory, so the host cores that the decoding would
take are free and only the compressed bytes cross the PCIe bus. An image the device refuses is decoded on
the host instead, so it is either embedded after all or dead-lettered with the host decoder's typed reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from worker.errors import RejectedRecord, StartupError
from worker.imaging.host import EncodedJpeg, ImageLimits, load_rgb

log = logging.getLogger(__name__)

GPU_DECODE_HINT = "install torchvision built for this torch (pip install 'clip-worker[gpu-decode]')"


def load_jpeg_decoder() -> Callable[..., Any]:
    """torchvision's ``decode_jpeg``; raises :class:`StartupError` naming the fix when it is missing."""
    try:
        from torchvision.io import decode_jpeg
    except Exception as exc:  # ImportError, or torchvision's own check that it matches torch
        raise StartupError(f"--decode device needs torchvision ({exc}); {GPU_DECODE_HINT}") from None
    return decode_jpeg  # type: ignore[no-any-return]


class DeviceJpegDecoder:
    """Turns a batch's decoded-or-encoded images into pixels on one device.

    ``decode_jpeg`` is injectable so tests can make the device refuse chosen images.
    """

    def __init__(
        self, device: torch.device, limits: ImageLimits, decode_jpeg: Callable[..., Any] | None = None
    ) -> None:
        self.device = device
        self._limits = limits
        self._decode_jpeg = decode_jpeg or load_jpeg_decoder()
        self.fallbacks = 0  # images the device refused and the host decoded
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def materialise(
        self, images: Sequence[np.ndarray | EncodedJpeg]
    ) -> list[np.ndarray | torch.Tensor | RejectedRecord]:
        """Decode the encoded JPEGs among ``images`` on the device, in one call; keep the rest as they are.

        Returns, in order, uint8 ``(H, W, 3)`` host arrays, uint8 ``(3, H, W)`` device tensors, or the
        :class:`RejectedRecord` of an image that neither the device nor the host could decode.
        """
        results: list[np.ndarray | torch.Tensor | RejectedRecord] = []
        jpegs = [(index, image) for index, image in enumerate(images) if isinstance(image, EncodedJpeg)]
        decoded = self._decode_all([jpeg for _, jpeg in jpegs])
        by_index = {index: pixels for (index, _), pixels in zip(jpegs, decoded, strict=True)}
        for index, image in enumerate(images):
            if isinstance(image, np.ndarray):
                results.append(image)
                continue
            pixels = by_index[index]
            results.append(pixels if isinstance(pixels, torch.Tensor) else self._on_host(image, pixels))
        return results

    def _decode_all(self, jpegs: list[EncodedJpeg]) -> list[torch.Tensor | Exception]:
        if not jpegs:
            return []
        try:
            return [_checked(pixels, jpeg) for pixels, jpeg in zip(self._decode(jpegs), jpegs, strict=True)]
        except Exception:
            # One bad stream fails the whole batched call: find it by decoding one at a time.
            return [self._decode_one(jpeg) for jpeg in jpegs]

    def _decode_one(self, jpeg: EncodedJpeg) -> torch.Tensor | Exception:
        try:
            return _checked(self._decode([jpeg])[0], jpeg)
        except Exception as exc:  # nvJPEG's refusals, and out of memory for one huge image
            return exc

    def _decode(self, jpegs: list[EncodedJpeg]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode

        data = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
        if self._side_stream is None:
            return list(self._decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        # nvJPEG writes its outputs outside the stream order of the stream that allocated them (its hardware
        # engine honours no stream; pytorch/vision#9606): allocated on the caller's stream they can reuse a
        # block that the previous batch's queued kernels still read. Allocated on a stream of their own they
        # only get blocks nothing queued still uses; record_stream keeps each block from being reused until
        # the caller's stream, which reads it, is done with it.
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._side_stream):
            decoded = list(self._decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        consumer.wait_stream(self._side_stream)
        for pixels in decoded:
            pixels.record_stream(consumer)
        return decoded

    def _on_host(self, jpeg: EncodedJpeg, error: Exception) -> np.ndarray | RejectedRecord:
        self.fallbacks += 1
        log.info("device refused a %dx%d JPEG (%s); decoding it on the host", jpeg.width, jpeg.height, error)
        try:
            return np.asarray(load_rgb(jpeg.data, self._limits))
        except RejectedRecord as rejected:
            return rejected


def decoded_only(
    results: Sequence[np.ndarray | torch.Tensor | RejectedRecord],
) -> list[np.ndarray | torch.Tensor]:
    """The pixels among :meth:`DeviceJpegDecoder.materialise`'s results, rejected images left out."""
    return [pixels for pixels in results if not isinstance(pixels, RejectedRecord)]


def _checked(pixels: torch.Tensor, jpeg: EncodedJpeg) -> torch.Tensor | Exception:
    if tuple(pixels.shape) != (3, jpeg.height, jpeg.width):
        return ValueError(f"decoded to {tuple(pixels.shape)}, header says 3x{jpeg.height}x{jpeg.width}")
    return pixels
