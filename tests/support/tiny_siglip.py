"""A tiny random SigLIP checkpoint, saved like a hub checkpoint, for tests that load it through the real
loading code without downloading anything."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

TINY_SIGLIP_DIM = 32  # SigLIP has no projection: the embedding is the tower's hidden size
TINY_SIGLIP_IMAGE_SIZE = 30
# PIL's resampling numbers, as a preprocessor_config.json writes them: SigLIP's is bicubic, SigLIP 2's
# fixed-resolution checkpoints' bilinear.
BICUBIC, BILINEAR = 3, 2
TINY_SIGLIP_TEXT_LENGTH = 16  # the tiny text tower's positions
# What the tiny SentencePiece model learns its pieces from.
_CORPUS = [
    "a photo of a dog",
    "a photo of a cat",
    "two dogs playing in the snow",
    "the quick brown fox jumps over the lazy dog",
    "a painting of a lighthouse at night",
    "an aerial view of a city",
    "0123456789",
]


def build_tiny_siglip(
    directory: Path, image_size: int = TINY_SIGLIP_IMAGE_SIZE, patch_size: int = 6, resample: int = BICUBIC
) -> Path:
    """Save a full SiglipModel (text + vision towers), its image processor config and a tiny SigLIP
    tokenizer (a SentencePiece model trained in memory on a few sentences) to ``directory``.

    ``resample=BILINEAR`` makes it a SigLIP 2 fixed-resolution checkpoint, which transformers publishes as
    ``model_type: siglip`` with that one preprocessing difference.
    """
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tokenizer = tiny_siglip_tokenizer(directory)
    text = {
        "bos_token_id": tokenizer.eos_token_id,  # SigLIP's tokenizer adds no start token
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": TINY_SIGLIP_TEXT_LENGTH,
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
    tokenizer.save_pretrained(directory)
    return directory


def tiny_siglip_tokenizer(directory: Path) -> Any:
    """A SiglipTokenizer over a SentencePiece unigram model trained here (written to ``directory``), with
    SigLIP's special tokens: ``</s>`` ends and pads a text, ``<unk>`` stands for unknown pieces."""
    import sentencepiece
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=model,
        vocab_size=100,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spiece.model"
    path.write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(path), model_max_length=TINY_SIGLIP_TEXT_LENGTH)
