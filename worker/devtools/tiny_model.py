"""A tiny random CLIP checkpoint, saved like a hub checkpoint: tests and quick benchmarks load it through
the real loading code without downloading anything."""

from __future__ import annotations

from pathlib import Path

TINY_DIM = 32
TINY_IMAGE_SIZE = 32


def build_tiny_clip(
    directory: Path,
    image_size: int = TINY_IMAGE_SIZE,
    patch_size: int = 8,
    hidden_act: str = "quick_gelu",
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    projection_dim: int = TINY_DIM,
) -> Path:
    """Save a full CLIPModel (text + vision towers) and its image processor config to ``directory``.

    ``projection_dim`` is set at the top level and in the vision sub-config, as real checkpoints have it.
    ``image_size=224, patch_size=32`` gives a model that is cheap to run but preprocesses like ViT-L/14.
    OpenCLIP checkpoints in transformers format are CLIPModels too, with ``hidden_act="gelu"`` and
    sometimes their own mean and std: those arguments build one. ``projection_dim=768`` gives ViT-L/14's
    embedding size (what the score heads were trained on) at a tiny model's cost.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 16,
        "projection_dim": projection_dim,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": projection_dim,
        "hidden_act": hidden_act,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(1234)
    model = CLIPModel(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **({"image_mean": list(image_mean)} if image_mean else {}),
        **({"image_std": list(image_std)} if image_std else {}),
    )
    processor.save_pretrained(directory)
    return directory
