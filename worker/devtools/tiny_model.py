"""A tiny random CLIP checkpoint, saved like a hub checkpoint: tests and quick benchmarks load it through
the real loading code without downloading anything."""

from __future__ import annotations

from pathlib import Path

TINY_DIM = 32
TINY_IMAGE_SIZE = 32


def build_tiny_clip(directory: Path, image_size: int = TINY_IMAGE_SIZE, patch_size: int = 8) -> Path:
    """Save a full CLIPModel (text + vision towers) and its image processor config to ``directory``.

    ``projection_dim`` is set at the top level and in the vision sub-config, as real checkpoints have it.
    ``image_size=224, patch_size=32`` gives a model that is cheap to run but preprocesses like ViT-L/14.
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
        "projection_dim": TINY_DIM,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": TINY_DIM,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_DIM)
    torch.manual_seed(1234)
    model = CLIPModel(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor.save_pretrained(directory)
    return directory
