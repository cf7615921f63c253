"""Naming a checkpoint (:class:`ModelSpec`) and reading its own JSON files (``config.json``,
``preprocessor_config.json``) without loading it: from its directory, the weights cache, or the hub."""

from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import DEFAULT_MODEL
from worker.errors import ModelLoadError


@dataclass(frozen=True)
class ModelSpec:
    """What to load and where from."""

    model: str = DEFAULT_MODEL
    model_dir: Path | None = None
    local_files_only: bool = False
    random_weights: bool = False
    device: str = "auto"
    dtype: str = "auto"


RANDOM_PREFIX = "random:"
MODEL_HINT = (
    "check --model (hub id or local directory), --model-dir (weights cache), "
    "or pass --random-weights for an offline smoke run"
)


def looks_like_path(model: str) -> bool:
    """Whether ``model`` names a directory rather than a hub id (``owner/name``)."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def check_readable(model_dir: Path) -> None:
    """Name an unreadable checkpoint file as such (transformers reports it as "No such file or directory"),
    with the user the worker runs as: a container user other than the files' owner is the usual cause."""
    listing = sorted(model_dir.iterdir()) if os.access(model_dir, os.R_OK | os.X_OK) else []
    unreadable = next(
        (
            path
            for path in [model_dir, *listing]
            if not os.access(path, os.R_OK | os.X_OK if path.is_dir() else os.R_OK)
        ),
        None,
    )
    if unreadable is None:
        return
    uid = os.geteuid()
    try:
        user = f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        user = f"uid {uid}"
    raise ModelLoadError(
        f"permission denied: {unreadable} is not readable by user {user}; make the model files readable "
        f"by that user (chmod a+rX, or mount them with a matching owner); {MODEL_HINT}"
    )


def read_json(spec: ModelSpec, filename: str, *, download: bool = False) -> dict[str, Any]:
    """``filename`` of the checkpoint as a dict: from its directory, else the cache (else the hub when
    ``download`` and the spec allows it); ``{}`` when none of them has it."""
    local = Path(spec.model) / filename
    if local.is_file():
        loaded: dict[str, Any] = json.loads(local.read_text())
        return loaded
    if Path(spec.model).is_dir():
        return {}
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(
            spec.model,
            filename,
            cache_dir=str(spec.model_dir) if spec.model_dir else None,
            local_files_only=spec.local_files_only or not download,
        )
        cached: dict[str, Any] = json.loads(Path(path).read_text())
        return cached
    except Exception:
        return {}
