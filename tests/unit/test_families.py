"""Model families: each is chosen from its checkpoint's config, preprocesses like its own reference
processor in transformers (PIL backend) and embeds like the reference model's image features.

Every checkpoint is tiny and random, built in a fixture with save_pretrained and loaded through the real
loading code; the reference processor is read from the same checkpoint directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.support.tiny_clip import TINY_DIM, build_tiny_clip
from tests.support.tiny_siglip import BILINEAR, TINY_SIGLIP_DIM, build_tiny_siglip
from worker.devtools.samples import jpeg_corpus, sample_images
from worker.errors import ModelLoadError
from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only
from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import EncodedJpeg, ImageLimits, decode_and_preprocess, load_rgb, prepare
from worker.inference.embedder import Embedder, ModelSpec, load_embedder
from worker.models import select_family

# Max abs difference on the normalised tensor, per resize path (docs/models.md has the measured
# figures). pil is the reference's own resize: float32 rounding only (measured <= 4.8e-7). torch is within
# 2 uint8 levels (one level is 1/255/std: 0.015 for CLIP's std, 0.0078 for SigLIP's 0.5). device (float
# bicubic or bilinear in one pass, where PIL rounds between its two) is further off when a large image
# shrinks to these tiny 30-32 px inputs: measured up to 0.078 (SigLIP, 10 levels), embeddings unmoved.
MAX_ABS_DIFF = {"pil": 1e-5, "torch": 0.031, "device": 0.08}
MIN_COSINE = {"pil": 0.99999, "torch": 0.9999, "device": 0.9999}
LIMITS = ImageLimits()


@dataclass(frozen=True)
class Kind:
    """A family variant: how to build its tiny checkpoint and what transformers calls its reference."""

    name: str
    family: str
    dim: int
    build: Callable[[Path], Path]
    processor: str
    model: str


KINDS = [
    Kind("clip-224", "CLIP", TINY_DIM, build_tiny_clip, "CLIPImageProcessorPil", "CLIPModel"),
    Kind(
        "clip-336",
        "CLIP",
        TINY_DIM,
        lambda d: build_tiny_clip(d, image_size=336, patch_size=48),
        "CLIPImageProcessorPil",
        "CLIPModel",
    ),
    Kind(
        "openclip",
        "CLIP",
        TINY_DIM,
        lambda d: build_tiny_clip(
            d, hidden_act="gelu", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
        ),
        "CLIPImageProcessorPil",
        "CLIPModel",
    ),
    Kind("siglip", "SigLIP", TINY_SIGLIP_DIM, build_tiny_siglip, "SiglipImageProcessorPil", "SiglipModel"),
    Kind(
        "siglip2-fixed",
        "SigLIP",
        TINY_SIGLIP_DIM,
        lambda d: build_tiny_siglip(d, resample=BILINEAR),
        "SiglipImageProcessorPil",
        "SiglipModel",
    ),
]
IMAGES = [s.data for s in sample_images(16, seed=7)] + jpeg_corpus(4, 640, 480) + jpeg_corpus(2, 900, 120, 3)


@dataclass
class Loaded:
    kind: Kind
    directory: Path
    embedder: Embedder
    reference: Any  # the checkpoint's own image processor, PIL backend
    reference_vectors: np.ndarray  # reference preprocessing -> reference model's image features, normalised


@pytest.fixture(scope="module", params=KINDS, ids=lambda kind: kind.name)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    import transformers

    kind: Kind = request.param
    directory = kind.build(tmp_path_factory.mktemp(kind.name))
    embedder = load_embedder(ModelSpec(model=str(directory), device="cpu"))
    reference = getattr(transformers, kind.processor).from_pretrained(directory)
    full = getattr(transformers, kind.model).from_pretrained(directory).eval()
    pixels = torch.from_numpy(np.stack([reference_pixels(reference, data) for data in IMAGES]))
    with torch.inference_mode():
        output = full.get_image_features(pixel_values=pixels)
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    vectors = torch.nn.functional.normalize(features.float(), dim=-1).numpy()
    return Loaded(kind, directory, embedder, reference, vectors)


def reference_pixels(reference: Any, data: bytes) -> np.ndarray:
    pixels: np.ndarray = reference(images=load_rgb(data, LIMITS), return_tensors="np")["pixel_values"][0]
    return pixels


def ours(embedder: Embedder, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """Our normalised batch of IMAGES on ``resize``'s path, and its embeddings."""
    params = replace(embedder.preprocessing, resize=resize)
    prepared = [decode_and_preprocess(data, LIMITS, params) for data in IMAGES]
    if resize == "device":
        return preprocess_on_device(prepared, params, embedder.device).numpy(), embedder.embed_decoded(
            prepared
        )
    batch = np.stack(prepared)
    return batch, embedder.embed(batch)


