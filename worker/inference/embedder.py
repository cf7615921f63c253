"""Run a model family's towers: turn preprocessed batches into unit embeddings, batched on its device.

The family (:mod:`worker.models`) loads the towers and says what its preprocessing and its image and text
features are; this module runs them: device, dtype, CUDA streams, pinned copies, compilation (of the vision
tower: the text tower, loaded only with ``--texts``, always runs eagerly).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from worker.errors import ModelLoadError, StartupError
from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import Preprocessing
from worker.models import RANDOM_PREFIX, ModelFamily, ModelSpec, family_of_model, select_family
from worker.models.heads import ScoreHeads
from worker.models.text import TextTower, TokenizedText, stack

__all__ = ["RANDOM_PREFIX", "Embedder", "ModelSpec", "PendingEmbeddings", "load_embedder"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torch.compile options behind --compile: inductor's fused kernels, plus CUDA graphs that replay the whole
# forward pass with one launch (fixed shapes only, hence the padding to one batch size). The graphs are
# inductor's plain ones, not its CUDA-graph trees ("reduce-overhead"): the trees keep thread-local state, so a
# graph recorded on the thread that compiled can fail when the inference thread replays or re-records it.
COMPILE_OPTIONS: dict[str, dict[str, Any]] = {
    "inductor": {},
    "cuda-graphs": {"triton.cudagraphs": True, "triton.cudagraph_trees": False},
}
_WARMUP_CALLS = 3  # CUDA graphs are recorded on the second or third call, not the first


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks the first GPU when CUDA is available, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"--device {requested}: CUDA is not available here; use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StartupError(
                f"--device {requested}: only {torch.cuda.device_count()} GPU(s) visible; pick a lower index"
            )
    return device


def default_decode_workers() -> int:
    """One decode thread per CPU core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


LARGE_MODEL_PARAMETERS = 50_000_000


def configure_cpu_threads(inference_threads: int, decode_workers: int, model_parameters: int = 0) -> int:
    """Set torch's intra-op threads; returns the count.

    Decode threads and inference share the cores: torch's OpenMP threads spin while waiting, so giving
    them cores the decoders need slows both. A large model on the CPU is the other way round: its forward
    pass is the bottleneck and gets every core (both measured: see the performance docs).
    """
    cores = os.cpu_count() or 1
    if inference_threads:
        threads = inference_threads
    elif model_parameters > LARGE_MODEL_PARAMETERS:
        threads = cores
    else:
        threads = max(1, cores - decode_workers)
    torch.set_num_threads(threads)
    return threads


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU (fp16 where bf16 is unsupported) and float32 on CPU."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class PendingEmbeddings:
    """Embeddings whose work is queued on the device: :meth:`result` waits for them.

    On a GPU the forward pass and the copy back to pinned host memory run asynchronously, so the caller can
    queue the next batch before it waits for this one; on a CPU the vectors are ready at once.
    """

    def __init__(
        self, vectors: torch.Tensor, ready: torch.cuda.Event | None, scores: torch.Tensor | None = None
    ) -> None:
        self._vectors = vectors
        self._ready = ready
        self._scores = scores

    def result(self) -> np.ndarray:
        """The ``(N, dim)`` float32 unit vectors, once the device has produced them."""
        if self._ready is not None:
            self._ready.synchronize()
        vectors: np.ndarray = self._vectors.numpy()
        return vectors

    def scores(self) -> np.ndarray | None:
        """The ``(N, heads)`` float32 scores of the heads launched with the batch (None without heads), once
        :meth:`result` has returned."""
        return None if self._scores is None else self._scores.numpy()


