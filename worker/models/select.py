"""Which family a checkpoint belongs to, from its own config's ``model_type``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.errors import ModelLoadError
from worker.models.base import ModelFamily
from worker.models.checkpoint import MODEL_HINT, ModelSpec, check_readable, looks_like_path, read_json
from worker.models.clip import ClipFamily
from worker.models.siglip import SiglipFamily

FAMILIES: tuple[ModelFamily, ...] = (ClipFamily(), SiglipFamily())
# Known model types that no family embeds, with the fix.
_REFUSED = {
    "siglip2": (
        "SigLIP 2 NaFlex checkpoints (model_type siglip2: variable resolution and aspect ratio) are not "
        "supported; use a fixed-resolution SigLIP 2 checkpoint such as google/siglip2-base-patch16-224, "
        "which is model_type siglip"
    ),
}


def supported_model_types() -> list[str]:
    """Every checkpoint ``model_type`` some family loads."""
    return sorted(kind for family in FAMILIES for kind in family.model_types)


def family_for_type(model_type: str, model: str) -> ModelFamily:
    """The family for a checkpoint's ``model_type``; raises :class:`ModelLoadError` naming the fix."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if model_type in _REFUSED:
        raise ModelLoadError(f"{model!r}: {_REFUSED[model_type]}")
    raise ModelLoadError(
        f"{model!r} is model_type {model_type!r}; supported: {', '.join(supported_model_types())}; "
        f"{MODEL_HINT}"
    )


def select_family(spec: ModelSpec) -> ModelFamily:
    """The family of the checkpoint ``spec`` names: from its config.json (its directory, the cache, the
    hub unless offline), else from the built-in architectures; raises :class:`ModelLoadError`."""
    if Path(spec.model).is_dir():
        check_readable(Path(spec.model))
    elif looks_like_path(spec.model):
        raise ModelLoadError(f"model directory {spec.model} does not exist; {MODEL_HINT}")
    config = read_json(spec, "config.json")
    if not config:
        builtin = next((f for f in FAMILIES if spec.model in f.builtins), None)
        if builtin is not None:
            return builtin
        config = read_json(spec, "config.json", download=True)
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelLoadError(
            f"cannot read the model_type of {spec.model!r} from its config.json; {MODEL_HINT}"
        )
    return family_for_type(model_type, spec.model)


def family_of_model(model: Any) -> ModelFamily:
    """The family of an already loaded vision tower, from its config's ``model_type``."""
    model_type = str(getattr(model.config, "model_type", ""))
    for family in FAMILIES:
        if model_type == family.vision_model_type:
            return family
    raise ModelLoadError(f"no model family embeds a vision tower of model_type {model_type!r}")
