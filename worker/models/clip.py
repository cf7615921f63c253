"""CLIP: OpenAI's checkpoints (ViT-B/32, B/16, L/14, L/14 at 336 px) and OpenCLIP's in transformers format.

The vision tower with its projection (``CLIPVisionModelWithProjection``) loads from a full CLIPModel
checkpoint; the embedding is ``image_embeds``. With ``--texts`` the text tower with its projection
(``CLIPTextModelWithProjection``) loads too; a text's embedding is ``text_embeds``, every text padded and
truncated to the tokenizer's 77 tokens with an attention mask. Preprocessing is CLIPImageProcessor's:
shortest side to ``size`` (bicubic), centre crop, mean and std from the checkpoint's preprocessor config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from worker.config import DEFAULT_MODEL
from worker.imaging.host import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocessing
from worker.models.base import BuiltinCheckpoint, ModelFamily

# OpenAI's ViT-L/14 vision tower, so random weights need no download.
VIT_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
VIT_L14_336_VISION = {**VIT_L14_VISION, "image_size": 336}


class ClipFamily(ModelFamily):
    """CLIP vision towers with projection."""

    name = "CLIP"
    model_types = ("clip", "clip_vision_model")
    vision_model_type = "clip_vision_model"
    # The text tower's causal mask keeps every token from what follows it, and the attention mask hides the
    # padding: a batch cut to its longest text has the same features, at a fraction of 77 tokens' cost.
    trims_padding = True
    builtins: ClassVar[Mapping[str, BuiltinCheckpoint]] = {
        DEFAULT_MODEL: BuiltinCheckpoint("clip", VIT_L14_VISION),
        "openai/clip-vit-large-patch14-336": BuiltinCheckpoint(
            "clip", VIT_L14_336_VISION, {"size": {"shortest_edge": 336}, "crop_size": {"height": 336}}
        ),
    }

    def vision_classes(self) -> tuple[Any, Any]:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection, CLIPVisionConfig

    def preprocessing(self, processor_config: Mapping[str, Any], image_size: int) -> Preprocessing:
        if not processor_config:
            return Preprocessing(size=image_size, crop=image_size)
        size = processor_config.get("size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", image_size)
        crop = processor_config.get("crop_size", image_size)
        if isinstance(crop, dict):
            crop = crop.get("height", image_size)
        return Preprocessing(
            size=int(size),
            crop=int(crop),
            mean=tuple(processor_config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(processor_config.get("image_std", OPENAI_CLIP_STD)),
        )

    def reference_processor(self, preprocessing: Preprocessing) -> Any:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": preprocessing.size},
            crop_size={"height": preprocessing.crop, "width": preprocessing.crop},
            image_mean=list(preprocessing.mean),
            image_std=list(preprocessing.std),
        )

    def embedding_dim(self, config: Any) -> int:
        return int(config.projection_dim)

    def image_features(self, model: Callable[..., Any], pixel_values: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = model(pixel_values=pixel_values).image_embeds
        return features

    def text_classes(self) -> tuple[Any, Any]:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection, CLIPTextConfig

    def text_length(self, config: Any, tokenizer: Any) -> int:
        # The tokenizer's context (77 for every OpenAI and OpenCLIP checkpoint), at most the tower's
        # positions. CLIPProcessor pads to the longest text instead; the causal mask and the attention mask
        # make that the same features, and one length lets texts be tokenised apart from their batch.
        return int(min(tokenizer.model_max_length, config.max_position_embeddings))

    def text_features(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        features: torch.Tensor = model(input_ids=ids, attention_mask=mask).text_embeds
        return features