class Embedder:
    """A loaded vision tower: ``embed(pixels)`` returns L2-normalised float32 embeddings; with a ``text``
    tower (on the same device, in the same dtype), ``embed_texts(texts)`` returns them for texts.

    ``family`` says how to read the tower's output; by default it is found from the tower's own config.
    """

    def __init__(
        self,
        model: Any,
        label: str,
        revision: str,
        preprocessing: Preprocessing,
        device: torch.device,
        dtype: torch.dtype,
        family: ModelFamily | None = None,
        text: TextTower | None = None,
    ) -> None:
        self.model = model
        self.text = text
        self.family = family or family_of_model(model)
        self.label = label
        self.revision = revision
        self.preprocessing = preprocessing
        self.device = device
        self.dtype = dtype
        self.dim = self.family.embedding_dim(model.config)
        self._lock = threading.Lock()
        self._pinned: torch.Tensor | None = None
        self._pinned_copied: torch.cuda.Event | None = None
        self._compiled: Any = None
        self._compiled_batch = 0
        self._compiled_mode = "off"
        self._warm_threads: set[int] = set()  # threads the compiled forward has been warmed up on
        self.graphs_skipped = False  # --compile cuda-graphs compiled, but inductor ran it without graphs
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def view(self) -> Embedder:
        """Another embedder on the same weights, without this one's compiled graph (benchmarks compare)."""
        return Embedder(
            self.model,
            self.label,
            self.revision,
            self.preprocessing,
            self.device,
            self.dtype,
            self.family,
            self.text,
        )

    @property
    def parameters(self) -> int:
        """Number of weights in the vision tower (and its projection or pooling head)."""
        return int(sum(p.numel() for p in self.model.parameters()))

    @property
    def runs_asynchronously(self) -> bool:
        """True on a GPU, where :meth:`launch` returns before the work is done (on a CPU it is done)."""
        return self._stream is not None

    @property
    def is_random(self) -> bool:
        """True when the weights are random: every output says so in its ``model`` field."""
        return self.label.startswith(RANDOM_PREFIX)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a ``(N, 3, H, W)`` float32 batch; returns ``(N, dim)`` float32 unit vectors."""
        return self.launch(pixels).result()

    def embed_decoded(self, images: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """Embed uint8 RGB images (host ``(H, W, 3)`` arrays or ``(3, H, W)`` tensors on this embedder's
        device), preprocessing them on the device."""
        return self.launch_decoded(images).result()

    def launch(
        self, pixels: np.ndarray | Sequence[np.ndarray], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        """Queue :meth:`embed`'s work on the device and return without waiting for it (on a CPU the work is
        done by the time this returns). ``pixels`` is a batch or a list of ``(3, H, W)`` images, which on a
        GPU are stacked straight into the pinned buffer (one host copy instead of two). ``heads`` score the
        batch's embeddings in the same pass (see :meth:`PendingEmbeddings.scores`)."""
        with self._lock, torch.inference_mode(), self.on_own_stream():
            if self._stream is None:
                batch = pixels if isinstance(pixels, np.ndarray) else np.stack(list(pixels))
                return self._forward(torch.from_numpy(batch), heads)
            # GPU: copy through a reused pinned buffer, so the host-to-device copy is asynchronous.
            pinned = self._pin(pixels)
            on_device = pinned.to(self.device, non_blocking=True)
            self._pinned_copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._pinned_copied.record(self._stream)
            return self._forward(on_device, heads)

    def launch_decoded(
        self, images: Sequence[np.ndarray | torch.Tensor], heads: ScoreHeads | None = None
    ) -> PendingEmbeddings:
        """Queue :meth:`embed_decoded`'s work on the device and return without waiting for it."""
        with self._lock, torch.inference_mode(), self.on_own_stream():
            return self._forward(preprocess_on_device(images, self.preprocessing, self.device), heads)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with the text tower; returns ``(N, dim)`` float32 unit vectors."""
        return self.launch_texts(self._text_tower().tokenize(texts)).result()

    def launch_texts(self, texts: Sequence[TokenizedText]) -> PendingEmbeddings:
        """Queue the text tower's work for tokenised texts and return without waiting for it."""
        tower = self._text_tower()
        ids, mask = stack(texts, tower.trim_padding)
        with self._lock, torch.inference_mode(), self.on_own_stream():
            ids = ids.to(self.device, non_blocking=True)
            mask = None if mask is None else mask.to(self.device, non_blocking=True)
            features = tower.features(ids, mask)
            return self._read_back(torch.nn.functional.normalize(features.float(), dim=-1))

    def _text_tower(self) -> TextTower:
        if self.text is None:
            raise RuntimeError("this embedder has no text tower (the worker embeds texts only with --texts)")
        return self.text

    def on_own_stream(self) -> contextlib.AbstractContextManager[Any]:
        """Make this embedder's CUDA stream current (a no-op on a CPU); device decoding runs on it too."""
        # GPU work runs on this embedder's own CUDA stream, so it never waits behind another stream's work.
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """The forward pass alone: a ``(N, 3, H, W)`` batch already on this embedder's device to ``(N, dim)``
        float32 unit vectors there, queued on the current stream (the model section of the bench times it).
        The caller holds inference mode and, on a GPU, :meth:`on_own_stream`."""
        count = batch.shape[0]
        model = self.model
        if self._compiled is not None and count <= self._compiled_batch:
            # One shape for the compiled graph: a partial batch is padded with zeros, and only its own rows
            # are read back (rows of a ViT batch never mix).
            if count < self._compiled_batch:
                padding = batch.new_zeros((self._compiled_batch - count, *batch.shape[1:]))
                batch = torch.cat([batch, padding])
            model = self._compiled
        try:
            if model is self._compiled:
                self._warm_up_on_this_thread()
            output = self.family.image_features(model, batch.to(self.dtype))
        except torch.cuda.OutOfMemoryError:
            if model is self._compiled:
                log.warning("the compiled forward pass ran out of GPU memory; running eagerly from now on")
                self._compiled = None
            raise
        return torch.nn.functional.normalize(output[:count].float(), dim=-1)

    def _forward(self, batch: torch.Tensor, heads: ScoreHeads | None = None) -> PendingEmbeddings:
        features = self.features(batch)
        # The heads read the float32 unit vectors where they are: one call per batch, on the device.
        scores = heads(features) if heads is not None else None
        return self._read_back(features, scores)

    def _read_back(self, features: torch.Tensor, scores: torch.Tensor | None = None) -> PendingEmbeddings:
        if self._stream is None:
            return PendingEmbeddings(features, None, scores)
        # Read back into pinned memory without waiting; the event says when the vectors are there.
        host = _to_pinned(features)
        host_scores = _to_pinned(scores) if scores is not None else None
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(self._stream)
        return PendingEmbeddings(host, ready, host_scores)

    def compile(self, mode: str, batch_size: int) -> float:
        """Compile the forward pass (``mode`` is a key of :data:`COMPILE_OPTIONS`) for ``batch_size`` images.

        Batches up to that size are padded to it, so the graph is built once; larger ones run eagerly.
        Compiles and warms up before returning, on the calling thread; any other thread that runs the
        forward pass warms it up again on its first batch (inductor keeps compiled CUDA graphs per thread).
        Compiling again for the same mode and size does nothing. Returns the seconds it took.
        """
        if mode == "cuda-graphs" and self.device.type != "cuda":
            raise StartupError("--compile cuda-graphs needs a GPU; use --compile inductor or off on a CPU")
        if self._compiled is not None and (self._compiled_mode, self._compiled_batch) == (mode, batch_size):
            return 0.0
        started = time.perf_counter()
        options = COMPILE_OPTIONS[mode]
        skips_before = _cudagraph_skips()
        self._compiled = torch.compile(self.model, options=options, dynamic=False)
        self._compiled_batch, self._compiled_mode = batch_size, mode
        self._warm_threads.clear()
        with self._lock, torch.inference_mode(), self.on_own_stream():
            self._warm_up_on_this_thread()
        elapsed = time.perf_counter() - started
        log.info("compiled the forward pass (%s, batch %d) in %.1fs", mode, batch_size, elapsed)
        self.graphs_skipped = bool(options.get("triton.cudagraphs")) and _cudagraph_skips() > skips_before
        if self.graphs_skipped:
            log.error(
                "CUDA GRAPHS SKIPPED: inductor compiled the forward pass but will not replay it as a CUDA "
                "graph (run with TORCH_LOGS=cudagraphs for its reason); --compile %s runs as plain inductor",
                mode,
            )
        return elapsed

    def _warm_up_on_this_thread(self) -> None:
        """Run the compiled forward pass a few times on zeros, once per thread, before it embeds real images:
        CUDA graphs are recorded (and kept) per thread, on the current stream."""
        thread = threading.get_ident()
        if thread in self._warm_threads:
            return
        crop = self.preprocessing.crop
        zeros = torch.zeros((self._compiled_batch, 3, crop, crop), dtype=self.dtype, device=self.device)
        started = time.perf_counter()
        for _ in range(_WARMUP_CALLS):
            self._compiled(pixel_values=zeros)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._warm_threads.add(thread)
        log.info(
            "warmed up the compiled forward pass on thread %s in %.1fs",
            threading.current_thread().name,
            time.perf_counter() - started,
        )

    def _pin(self, pixels: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        if self._pinned_copied is not None:
            # The previous batch's copy out of this buffer may still be queued behind a forward pass.
            self._pinned_copied.synchronize()
        count = len(pixels)
        image_shape = tuple(pixels[0].shape)
        if self._pinned is None or self._pinned.shape[0] < count or self._pinned.shape[1:] != image_shape:
            self._pinned = torch.empty((count, *image_shape), dtype=torch.float32, pin_memory=True)
        view = self._pinned[:count]
        if isinstance(pixels, np.ndarray):
            view.copy_(torch.from_numpy(pixels))
        else:
            np.stack(list(pixels), out=view.numpy())
        return view

    def release_cached_memory(self) -> None:
        """Return cached GPU blocks after an out-of-memory error, before the batch is retried smaller."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def auto_batch_size(self, ceiling: int = 512) -> int:
        """A batch size that fits free GPU memory (probed with a small batch); 32 on CPU."""
        if self.device.type != "cuda":
            return 32
        size = self.preprocessing.crop
        probe = 8
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.embed(np.zeros((probe, 3, size, size), dtype=np.float32))
        per_image = max(1, (torch.cuda.max_memory_allocated(self.device) - before) // probe)
        free, _total = torch.cuda.mem_get_info(self.device)
        fitting = int(0.6 * free // per_image)
        chosen = max(8, min(ceiling, fitting // 8 * 8))
        log.info(
            "auto batch size %d (%.1f MiB per image, %.1f GiB free)", chosen, per_image / 2**20, free / 2**30
        )
        return chosen


def load_embedder(spec: ModelSpec, texts: bool = False) -> Embedder:
    """Load the model described by ``spec`` with its family (and, with ``texts``, its text tower and
    tokenizer); raises :class:`ModelLoadError` with a one-line fix."""
    from transformers.utils import logging as hf_logging

    # The text tower of a full checkpoint is skipped on purpose; its load report would be noise.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    family = select_family(spec)
    loaded = family.load(spec)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    dim = family.embedding_dim(model.config)
    log.info("model %s (%s) loaded on %s as %s (dim %d)", loaded.label, family.name, device, dtype, dim)
    text = _load_text(spec, family, device, dtype, dim) if texts else None
    return Embedder(model, loaded.label, loaded.revision, loaded.preprocessing, device, dtype, family, text)


def _load_text(
    spec: ModelSpec, family: ModelFamily, device: torch.device, dtype: torch.dtype, dim: int
) -> TextTower:
    """The family's text tower on ``device`` in ``dtype``; refused unless it embeds into the images' space."""
    tower = family.load_text(spec)
    model = tower.model.to(device=device, dtype=dtype).eval()
    probe = tower.tokenize(["a"])
    with torch.inference_mode():
        ids, mask = stack(probe)
        text_dim = int(
            tower.read_features(model, ids.to(device), None if mask is None else mask.to(device)).shape[-1]
        )
    if text_dim != dim:
        raise ModelLoadError(
            f"the text tower of {spec.model!r} embeds into {text_dim} dimensions, its images into {dim}: "
            f"not one space; use a checkpoint whose towers match, or drop --texts"
        )
    parameters = sum(p.numel() for p in model.parameters())
    log.info("text tower loaded (%.1fM parameters, %d tokens per text)", parameters / 1e6, tower.length)
    return replace(tower, model=model)


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of a device tensor into new pinned host memory (ready once the stream is)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _cudagraph_skips() -> int:
    """How many compiled graphs inductor has refused to run as CUDA graphs in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
