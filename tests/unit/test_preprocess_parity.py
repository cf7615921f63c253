"""Our preprocessing against the reference: transformers' CLIPImageProcessor with the PIL backend."""

from typing import Any

import numpy as np
import pytest

from worker.images import ImageLimits, Preprocessing, load_rgb, preprocess
from worker.samples import sample_images

# Measured: 0 to ~5e-7 (float32 rounding of rescale-then-normalise versus our fused form).
MAX_ABS_DIFF = 1e-5


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


@pytest.mark.parametrize("sample", sample_images(24, seed=5), ids=lambda s: s.name)
def test_matches_clip_image_processor(sample, reference, record_property):
    image = load_rgb(sample.data, ImageLimits())
    ours = preprocess(image, Preprocessing())
    theirs = reference(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    difference = float(np.abs(ours - theirs).max())
    record_property("max_abs_diff", difference)
    assert difference <= MAX_ABS_DIFF, f"{sample.name}: max abs diff {difference}"
