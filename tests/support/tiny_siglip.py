"""A tiny random SigLIP checkpoint, saved like a hub checkpoint, for tests that load it through the real
loading code without downloading anything."""

from __future__ import annotations

from pathlib import Path

TINY_SIGLIP_DIM = 32  # SigLIP has no projection: the embedding is the tower's hidden size
TINY_SIGLIP_IMAGE_SIZE = 30
# PIL's resampling numbers, as a preprocessor_config.json writes them: SigLIP's is bicubic, SigLIP 2's
# fixed-resolution checkpoints' bilinear.
BICUBIC, BILINEAR = 3, 2


def build_tiny_siglip(
    directory: Path, image_size: int = TINY_SIGLIP_IMAGE_SIZE, patch_size: int = 6, resample: int = BICUBIC
) -> Path:
    """Save a full SiglipModel (text + vision towers) and its image processor config to ``directory``.

    ``resample=BILINEAR`` makes it a SigLIP 2 fixed-resolution checkpoint, which transformers publishes as
    ``model_type: siglip`` with that one preprocessing difference.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 16,
    }
    vision = {
        "hidden_size": TINY_SIGLIP_DIM,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    torch.manual_seed(4321)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=resample)
    processor.save_pretrained(directory)
    return directory
