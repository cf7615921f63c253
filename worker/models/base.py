"""The model-family interface: how one family of checkpoints is loaded, preprocessed and read out.

A family owns the three parts of embedding an image (the pre / core / post split): the preprocessing
description, read from the checkpoint's own preprocessor config; the vision tower, loaded from a checkpoint
directory or hub id with the worker's offline behaviour, or made with random weights; and the image
features, the tensor in the tower's output that is the embedding. :class:`worker.inference.embedder.Embedder`
runs the tower (batching, dtype, device, streams, compile) and normalises; :mod:`worker.models.select` picks
the family from the checkpoint's ``model_type``. Nothing outside this package knows a family by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from worker.errors import ModelLoadError, first_line
from worker.imaging.host import Preprocessing
from worker.models.checkpoint import MODEL_HINT, RANDOM_PREFIX, ModelSpec, read_json
from worker.models.text import TextTower


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
    # Whether a batch of texts may be cut to its longest text: true where the padding after a text cannot
    # change its features (a causal mask and an attention mask), false where the tower reads it.
    trims_padding: ClassVar[bool] = False

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

    @abstractmethod
    def text_classes(self) -> tuple[Any, Any]:
        """The transformers text model class (with whatever maps it into the image space) and its config
        class."""

    @abstractmethod
    def text_length(self, config: Any, tokenizer: Any) -> int:
        """How many tokens every text is padded and truncated to, as the family's reference tokenises."""

    @abstractmethod
    def text_features(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The ``(N, dim)`` text features (not normalised) of the text tower for ``(N, length)`` ids, in the
        space of :meth:`image_features`: what the family's ``get_text_features`` returns."""

    def check_loaded(self, model: Any, spec: ModelSpec) -> None:
        """Refuse a loaded tower this family cannot embed with (raise :class:`ModelLoadError`); by default
        every tower the family's class loads is fine."""
        del model, spec

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load the vision tower described by ``spec``; raises :class:`ModelLoadError` with a one-line fix."""
        model_class, config_class = self.vision_classes()
        builtin = self.builtins.get(spec.model)
        model, label, revision = self._load_tower(
            spec, model_class, config_class, "vision", builtin.vision if builtin else None
        )
        self.check_loaded(model, spec)
        processor_config = read_json(spec, "preprocessor_config.json")
        if not processor_config and builtin is not None:
            processor_config = dict(builtin.preprocessor)
        preprocessing = self.preprocessing(processor_config, int(model.config.image_size))
        return LoadedModel(model, label, revision, preprocessing)

    def load_text(self, spec: ModelSpec) -> TextTower:
        """Load the text tower and the tokenizer of the checkpoint ``spec`` names (``--texts``); raises
        :class:`ModelLoadError` with a one-line fix."""
        model_class, config_class = self.text_classes()
        model, _label, _revision = self._load_tower(spec, model_class, config_class, "text", None)
        tokenizer = _load_tokenizer(spec)
        return TextTower(
            model.eval(),
            tokenizer,
            self.text_length(model.config, tokenizer),
            self.text_features,
            self.trims_padding,
        )

    def _load_tower(
        self,
        spec: ModelSpec,
        model_class: Any,
        config_class: Any,
        tower: str,
        builtin: Mapping[str, Any] | None,
    ) -> tuple[Any, str, str]:
        """One tower of the checkpoint (``tower`` names it in errors) with its label and revision."""
        try:
            if spec.random_weights:
                torch.manual_seed(0)
                model = model_class(self._architecture(spec, config_class, builtin))
                label, revision = RANDOM_PREFIX + spec.model, "random"
            else:
                model, loading = model_class.from_pretrained(
                    spec.model,
                    cache_dir=str(spec.model_dir) if spec.model_dir else None,
                    local_files_only=spec.local_files_only,
                    attn_implementation="sdpa",
                    output_loading_info=True,
                )
                # A checkpoint without some of the tower's weights would load with random ones: never
                # embed with that.
                if loading.get("missing_keys"):
                    missing = sorted(loading["missing_keys"])
                    raise ModelLoadError(
                        f"{spec.model!r} lacks {len(missing)} {tower} weight(s) such as {missing[0]}; "
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
            raise ModelLoadError(
                f"cannot load the {tower} tower of {spec.model!r} ({first_line(exc)}); {MODEL_HINT}"
            ) from None
        return model, label, revision

    def _architecture(self, spec: ModelSpec, config_class: Any, builtin: Mapping[str, Any] | None) -> Any:
        """The architecture for random weights: from a local checkpoint, the cache, or the built-in table."""
        try:
            return config_class.from_pretrained(
                spec.model,
                cache_dir=str(spec.model_dir) if spec.model_dir else None,
                local_files_only=True,
            )
        except Exception:
            if builtin is not None:
                return config_class(**builtin)
            if spec.model in self.builtins:  # built in are the vision towers (texts need the tokenizer too)
                raise ModelLoadError(
                    f"random weights for the text tower of {spec.model!r} need its config.json and "
                    f"tokenizer files in a local directory or the cache; {MODEL_HINT}"
                ) from None
            raise ModelLoadError(
                f"random weights need the architecture of {spec.model!r}, which is neither a local "
                f"directory, cached, nor built in ({', '.join(sorted(self.builtins))}); {MODEL_HINT}"
            ) from None


def _load_tokenizer(spec: ModelSpec) -> Any:
    """The checkpoint's own tokenizer, with the worker's offline behaviour."""
    from transformers import AutoTokenizer

    problem = "it knows only its special tokens: the checkpoint has no tokenizer files"
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.model,
            cache_dir=str(spec.model_dir) if spec.model_dir else None,
            local_files_only=spec.local_files_only or spec.random_weights,
        )
    except Exception as exc:
        tokenizer, problem = None, first_line(exc)
    # Without tokenizer files transformers builds an empty tokenizer of the model's type rather than fail.
    if tokenizer is None or len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ModelLoadError(
            f"cannot load the tokenizer of {spec.model!r} for --texts ({problem}); it must be in the "
            f"checkpoint directory or the cache (SigLIP's needs the sentencepiece package); {MODEL_HINT}"
        )
    return tokenizer
