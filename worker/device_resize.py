"""CLIP preprocessing on the model's device (``--resize device``): resize, crop and normalise a batch there.

The decode threads only decode (to uint8 RGB); the antialiased bicubic resize, the centre crop and the
normalisation run as a few tensor operations per distinct image size on the GPU, which frees the CPU cores
that the resize would take. The result is rounded to uint8 levels before normalising, as PIL's resize is,
so it stays within a level of the reference (BENCHMARKS.md has the measured parity). With ``--decode device``
the images arrive already decoded on the device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from worker.images import Preprocessing, resized_shape


def preprocess_on_device(
    images: Sequence[np.ndarray | torch.Tensor], params: Preprocessing, device: torch.device
) -> torch.Tensor:
    """uint8 RGB images to a normalised float32 ``(N, 3, crop, crop)`` batch on ``device``.

    Each image is a host array ``(H, W, 3)`` or a tensor ``(3, H, W)`` already on ``device`` (decoded
    there by :mod:`worker.device_decode`).
    """
    crop = params.crop
    batch = torch.empty((len(images), 3, crop, crop), dtype=torch.float32, device=device)
    by_shape: dict[tuple[bool, int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        on_device = isinstance(image, torch.Tensor)
        height, width = image.shape[1:] if on_device else image.shape[:2]
        by_shape[(on_device, height, width)].append(index)
    for (on_device, height, width), indices in by_shape.items():
        if on_device:
            pixels = torch.stack([torch.as_tensor(images[i]) for i in indices]).float()
        else:
            stacked = np.stack([np.asarray(images[i]) for i in indices])
            copied = torch.from_numpy(stacked).to(device, non_blocking=True)
            # Planar (NCHW) before the resize: 15% faster than resizing the channels-last view on a CPU.
            pixels = copied.permute(0, 3, 1, 2).contiguous().float()
        new_w, new_h = resized_shape(width, height, params.size)
        if (new_w, new_h) != (width, height):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(new_h, new_w), mode="bicubic", antialias=True
            )
            pixels = pixels.round_().clamp_(0, 255)
        batch[indices] = _centre_crop(pixels, crop)
    mean = torch.tensor(params.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(params.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return batch.mul_(1 / 255).sub_(mean).div_(std)


def _centre_crop(pixels: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if height < crop or width < crop:
        # Only when crop > size; CLIPImageProcessor zero-pads centred (rounding the top/left pad up).
        pad_h, pad_w = max(0, crop - height), max(0, crop - width)
        top, left = -(-pad_h // 2), -(-pad_w // 2)
        pixels = torch.nn.functional.pad(pixels, (left, pad_w - left, top, pad_h - top))
        height, width = pixels.shape[-2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    return pixels[..., top : top + crop, left : left + crop]
