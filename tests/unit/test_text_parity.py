"""Text towers: the worker's text vectors equal transformers' own text features (L2-normalised, as image
outputs are) for the same strings, and its token ids equal the family's reference processor's.

The checkpoints are tiny and random with tokenizers built offline (a small CLIP BPE vocabulary, a
SentencePiece model trained in memory for SigLIP), saved with save_pretrained and loaded through the real
loading code; the references (the full model and AutoProcessor) are read from the same directories.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.support.kafka_helpers import clean_env
from tests.support.tiny_clip import build_tiny_clip
from tests.support.tiny_siglip import TINY_SIGLIP_TEXT_LENGTH, build_tiny_siglip
from worker.config import load_settings
from worker.errors import ModelLoadError
from worker.inference.embedder import Embedder, ModelSpec, load_embedder
from worker.intake.inputs.text import TextTokenizer
from worker.models.text import TokenizedText, stack
from worker.ops.metrics import WorkerMetrics

TEXTS = [
    "a photo of a dog",
    "A Photo Of A Cat!",
    "two dogs playing in the snow",
    "x",
    # longer than the tiny towers' 16 tokens: truncated, with the end token kept last
    "the quick brown fox jumps over the lazy dog and a cat at the lighthouse at night, two photos of it",
]
# Float32 on the CPU; measured 0.0 (the worker runs the very same modules on the same ids).
MAX_ABS_DIFF = 1e-6


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Path], Path]
    model: str
    # How the family's reference tokenises for its model: CLIP's processor as documented (pad to the
    # longest, truncated to the context); SigLIP's as it was trained and as transformers' zero-shot pipeline
    # calls it (padding="max_length", 64 on published checkpoints, the tiny tower's 16 here).
    reference_options: dict[str, Any]
    # Whether the model takes the tokenizer's attention mask: SigLIP was trained without one.
    takes_mask: bool


FAMILIES = [
    Family("CLIP", build_tiny_clip, "CLIPModel", {"padding": True, "truncation": True}, takes_mask=True),
    Family(
        "SigLIP",
        build_tiny_siglip,
        "SiglipModel",
        {"padding": "max_length", "max_length": TINY_SIGLIP_TEXT_LENGTH, "truncation": True},
        takes_mask=False,
    ),
]


@dataclass(frozen=True)
class Loaded:
    family: Family
    directory: Path
    embedder: Embedder


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    family: Family = request.param
    directory = family.build(tmp_path_factory.mktemp(family.name))
    embedder = load_embedder(ModelSpec(model=str(directory), device="cpu", dtype="float32"), texts=True)
    return Loaded(family, directory, embedder)


def reference_inputs(loaded: Loaded, texts: list[str]) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(loaded.directory)
    return processor(text=texts, return_tensors="pt", **loaded.family.reference_options)


def reference_vectors(loaded: Loaded, texts: list[str]) -> np.ndarray:
    import transformers

    model = getattr(transformers, loaded.family.model).from_pretrained(loaded.directory).eval()
    inputs = reference_inputs(loaded, texts)
    if not loaded.family.takes_mask:
        inputs = {"input_ids": inputs["input_ids"]}
    with torch.inference_mode():
        features = model.get_text_features(**inputs).pooler_output
    vectors: np.ndarray = torch.nn.functional.normalize(features, dim=-1).numpy()
    return vectors


def test_text_vectors_equal_the_reference_models_text_features(loaded: Loaded):
    assert loaded.embedder.family.name == loaded.family.name
    ours = loaded.embedder.embed_texts(TEXTS)
    reference = reference_vectors(loaded, TEXTS)
    assert ours.shape == (len(TEXTS), loaded.embedder.dim), "texts embed into the images' space"
    assert float(np.abs(ours - reference).max()) <= MAX_ABS_DIFF
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    cosines = ours @ ours.T
    assert cosines[0, 2] < 0.999, "different texts get different vectors (the tower reads the ids)"


def test_token_ids_equal_the_family_reference_processor(loaded: Loaded):
    tower = loaded.embedder.text
    assert tower is not None
    ours = tower.tokenize(TEXTS)
    reference = reference_inputs(loaded, TEXTS)
    ids = reference["input_ids"].numpy()
    mask = reference["attention_mask"].numpy()
    width = ids.shape[1]
    assert all(text.ids.shape == (tower.length,) for text in ours), "every text padded to one length"
    assert np.array_equal(np.stack([text.ids for text in ours])[:, :width], ids)
    assert np.array_equal(np.stack([t.mask for t in ours if t.mask is not None])[:, :width], mask)
    padding = np.stack([text.ids for text in ours])[:, width:]
    assert np.all(padding == tower.tokenizer.pad_token_id), "beyond the reference's width, only padding"
    long = ours[-1]
    assert long.ids[-1] == tower.tokenizer.eos_token_id, "a truncated text still ends with the end token"


def test_a_text_embeds_the_same_alone_as_in_any_batch(loaded: Loaded):
    together = loaded.embedder.embed_texts(TEXTS)
    alone = np.stack([loaded.embedder.embed_texts([text])[0] for text in TEXTS])
    assert float(np.abs(together - alone).max()) <= 1e-6


def test_a_clip_batch_is_cut_to_its_longest_text_and_embeds_as_when_padded_in_full(loaded: Loaded):
    tower = loaded.embedder.text
    assert tower is not None
    short = tower.tokenize(["a photo of a dog", "x"])
    ids, mask = stack(short, tower.trim_padding)
    if loaded.family.name == "SigLIP":
        assert not tower.trim_padding and ids.shape[1] == tower.length, "SigLIP's tower reads its padding"
        return
    assert tower.trim_padding and ids.shape[1] == int(short[0].mask.sum()) < tower.length  # type: ignore[union-attr]
    assert mask is not None and bool(mask[:, -1].any()), "nothing any text attends to is cut"
    full_ids, full_mask = stack(short)
    with torch.inference_mode():
        cut = torch.nn.functional.normalize(tower.features(ids, mask), dim=-1)
        padded = torch.nn.functional.normalize(tower.features(full_ids, full_mask), dim=-1)
    assert float((cut - padded).abs().max()) <= MAX_ABS_DIFF


def test_the_intake_handler_tokenises_like_the_tower(loaded: Loaded):
    from worker.messages import Request

    tower = loaded.embedder.text
    assert tower is not None
    handler = TextTokenizer(tower, WorkerMetrics())
    try:
        slots = handler.submit([Request(f"t{i}", text=text) for i, text in enumerate(TEXTS)])
        results = [slot.future.result(timeout=10)[slot.index] for slot in slots]
    finally:
        handler.shutdown()
    for result, expected in zip(results, tower.tokenize(TEXTS), strict=True):
        assert isinstance(result, TokenizedText) and np.array_equal(result.ids, expected.ids)


def test_without_texts_the_text_tower_is_not_loaded(loaded: Loaded):
    images_only = load_embedder(ModelSpec(model=str(loaded.directory), device="cpu", dtype="float32"))
    assert images_only.text is None
    with pytest.raises(RuntimeError, match="--texts"):
        images_only.embed_texts(["a dog"])
    assert loaded.embedder.text is not None
    text_parameters = sum(p.numel() for p in loaded.embedder.text.model.parameters())
    assert text_parameters > 0 and images_only.parameters == loaded.embedder.parameters


def test_query_prints_the_workers_text_vector(loaded: Loaded):
    command = ["query", "a photo of a dog", "--model", str(loaded.directory), "--device", "cpu", "--full"]
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *command, "--log-level", "warning"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["model"] == str(loaded.directory) and shown["family"] == loaded.family.name
    assert shown["dim"] == loaded.embedder.dim and abs(shown["norm"] - 1.0) < 1e-5
    expected = loaded.embedder.embed_texts(["a photo of a dog"])[0]
    assert np.allclose(shown["embedding"], expected, atol=1e-6)
    assert shown["first"] == pytest.approx(list(expected[:8]), abs=1e-5)


def test_a_checkpoint_without_a_tokenizer_is_refused_with_texts_only(tmp_path: Path):
    directory = build_tiny_clip(tmp_path / "clip")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()
    spec = ModelSpec(model=str(directory), device="cpu", local_files_only=True)
    assert load_embedder(spec).text is None
    with pytest.raises(ModelLoadError, match=r"tokenizer of .* has no tokenizer files"):
        load_embedder(spec, texts=True)


def test_texts_setting_loads_the_text_tower_in_the_worker(tmp_path: Path):
    from worker.loop.service import load_model

    directory = build_tiny_clip(tmp_path / "clip")
    settings = load_settings({"model": str(directory), "device": "cpu", "texts": True}, environ={})
    embedder = load_model(settings, WorkerMetrics())
    assert embedder.text is not None and embedder.embed_texts(["a dog"]).shape == (1, embedder.dim)


@pytest.mark.parametrize(("resize", "decode"), [("device", "device"), ("torch", "pil")])
def test_texts_and_images_through_the_loop_on_each_image_path(loaded: Loaded, resize: str, decode: str):
    # --resize device and --decode device are image paths: texts in the same stream still reach the text
    # tower, and come out as the tower embeds them alone.
    from tests.unit.test_pipeline import TP, add_images, build, run_until, running
    from tests.unit.test_texts import add_texts, outputs_of

    pipeline, consumer, producer = build(
        embedder=loaded.embedder,  # type: ignore[arg-type]
        texts=True,
        resize=resize,
        decode=decode,
    )
    add_texts(consumer, TEXTS[:2])
    add_images(consumer, 3)
    add_texts(consumer, TEXTS[2:], prefix="more")
    with running(pipeline):
        run_until(pipeline, lambda: consumer.committed.get(TP) == 3 + len(TEXTS), timeout_s=60)
    outputs = outputs_of(producer)
    ids = ["txt-0", "txt-1"] + [f"more-{i}" for i in range(len(TEXTS) - 2)]
    ours = np.stack([outputs[i]["embedding"] for i in ids])
    assert float(np.abs(ours - loaded.embedder.embed_texts(TEXTS)).max()) <= 1e-6
    assert [outputs[f"img-{i}"]["kind"] for i in range(3)] == ["image"] * 3


def test_siglip_text_vectors_ignore_the_tokenizers_attention_mask(tmp_path: Path):
    """transformers 5's SigLIP tokenizer returns a mask; with it the vectors differ from how SigLIP was
    trained. The worker's vectors are those of the ids alone."""
    import transformers

    directory = build_tiny_siglip(tmp_path / "siglip")
    embedder = load_embedder(ModelSpec(model=str(directory), device="cpu", dtype="float32"), texts=True)
    processor = transformers.AutoProcessor.from_pretrained(directory)
    model = transformers.SiglipModel.from_pretrained(directory).eval()
    inputs = processor(
        text=["a dog", "a photo of a cat on a mat"],
        return_tensors="pt",
        padding="max_length",
        max_length=TINY_SIGLIP_TEXT_LENGTH,
        truncation=True,
    )
    with torch.inference_mode():
        masked = model.get_text_features(**inputs).pooler_output
        unmasked = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
    assert float((masked - unmasked).abs().max()) > 1e-4, (
        "the mask must matter for this test to mean anything"
    )
    ours = embedder.embed_texts(["a dog", "a photo of a cat on a mat"])
    reference = torch.nn.functional.normalize(unmasked, dim=-1).numpy()
    assert float(np.abs(ours - reference).max()) <= MAX_ABS_DIFF
