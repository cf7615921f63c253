"""SigLIP, and SigLIP 2 at fixed resolution (its fixed-resolution checkpoints are ``model_type: siglip``).

The vision tower (``SiglipVisionModel``) loads from a full SiglipModel checkpoint; the embedding is its
attention-pooling head's output, ``pooler_output``, which is what ``SiglipModel.get_image_features``
returns (dim = the tower's hidden size, no projection). Preprocessing is SiglipImageProcessor's: the whole
image to a fixed square without keeping its aspect ratio, with the filter its config names (bicubic for
SigLIP, bilinear for SigLIP 2), rescale to [0, 1], mean = std = 0.5.

With ``--texts`` the text tower (``SiglipTextModel``, whose head maps into the image space) loads too; a
text's embedding is its ``pooler_output``, every text padded to 64 tokens (``padding="max_length"``, as the
model was trained).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from worker.errors import ModelLoadError
from worker.imaging.host import Preprocessing
from worker.models.base import BuiltinCheckpoint, ModelFamily
from worker.models.checkpoint import MODEL_HINT, ModelSpec

# Vision towers from the published configs, so random weights need no download.
SIGLIP_BASE_PATCH16_224_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "image_size": 224,
}
SIGLIP_SO400M_PATCH14_384_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
}
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)
SIGLIP_TEXT_LENGTH = 64
# PIL's resampling numbers, as preprocessor_config.json writes them.
_FILTERS = {2: "bilinear", 3: "bicubic"}
_BICUBIC, _BILINEAR = 3, 2


def _square(side: int, resample: int) -> dict[str, Any]:
    return {"size": {"height": side, "width": side}, "resample": resample}


class SiglipFamily(ModelFamily):
    """SigLIP vision towers (SigLIP, and SigLIP 2 at fixed resolution)."""

    name = "SigLIP"
    model_types = ("siglip", "siglip_vision_model")
    vision_model_type = "siglip_vision_model"
    builtins: ClassVar[Mapping[str, BuiltinCheckpoint]] = {
        "google/siglip-base-patch16-224": BuiltinCheckpoint(
            "siglip", SIGLIP_BASE_PATCH16_224_VISION, _square(224, _BICUBIC)
        ),
        "google/siglip-so400m-patch14-384": BuiltinCheckpoint(
            "siglip", SIGLIP_SO400M_PATCH14_384_VISION, _square(384, _BICUBIC)
        ),
        "google/siglip2-base-patch16-224": BuiltinCheckpoint(
            "siglip", SIGLIP_BASE_PATCH16_224_VISION, _square(224, _BILINEAR)
        ),
        "google/siglip2-so400m-patch14-384": BuiltinCheckpoint(
            "siglip", SIGLIP_SO400M_PATCH14_384_VISION, _square(384, _BILINEAR)
        ),
    }

    def vision_classes(self) -> tuple[Any, Any]:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel, SiglipVisionConfig

    def preprocessing(self, processor_config: Mapping[str, Any], image_size: int) -> Preprocessing:
        size = processor_config.get("size", {})
        height = int(size.get("height", image_size)) if isinstance(size, dict) else int(size)
        width = int(size.get("width", height)) if isinstance(size, dict) else height
        if height != width:
            raise ModelLoadError(
                f"a {height}x{width} SigLIP input is not square; only square ones are supported"
            )
        resample = int(processor_config.get("resample", _BICUBIC))
        if resample not in _FILTERS:
            raise ModelLoadError(
                f"SigLIP preprocessor resample={resample} is not supported (bilinear 2 or bicubic 3 are)"
            )
        return Preprocessing(
            size=height,
            crop=height,
            mean=tuple(processor_config.get("image_mean", SIGLIP_MEAN_STD)),
            std=tuple(processor_config.get("image_std", SIGLIP_MEAN_STD)),
            fit="stretch",
            filter=_FILTERS[resample],
        )

    def reference_processor(self, preprocessing: Preprocessing) -> Any:
        from transformers import SiglipImageProcessorPil

        resample = {name: number for number, name in _FILTERS.items()}[preprocessing.filter]
        return SiglipImageProcessorPil(
            size={"height": preprocessing.crop, "width": preprocessing.crop},
            resample=resample,
            image_mean=list(preprocessing.mean),
            image_std=list(preprocessing.std),
        )

    def embedding_dim(self, config: Any) -> int:
        return int(config.hidden_size)

    def image_features(self, model: Callable[..., Any], pixel_values: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = model(pixel_values=pixel_values).pooler_output
        return features

    def text_classes(self) -> tuple[Any, Any]:
        from transformers import SiglipTextConfig, SiglipTextModel

        return SiglipTextModel, SiglipTextConfig

    def text_length(self, config: Any, tokenizer: Any) -> int:
        # The tower pools its last position, so the padding is part of the input: SigLIP was trained with
        # every text padded to 64 tokens, and transformers' zero-shot pipeline pads so (max_length 64).
        del tokenizer
        return int(min(SIGLIP_TEXT_LENGTH, config.max_position_embeddings))

    def text_features(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # SigLIP was trained without an attention mask: every position, padding included, attends to every
        # other (big_vision; transformers 4.x's tokenizer makes no mask). transformers 5's does, and passing
        # it changes the vectors, so the tower gets the ids alone.
        del mask
        features: torch.Tensor = model(input_ids=ids).pooler_output
        return features

    def check_loaded(self, model: Any, spec: ModelSpec) -> None:
        if not getattr(model.config, "vision_use_head", True):
            raise ModelLoadError(
                f"{spec.model!r} has no attention-pooling head (vision_use_head is false), so no image "
                f"embedding; use a SigLIP checkpoint with one; {MODEL_HINT}"
            )
