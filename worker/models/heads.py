"""Score heads: small networks on the image embedding, run in the same pass as the model.

Two heads, each written from its published architecture with module names that match the published weight
files, so real weights load unchanged:

- ``aesthetic``: LAION's improved aesthetic predictor (``sac+logos+ava1-l14-linearMSE``), a stack of linear
  layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between the first four and no activation; a
  score of about 1-10. Published on the hub as ``ttj/sac-logos-ava1-l14-linearMSE`` (``model.safetensors``)
  and by LAION as a ``.pth`` state dict; keys ``layers.{0,2,4,6,7}.{weight,bias}``.
- ``nsfw``: LAION's CLIP-based NSFW detector for ViT-L/14: a normalisation by a stored mean and variance,
  then 768 -> 64 -> 512 -> 256 -> 1 with ReLUs and a sigmoid; a probability. LAION publishes it as an
  AutoKeras (TensorFlow) SavedModel; the PyTorch port that NeMo Curator loads is the state dict
  ``clip_autokeras_binary_nsfw.pth`` (keys ``norm.{mean,variance}``, ``linear_{1..4}.{weight,bias}``).

Both were trained on L2-normalised OpenAI CLIP ViT-L/14 image embeddings, which each head declares
(:class:`TrainedOn`) so that a model with another embedding is refused at start-up.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from worker.config import AESTHETIC_HEAD, DEFAULT_MODEL, NSFW_WEIGHTS_URL
from worker.errors import ModelLoadError, first_line
from worker.models.checkpoint import RANDOM_PREFIX, ModelSpec, check_readable, looks_like_path

# The file a head's hub repository holds (PyTorchModelHubMixin's layout, as NeMo Curator downloads it).
HUB_FILENAME = "model.safetensors"
# Weight files a head location may be, or a directory may hold, in order of preference.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".zip")
# The most bytes a head's weights may take: a weight file on disk, a zip member once inflated, the records a
# torch file declares. The published heads are small MLPs on 768-d embeddings (the aesthetic predictor is
# 3.7 MB of float32, the NSFW detector's port 0.9 MB), so this leaves room for float64 copies or extra keys
# many times over, while reading a file at the bound stays far inside a container's memory at start-up.
MAX_HEAD_BYTES = 64 * 2**20
# The most entries a head's zip (or a torch file, itself a zip) may hold: zipfile builds an object for each
# entry when it opens the file, before any is read. The NSFW zip holds a handful, a torch file one per tensor.
MAX_ZIP_ENTRIES = 1000
_READ_CHUNK = 2**20
# Every entry zipfile lists starts with this signature in the file, so counting it bounds the entries.
_CENTRAL_ENTRY = b"PK\x01\x02"
_LOCAL_ENTRY = b"PK\x03\x04"


@dataclass(frozen=True)
class TrainedOn:
    """The embedding a head was trained on: the model family's name, its dimension and the checkpoint."""

    family: str
    dim: int
    model: str

    def describe(self) -> str:
        """For messages: ``openai/clip-vit-large-patch14 (CLIP, 768-d)``."""
        return f"{self.model} ({self.family}, {self.dim}-d)"


VIT_L14 = TrainedOn("CLIP", 768, DEFAULT_MODEL)


class ScoreHead(nn.Module):
    """A head: ``(N, dim)`` float32 unit embeddings to ``(N,)`` scores."""

    name: ClassVar[str]
    trained_on: ClassVar[TrainedOn]
    # Where to get weights that are tensors only, for the refusal of a file with pickled code.
    safe_weights: ClassVar[str]


