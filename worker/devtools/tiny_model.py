"""A tiny random CLIP checkpoint, saved like a hub checkpoint: tests and quick benchmarks load it through
the real loading code without downloading anything."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

TINY_DIM = 32
TINY_IMAGE_SIZE = 32
TINY_TEXT_LENGTH = 16  # the tiny text tower's positions, and its tokenizer's context
# The tiny tokenizer's alphabet: texts of these characters tokenise without unknown tokens.
TINY_ALPHABET = string.ascii_lowercase + string.digits + ".,!?'-"
_TINY_MERGES = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "g</w>"), ("d", "og</w>")]
_TINY_MERGES += [("a", "t</w>"), ("c", "at</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")]


def build_tiny_clip(
    directory: Path,
    image_size: int = TINY_IMAGE_SIZE,
    patch_size: int = 8,
    hidden_act: str = "quick_gelu",
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    projection_dim: int = TINY_DIM,
) -> Path:
    """Save a full CLIPModel (text + vision towers), its image processor config and a tiny CLIP tokenizer
    (see :func:`tiny_clip_tokenizer`) to ``directory``.

    ``projection_dim`` is set at the top level and in the vision sub-config, as real checkpoints have it.
    ``image_size=224, patch_size=32`` gives a model that is cheap to run but preprocesses like ViT-L/14.
    OpenCLIP checkpoints in transformers format are CLIPModels too, with ``hidden_act="gelu"`` and
    sometimes their own mean and std: those arguments build one. ``projection_dim=768`` gives ViT-L/14's
    embedding size (what the score heads were trained on) at a tiny model's cost.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    text = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": TINY_TEXT_LENGTH,
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
    tokenizer.save_pretrained(directory)
    return directory


def tiny_clip_tokenizer() -> Any:
    """A CLIP tokenizer (byte-level BPE, CLIP's own normaliser and pre-tokeniser) with a vocabulary small
    enough for the tiny text tower: :data:`TINY_ALPHABET` as word pieces and word ends, a few merges, and
    CLIP's start and end tokens last, as in OpenAI's vocabulary. Built in memory: nothing is downloaded."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for piece in [*TINY_ALPHABET, *(char + "</w>" for char in TINY_ALPHABET)]:
        vocab[piece] = len(vocab)
    for left, right in _TINY_MERGES:
        vocab[left + right] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=_TINY_MERGES, model_max_length=TINY_TEXT_LENGTH)


# OpenAI's CLIP ViT-L/14: both towers' shapes, and its text context.
VIT_L14_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}
VIT_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
VIT_L14_CONTEXT = 77


def write_vit_l14_shape(directory: Path) -> Path:
    """Write ViT-L/14's architecture (config, image processor) with the tiny tokenizer, no weights: a
    directory ``--random-weights`` loads offline with both towers at ViT-L/14's cost. The tokenizer's
    vocabulary is small (the text tower's embedding table shrinks with it, its compute does not); texts are
    truncated at ViT-L/14's 77 tokens, and a batch of texts is cut to its longest."""
    from transformers import CLIPConfig, CLIPImageProcessor

    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = VIT_L14_CONTEXT
    text = {
        **VIT_L14_TEXT,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": VIT_L14_CONTEXT,
        "projection_dim": 768,
    }
    vision = {**VIT_L14_VISION, "projection_dim": 768}
    directory.mkdir(parents=True, exist_ok=True)
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=768).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    return directory
