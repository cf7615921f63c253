"""Our preprocessing against the reference: transformers' CLIPImageProcessor with the PIL backend."""

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from worker.embedder import Embedder
from worker.images import ImageLimits, Preprocessing, decode_and_preprocess, load_rgb, preprocess
from worker.samples import jpeg_corpus, sample_images

# resize=pil is the reference itself: measured 0 to 4.8e-7 (float32 rounding of our fused normalisation).
PIL_MAX_ABS_DIFF = 1e-5
# resize=torch differs from PIL by at most 1 uint8 level on ~0.15% of pixels: 1/255/min(std) = 0.0150.
TORCH_MAX_ABS_DIFF = 0.016
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
