"""CLIP preprocessing on the model's device (``--resize device``): resize, crop and normalise a batch there.

The decode threads only decode (to uint8 RGB); the antialiased bicubic resize, the centre crop and the
normalisation run as a few tensor operations per distinct image size on the GPU, which frees the CPU cores
that the resize would take. The result is rounded to uint8 levels before normalising, as PIL's resize is,
so it stays within a level of the reference (BENCHMARKS.md has the measured parity).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from worker.images import Preprocessing, resized_shape


def preprocess_on_device(
    images: list[np.ndarray], params: Preprocessing, device: torch.device
) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` RGB arrays to a normalised float32 ``(N, 3, crop, crop)`` batch on ``device``."""
    crop = params.crop
    batch = torch.empty((len(images), 3, crop, crop), dtype=torch.float32, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_shape[image.shape].append(index)
    for shape, indices in by_shape.items():
        height, width = shape[0], shape[1]
        stacked = torch.from_numpy(np.stack([images[i] for i in indices])).to(device, non_blocking=True)
        pixels = stacked.permute(0, 3, 1, 2).float()
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