def test_the_family_comes_from_the_checkpoint_config(loaded: Loaded):
    assert loaded.embedder.family.name == loaded.kind.family
    assert select_family(ModelSpec(model=str(loaded.directory))) is loaded.embedder.family
    assert loaded.embedder.dim == loaded.kind.dim
    assert loaded.embedder.label == str(loaded.directory)


@pytest.mark.parametrize("resize", ["pil", "torch", "device"])
def test_preprocessing_and_embeddings_match_the_family_reference(loaded: Loaded, resize: str):
    batch, vectors = ours(loaded.embedder, resize)
    theirs = np.stack([reference_pixels(loaded.reference, data) for data in IMAGES])
    assert batch.shape == theirs.shape
    difference = float(np.abs(batch - theirs).max())
    cosine = float(np.sum(vectors * loaded.reference_vectors, axis=1).min())
    print(f"{loaded.kind.name} resize={resize}: max abs diff {difference:.3g}, min cosine {cosine:.7f}")
    assert difference <= MAX_ABS_DIFF[resize], (
        f"{loaded.kind.name} resize={resize}: max abs diff {difference}"
    )
    assert cosine >= MIN_COSINE[resize], f"{loaded.kind.name} resize={resize}: min cosine {cosine}"


def test_device_decoding_embeds_like_the_reference(loaded: Loaded):
    # On this CPU machine torchvision's CPU decode_jpeg stands in for nvJPEG: the same code path.
    params = replace(loaded.embedder.preprocessing, resize="device", decode="device")
    prepared = [prepare(data, LIMITS, params) for data in IMAGES]
    assert any(isinstance(item, EncodedJpeg) for item in prepared)
    decoder = DeviceJpegDecoder(loaded.embedder.device, LIMITS)
    vectors = loaded.embedder.embed_decoded(decoded_only(decoder.materialise(prepared)))
    assert float(np.sum(vectors * loaded.reference_vectors, axis=1).min()) >= MIN_COSINE["device"]


def test_siglip_stretches_even_elongated_jpegs_on_the_device(tmp_path: Path):
    directory = build_tiny_siglip(tmp_path / "siglip")
    embedder = load_embedder(ModelSpec(model=str(directory), device="cpu"))
    strip = jpeg_corpus(1, 2000, 60, 9)[0]
    params = replace(embedder.preprocessing, resize="device", decode="device")
    assert isinstance(prepare(strip, LIMITS, params), EncodedJpeg), "no centre crop: no crop window to cut"
    assert embedder.preprocessing.fit == "stretch" and embedder.preprocessing.filter == "bicubic"


def test_random_weights_for_a_builtin_hub_checkpoint_need_no_download(tmp_path: Path):
    spec = ModelSpec(
        model="google/siglip2-base-patch16-224",
        model_dir=tmp_path,
        local_files_only=True,
        random_weights=True,
        device="cpu",
    )
    embedder = load_embedder(spec)
    assert embedder.is_random and embedder.label == "random:google/siglip2-base-patch16-224"
    assert embedder.dim == 768
    params = embedder.preprocessing
    assert (params.crop, params.fit, params.filter, params.mean) == (224, "stretch", "bilinear", (0.5,) * 3)


def test_naflex_siglip2_is_refused_with_the_fix(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(ModelLoadError) as caught:
        load_embedder(ModelSpec(model=str(tmp_path), device="cpu"))
    message = str(caught.value)
    assert "fixed-resolution" in message and "google/siglip2-base-patch16-224" in message
    assert "\n" not in message


def test_an_unknown_model_type_names_the_supported_ones(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "dinov2"}')
    with pytest.raises(ModelLoadError, match="supported: clip, clip_vision_model, siglip"):
        load_embedder(ModelSpec(model=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("build", [build_tiny_clip, build_tiny_siglip], ids=["clip", "siglip"])
def test_the_model_bench_runs_for_each_family_with_random_weights(
    build: Callable[[Path], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    from worker.cli import main

    directory = build(tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)  # the bench writes its results beside it
    argv = ["bench", "--model", str(directory), "--random-weights", "--sections", "model", "--quick"]
    assert main([*argv, "--seconds", "0.2", "--batch-sizes", "2", "--device", "cpu"]) == 0
    assert "forward pass" in capsys.readouterr().out
