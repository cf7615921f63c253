"""The model-family interface: how one family of checkpoints is loaded, preprocessed and read out.

A family owns the three parts of embedding an image (the pre / core / post split): the preprocessing
description, read from the checkpoint's own preprocessor config; the vision tower, loaded from a checkpoint
directory or hub id with the worker's offline behaviour, or made with random weights; and the image
features, the tensor in the tower's output that is the embedding. :class:`worker.embedder.Embedder` runs
the tower (batching, dtype, device, streams, compile) and normalises; :mod:`worker.models.select` picks
the family from the checkpoint's ``model_type``. Nothing outside this package knows a family by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from worker.errors import ModelLoadError
from worker.images import Preprocessing
from worker.models.checkpoint import MODEL_HINT, RANDOM_PREFIX, ModelSpec, read_json


@dataclass(frozen=True)
class BuiltinCheckpoint:
    """A hub checkpoint's published architecture, written out so random weights need no download."""

    model_type: str
    vision: Mapping[str, Any]
    preprocessor: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedModel:
    """A family's vision tower (on the CPU, in float32) and what the outputs say about it."""

    model: Any
    label: str
    revision: str
    preprocessing: Preprocessing


class ModelFamily(ABC):
    """One family of checkpoints: CLIP, SigLIP, ..."""

    name: ClassVar[str]
    # ``model_type`` of the checkpoint's config.json (a full model or its vision tower alone).
    model_types: ClassVar[tuple[str, ...]]
    # ``model_type`` of the loaded vision tower's config, to recognise an already loaded model.
    vision_model_type: ClassVar[str]
    builtins: ClassVar[Mapping[str, BuiltinCheckpoint]] = {}

    @abstractmethod
    def vision_classes(self) -> tuple[Any, Any]:
        """The transformers vision model class and its config class."""

    @abstractmethod
    def preprocessing(self, processor_config: Mapping[str, Any], image_size: int) -> Preprocessing:
        """The preprocessing that equals this family's reference processor for ``processor_config`` (the
        checkpoint's preprocessor_config.json, ``{}`` if it has none) and the tower's ``image_size``."""

    @abstractmethod
    def reference_processor(self, preprocessing: Preprocessing) -> Any:
        """transformers' own image processor (PIL backend) for ``preprocessing``: the parity reference."""

    @abstractmethod
    def embedding_dim(self, config: Any) -> int:
        """The length of an embedding of a vision tower with this config."""

    @abstractmethod
    def image_features(self, model: Callable[..., Any], pixel_values: torch.Tensor) -> torch.Tensor:
        """The ``(N, dim)`` image features (not normalised) of ``model`` (the tower, or a compiled wrapper
        of it) for a normalised ``(N, 3, H, W)`` batch."""

    def check_loaded(self, model: Any, spec: ModelSpec) -> None:
        """Refuse a loaded tower this family cannot embed with (raise :class:`ModelLoadError`); by default
        every tower the family's class loads is fine."""
        del model, spec

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load the vision tower described by ``spec``; raises :class:`ModelLoadError` with a one-line fix."""
        model_class, config_class = self.vision_classes()
        try:
            if spec.random_weights:
                torch.manual_seed(0)
                model = model_class(self._architecture(spec, config_class))
                label, revision = RANDOM_PREFIX + spec.model, "random"
            else:
                model, loading = model_class.from_pretrained(
                    spec.model,
                    cache_dir=str(spec.model_dir) if spec.model_dir else None,
                    local_files_only=spec.local_files_only,
                    attn_implementation="sdpa",
                    output_loading_info=True,
                )
                # A checkpoint without some vision weights would load with random ones: never embed with that.
                if loading.get("missing_keys"):
                    missing = sorted(loading["missing_keys"])
                    raise ModelLoadError(
                        f"{spec.model!r} lacks {len(missing)} vision weight(s) such as {missing[0]}; "
                        f"it is not a {self.name} checkpoint; {MODEL_HINT}"
                    )
                label = spec.model
                is_local = Path(spec.model).is_dir()
                revision = str(
                    getattr(model.config, "_commit_hash", None) or ("local" if is_local else "unknown")
                )
        except ModelLoadError:
            raise
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"cannot load model {spec.model!r} ({first_line[:200]}); {MODEL_HINT}"
            ) from None
        self.check_loaded(model, spec)
        processor_config = read_json(spec, "preprocessor_config.json")
        builtin = self.builtins.get(spec.model)
        if not processor_config and builtin is not None:
            processor_config = dict(builtin.preprocessor)
        preprocessing = self.preprocessing(processor_config, int(model.config.image_size))
        return LoadedModel(model, label, revision, preprocessing)

    def _architecture(self, spec: ModelSpec, config_class: Any) -> Any:
        """The architecture for random weights: from a local checkpoint, the cache, or the built-in table."""
        try:
            return config_class.from_pretrained(
                spec.model,
                cache_dir=str(spec.model_dir) if spec.model_dir else None,
                local_files_only=True,
            )
        except Exception:
            builtin = self.builtins.get(spec.model)
            if builtin is not None:
                return config_class(**builtin.vision)
            raise ModelLoadError(
                f"random weights need the architecture of {spec.model!r}, which is neither a local "
                f"directory, cached, nor built in ({', '.join(sorted(self.builtins))}); {MODEL_HINT}"
            ) from None
