"""Our preprocessing against the reference: transformers' CLIPImageProcessor with the PIL backend."""

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from worker.devtools.samples import jpeg_corpus, sample_images
from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import ImageLimits, Preprocessing, decode_and_preprocess, load_rgb, preprocess
from worker.inference.embedder import Embedder

# resize=pil is the reference itself: measured 0 to 4.8e-7 (float32 rounding of our fused normalisation).
PIL_MAX_ABS_DIFF = 1e-5
# resize=torch differs from PIL by at most 1 uint8 level on ~0.15% of pixels: 1/255/min(std) = 0.0150.
TORCH_MAX_ABS_DIFF = 0.016
# resize=device (float bicubic on the model's device; here the CPU) is within 3 uint8 levels on ~2% of
# pixels: measured max 0.044 on these samples.
DEVICE_MAX_ABS_DIFF = 0.05
SAMPLES = sample_images(24, seed=5)


def reference_processor() -> Any:
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil()
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(use_fast=False)


@pytest.fixture(scope="module")
def reference():
    return reference_processor()


@pytest.mark.parametrize("resize", ["pil", "torch"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_matches_clip_image_processor(sample, resize, reference):
    image = load_rgb(sample.data, ImageLimits())
    ours = preprocess(image, Preprocessing(resize=resize))
    theirs = reference(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    difference = float(np.abs(ours - theirs).max())
    bound = PIL_MAX_ABS_DIFF if resize == "pil" else TORCH_MAX_ABS_DIFF
    assert difference <= bound, f"{sample.name} resize={resize}: max abs diff {difference}"


def test_torch_resize_embeds_like_the_reference(tiny_embedder: Embedder):
    images = [s.data for s in SAMPLES] + jpeg_corpus(8, 640, 480)
    params = tiny_embedder.preprocessing
    vectors = {
        mode: tiny_embedder.embed(
            np.stack([decode_and_preprocess(d, ImageLimits(), replace(params, resize=mode)) for d in images])
        )
        for mode in ("pil", "torch")
    }
    cosine = np.sum(vectors["pil"] * vectors["torch"], axis=1)
    assert cosine.min() >= 0.9999


def test_jpeg_draft_decodes_large_jpegs_smaller_and_embeds_alike(tiny_embedder: Embedder):
    large = jpeg_corpus(4, 1600, 1200, 99)
    drafted = load_rgb(large[0], ImageLimits(), draft_shortest_side=224)
    assert drafted.size == (400, 300), "1/4 scale keeps the shortest side at least 224"
    params = tiny_embedder.preprocessing
    assert load_rgb(large[0], ImageLimits(), draft_shortest_side=params.size).size[1] >= params.size
    full = np.stack([decode_and_preprocess(d, ImageLimits(), replace(params, resize="torch")) for d in large])
    fast = np.stack(
        [
            decode_and_preprocess(d, ImageLimits(), replace(params, resize="torch", jpeg_draft=True))
            for d in large
        ]
    )
    cosine = np.sum(tiny_embedder.embed(full) * tiny_embedder.embed(fast), axis=1)
    assert cosine.min() >= 0.999
    small = jpeg_corpus(1, 400, 300)[0]  # half scale would drop below 224 on the short side: full decode
    assert load_rgb(small, ImageLimits(), draft_shortest_side=224).size == (400, 300)


def test_device_resize_matches_the_reference_and_embeds_like_it(reference, tiny_embedder: Embedder):
    datas = [s.data for s in SAMPLES] + jpeg_corpus(6, 640, 480) + jpeg_corpus(2, 1600, 1200)
    params = Preprocessing(resize="device")
    decoded = [decode_and_preprocess(d, ImageLimits(), params) for d in datas]
    assert all(array.dtype == np.uint8 and array.ndim == 3 for array in decoded)
    ours = preprocess_on_device(decoded, params, torch.device("cpu")).numpy()
    theirs = np.stack(
        [reference(images=load_rgb(d, ImageLimits()), return_tensors="np")["pixel_values"][0] for d in datas]
    )
    assert float(np.abs(ours - theirs).max()) <= DEVICE_MAX_ABS_DIFF

    tiny = tiny_embedder.preprocessing
    on_device = tiny_embedder.embed_decoded(
        [decode_and_preprocess(d, ImageLimits(), replace(tiny, resize="device")) for d in datas]
    )
    pil = tiny_embedder.embed(
        np.stack([decode_and_preprocess(d, ImageLimits(), replace(tiny, resize="pil")) for d in datas])
    )
    assert np.sum(on_device * pil, axis=1).min() >= 0.9999