class AestheticHead(ScoreHead):
    """LAION's improved aesthetic predictor (linear layers only: the published code has no activations)."""

    name = "aesthetic"
    trained_on = VIT_L14
    safe_weights = f"the hub's {HUB_FILENAME} ({AESTHETIC_HEAD}, the default) or LAION's .pth state dict"

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(self.trained_on.dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Aesthetic scores, about 1 (worst) to 10 (best) with the published weights."""
        scores: torch.Tensor = self.layers(embeddings).squeeze(-1)
        return scores


class _Normalization(nn.Module):
    """Keras' Normalization layer as the PyTorch port stores it: ``(x - mean) / sqrt(variance)``."""

    mean: torch.Tensor
    variance: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised: torch.Tensor = (x - self.mean) / self.variance.sqrt()
        return normalised


class NsfwHead(ScoreHead):
    """LAION's CLIP-based NSFW detector for ViT-L/14."""

    name = "nsfw"
    trained_on = VIT_L14
    safe_weights = (
        f"the PyTorch port clip_autokeras_binary_nsfw.pth (a state dict of tensors) or the zip holding it, "
        f"{NSFW_WEIGHTS_URL}"
    )

    def __init__(self) -> None:
        super().__init__()
        self.norm = _Normalization(self.trained_on.dim)
        self.linear_1 = nn.Linear(self.trained_on.dim, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The probability that the image is NSFW, 0 to 1."""
        x = self.norm(embeddings)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


HEADS: Mapping[str, type[ScoreHead]] = {head.name: head for head in (AestheticHead, NsfwHead)}


@dataclass(frozen=True)
class LoadedHead:
    """A head with its weights (on the CPU, in float32, in eval mode) and where they came from."""

    head: ScoreHead
    label: str


class ScoreHeads:
    """The heads the worker runs, all in one call per batch on the model's device."""

    def __init__(self, loaded: Mapping[str, LoadedHead], device: torch.device) -> None:
        self.names = tuple(loaded)
        self.labels = {name: item.label for name, item in loaded.items()}
        self._heads = [item.head.to(device=device, dtype=torch.float32).eval() for item in loaded.values()]

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N, dim)`` float32 unit embeddings (on the heads' device) to ``(N, heads)`` float32 scores, in
        the order of :attr:`names`. The caller holds inference mode."""
        return torch.stack([head(embeddings) for head in self._heads], dim=1)

    def named(self, row: np.ndarray) -> dict[str, float]:
        """One image's row of scores as ``{name: score}``."""
        return {name: float(value) for name, value in zip(self.names, row, strict=True)}


def check_trained_on(name: str, family: str, dim: int) -> None:
    """Refuse head ``name`` for a model of ``family`` with ``dim``-d embeddings it was not trained on."""
    trained = HEADS[name].trained_on
    if (family, dim) != (trained.family, trained.dim):
        raise ModelLoadError(
            f"--score {name}: the {name} head was trained on {trained.describe()} embeddings, but the model "
            f"embeds {family} {dim}-d; use --model {trained.model} (or another {trained.family} checkpoint "
            f"with {trained.dim}-d embeddings) or drop {name} from --score"
        )


def load_head(name: str, spec: ModelSpec, flag: str) -> LoadedHead:
    """Head ``name`` with the weights ``spec.model`` names (a hub id, a weight file, or a directory holding
    one), read like the model's (``model_dir`` cache, ``local_files_only``); random weights with
    ``spec.random_weights``. Raises :class:`ModelLoadError` with a one-line fix naming ``flag``."""
    if spec.random_weights:
        torch.manual_seed(0)
        return LoadedHead(HEADS[name]().eval(), RANDOM_PREFIX + spec.model)
    head = HEADS[name]()
    path = _weights_file(name, spec, flag)
    state = _read_state_dict(name, path, flag)
    missing, unexpected = _key_mismatch(head, state)
    if missing or unexpected:
        mismatched = (("missing", missing), ("unexpected", unexpected))
        parts = [f"{len(keys)} {what} key(s) such as {keys[0]}" for what, keys in mismatched if keys]
        raise ModelLoadError(f"{path} is not a {name} head's state dict ({', '.join(parts)}); check {flag}")
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:  # the right keys with the wrong shapes
        detail = str(exc).strip().splitlines()[-1].strip()
        raise ModelLoadError(f"{path} does not fit the {name} head ({detail[:200]}); check {flag}") from None
    return LoadedHead(head.eval(), spec.model)


def _key_mismatch(head: ScoreHead, state: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    expected = set(head.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _weights_file(name: str, spec: ModelSpec, flag: str) -> Path:
    """The weight file of a head location: the file itself, the one a directory holds, or the hub's."""
    location = Path(spec.model).expanduser()
    if location.is_file():
        return location
    if location.is_dir():
        check_readable(location)
        for suffix in WEIGHT_SUFFIXES:
            found = sorted(location.glob(f"*{suffix}"))
            if found:
                preferred = location / HUB_FILENAME
                return preferred if preferred in found else found[0]
        raise ModelLoadError(
            f"{location} holds no {name} head weights (a {', '.join(WEIGHT_SUFFIXES)} file); check {flag}"
        )
    if looks_like_path(spec.model):
        raise ModelLoadError(f"{flag} {spec.model}: no such file or directory")
    try:
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                spec.model,
                HUB_FILENAME,
                cache_dir=str(spec.model_dir) if spec.model_dir else None,
                local_files_only=spec.local_files_only,
            )
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the {name} head from {spec.model!r} ({first_line(exc)}); check {flag} (hub id, "
            f"weight file or directory), --model-dir, or pass --random-weights for an offline smoke run"
        ) from None


def _read_state_dict(name: str, path: Path, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, a torch ``.pth``/``.pt``/``.bin`` file (tensors only, never
    pickled code), or a zip holding one of those (as the NSFW detector's PyTorch port is published), each
    refused past :data:`MAX_HEAD_BYTES` before it is read whole."""
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(
            f"{path}: unknown weight format {suffix or '(no suffix)'}; {flag} takes a "
            f"{', '.join(WEIGHT_SUFFIXES)} file, a directory holding one, or a hub id"
        )
    try:
        _check_size(str(path), path.stat().st_size, flag)
        if suffix == ".zip":
            return _read_zip(name, path, flag)
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        return _read_torch(name, path, str(path), flag)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} ({first_line(exc)}); check {flag}") from None


def _bound() -> str:
    return (
        f"the {MAX_HEAD_BYTES / 2**20:g} MiB bound on a head's weights (the published heads are under 4 MB)"
    )


def _check_size(where: str, size: int, flag: str) -> None:
    if size > MAX_HEAD_BYTES:
        raise ModelLoadError(f"{where} is {size:,} bytes, over {_bound()}; check {flag}")


def _check_entries(handle: IO[bytes], where: str, flag: str) -> None:
    """Refuse a zip with more than :data:`MAX_ZIP_ENTRIES` entries before zipfile (or torch) lists them: the
    count of central directory signatures in the file, which is at least the count of entries whatever its
    end records declare. The file is at most :data:`MAX_HEAD_BYTES`, read in chunks."""
    count, carry = 0, b""
    handle.seek(0)
    while chunk := handle.read(_READ_CHUNK):
        window = carry + chunk
        count += window.count(_CENTRAL_ENTRY)
        carry = window[1 - len(_CENTRAL_ENTRY) :]  # too short to hold a whole signature: none counted twice
    handle.seek(0)
    if count > MAX_ZIP_ENTRIES:
        raise ModelLoadError(
            f"{where} holds {count:,} zip entries, over the {MAX_ZIP_ENTRIES:,} a head's file could need; "
            f"check {flag}"
        )


class Readable(Protocol):
    """What :func:`read_at_most` reads: a binary stream (a zip member, a file)."""

    def read(self, size: int = -1, /) -> bytes: ...


def read_at_most(stream: Readable, limit: int) -> bytes | None:
    """All of ``stream`` if it holds at most ``limit`` bytes, else None once it has given more: read in
    chunks, so a stream that never ends (a zip member inflating past what it declares) costs the limit."""
    buffer = bytearray()
    while len(buffer) <= limit:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - len(buffer)))
        if not chunk:
            return bytes(buffer)
        buffer += chunk
    return None


def _read_zip(name: str, path: Path, flag: str) -> dict[str, torch.Tensor]:
    with path.open("rb") as handle:
        _check_entries(handle, str(path), flag)
        with zipfile.ZipFile(handle) as archive:
            members = archive.namelist()
            weights = sorted(
                m for m in members if m.lower().endswith((".pth", ".pt", ".bin", ".safetensors"))
            )
            if weights:
                member = archive.getinfo(weights[0])
                where = f"{path}: {member.filename}"
                if member.file_size > MAX_HEAD_BYTES:
                    raise ModelLoadError(
                        f"{where} declares {member.file_size:,} bytes inflated, over {_bound()}; check {flag}"
                    )
                with archive.open(member) as stream:
                    # Declared sizes lie in a hostile zip: the bytes inflated are counted as they come.
                    data = read_at_most(stream, MAX_HEAD_BYTES)
                if data is None:
                    raise ModelLoadError(
                        f"{where} inflates past {_bound()} (it declares {member.file_size:,} bytes); "
                        f"check {flag}"
                    )
                if member.filename.lower().endswith(".safetensors"):
                    from safetensors.torch import load

                    return dict(load(data))
                return _read_torch(name, data, where, flag)
    if any(m.endswith("saved_model.pb") for m in members):
        raise ModelLoadError(
            f"{path} is a Keras SavedModel (LAION's original AutoKeras export), which needs TensorFlow; "
            f"pass {flag} the PyTorch port instead (clip_autokeras_binary_nsfw.pth, in the zip NeMo Curator "
            f"downloads) or a safetensors state dict"
        )
    raise ModelLoadError(
        f"{path} holds no {name} head weights (.pth, .pt, .bin or .safetensors); check {flag}"
    )


def _read_torch(name: str, source: Path | bytes, where: str, flag: str) -> dict[str, torch.Tensor]:
    """A torch file's state dict, tensors only. A torch file is a zip whose records torch inflates at the
    sizes they declare (it refuses a record that holds more), so those sizes are checked against the bound."""
    with source.open("rb") if isinstance(source, Path) else io.BytesIO(source) as handle:
        if handle.read(len(_LOCAL_ENTRY)) == _LOCAL_ENTRY:  # what torch.load takes for a zip
            _check_entries(handle, where, flag)
            with zipfile.ZipFile(handle) as records:
                declared = sum(record.file_size for record in records.infolist())
            if declared > MAX_HEAD_BYTES:
                raise ModelLoadError(
                    f"{where}: its records declare {declared:,} bytes, over {_bound()}; check {flag}"
                )
        handle.seek(0)
        try:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:
            # torch's weights-only refusal (an UnpicklingError) advises loading the file with its code run:
            # none of its text is passed on.
            if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
                raise ModelLoadError(_pickled(name, where, str(exc), flag)) from None
            raise
    return _torch_state(state, where, flag)


def _pickled(name: str, where: str, detail: str, flag: str) -> str:
    called = re.search(r"GLOBAL ([\w.]{1,120})", detail)
    what = (
        f"pickled code beyond tensors (it calls {called.group(1)})"
        if called
        else "a pickle of more than tensors"
    )
    return (
        f"cannot read {where}: it holds {what}, which is not loaded, as loading it could run code; pass "
        f"{flag} {HEADS[name].safe_weights}"
    )


def _torch_state(state: Any, where: str, flag: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{where} is not a state dict of tensors; check {flag}")
    return dict(state)
