"""Score heads for tests: random weights saved the way they are published, and reference implementations
written from the published architectures with numpy (independent of worker.models.heads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from worker.models.heads import HEADS

# The published files' keys (LAION's aesthetic predictor / its hub copy; the NSFW detector's PyTorch port).
AESTHETIC_LINEARS = (0, 2, 4, 6, 7)
NSFW_LINEARS = (1, 2, 3, 4)


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for head ``name`` with its published keys and shapes, spread wider than the default
    initialisation so that scores differ visibly between images."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in HEADS[name]().state_dict().items():
        if key == "norm.variance":
            state[key] = torch.rand(tensor.shape, generator=generator) * 0.002 + 0.0005
        elif key == "norm.mean":
            state[key] = torch.randn(tensor.shape, generator=generator) * 0.03
        else:
            fan_in = tensor.shape[-1] if tensor.dim() == 2 else 16
            state[key] = torch.randn(tensor.shape, generator=generator) * (1.5 / fan_in**0.5)
    return state


def save_random_heads(directory: Path, seed: int = 7) -> dict[str, Path]:
    """Random aesthetic weights as the hub publishes them (``model.safetensors`` in a directory) and random
    NSFW weights as the PyTorch port is published (a ``.pth`` state dict); returns each head's location."""
    from safetensors.torch import save_file

    aesthetic = directory / "aesthetic"
    aesthetic.mkdir(parents=True, exist_ok=True)
    save_file(random_state("aesthetic", seed), str(aesthetic / "model.safetensors"))
    nsfw = directory / "clip_autokeras_binary_nsfw.pth"
    torch.save(random_state("nsfw", seed + 1), nsfw)
    return {"aesthetic": aesthetic, "nsfw": nsfw}


def load_state(location: Path) -> dict[str, np.ndarray]:
    """The arrays a :func:`save_random_heads` location holds, read without the worker's code."""
    if location.is_dir():
        from safetensors.numpy import load_file

        return {k: v.astype(np.float64) for k, v in load_file(str(location / "model.safetensors")).items()}
    state = torch.load(location, map_location="cpu", weights_only=True)
    return {k: v.double().numpy() for k, v in state.items()}


def reference_aesthetic(state: dict[str, np.ndarray], embeddings: np.ndarray) -> np.ndarray:
    """Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations (dropouts are off at inference)."""
    x = embeddings.astype(np.float64)
    for index in AESTHETIC_LINEARS:
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    result: np.ndarray = x[:, 0]
    return result


def reference_nsfw(state: dict[str, np.ndarray], embeddings: np.ndarray) -> np.ndarray:
    """Keras normalisation, then 768 -> 64 -> 512 -> 256 with ReLU, then -> 1 with a sigmoid."""
    x = (embeddings.astype(np.float64) - state["norm.mean"]) / np.sqrt(state["norm.variance"])
    for index in NSFW_LINEARS:
        x = x @ state[f"linear_{index}.weight"].T + state[f"linear_{index}.bias"]
        x = np.maximum(x, 0.0) if index < NSFW_LINEARS[-1] else 1.0 / (1.0 + np.exp(-x))
    result: np.ndarray = x[:, 0]
    return result


REFERENCES = {"aesthetic": reference_aesthetic, "nsfw": reference_nsfw}


def unit_vectors(count: int, dim: int = 768, seed: int = 0) -> np.ndarray:
    """Random float32 L2-normalised vectors, like the embeddings the heads read."""
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised
