"""``--decode device``: which images the device gets, and what happens when it refuses one.

On this CPU machine torchvision's CPU ``decode_jpeg`` (libjpeg-turbo) stands in for nvJPEG; the same code
runs nvJPEG on a GPU (``tests/gpu`` measures its parity there).
"""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.bad_inputs import bad_requests
from tests.support.hostile import _exif_orientation
from worker.devtools.samples import jpeg_corpus, sample_images, scene
from worker.errors import RejectedRecord, RejectReason
from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only
from worker.imaging.host import (
    EncodedJpeg,
    ImageLimits,
    Preprocessing,
    decode_and_preprocess,
    device_decodable,
    load_rgb,
    prepare,
)
from worker.inference.embedder import Embedder
from worker.messages import decode_request

CPU = torch.device("cpu")
LIMITS = ImageLimits()


def jpeg(width: int = 320, height: int = 240, **options: object) -> bytes:
    buffer = io.BytesIO()
    scene(width, height, 4).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def test_baseline_rgb_and_grey_jpegs_go_to_the_device_everything_else_stays_on_the_host():
    chosen = {s.name: device_decodable(s.data, LIMITS) for s in sample_images(12, seed=5)}
    on_device = {name for name, found in chosen.items() if found is not None}
    assert on_device == {"sample-0000.jpg", "sample-0006.gray.jpg"}, "CMYK, EXIF-rotated and non-JPEGs stay"
    found = chosen["sample-0000.jpg"]
    assert found is not None and (found.width, found.height) == (640, 480)


@pytest.mark.parametrize(
    "data",
    [
        jpeg(progressive=True),
        _exif_orientation(6),
        jpeg()[:-2],  # no end-of-image marker: truncated
        jpeg()[: len(jpeg()) // 2],
    ],
    ids=["progressive", "exif-rotated", "no-end-marker", "truncated"],
)
def test_jpegs_the_device_may_get_wrong_are_decoded_on_the_host(data):
    assert device_decodable(data, LIMITS) is None


def test_a_jpeg_with_trailing_padding_still_goes_to_the_device():
    assert device_decodable(jpeg() + b"\0\0\0", LIMITS) is not None


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_bad_images_get_the_host_decoders_reasons(case):
    _key, value, reason = case
    try:
        request = decode_request(value)
    except RejectedRecord:
        return  # an envelope error: never reaches decoding
    assert request.image is not None
    with pytest.raises(RejectedRecord) as caught:
        prepare(request.image, LIMITS, Preprocessing(resize="device", decode="device"))
    assert caught.value.reason == reason


def test_device_pixels_equal_the_host_decoders():
    datas = [s.data for s in sample_images(24, seed=5)] + jpeg_corpus(4, 640, 480)
    prepared = [prepare(d, LIMITS, Preprocessing(resize="device", decode="device")) for d in datas]
    assert sum(isinstance(p, EncodedJpeg) for p in prepared) == 8
    decoded = DeviceJpegDecoder(CPU, LIMITS).materialise(prepared)
    for data, pixels in zip(datas, decoded, strict=True):
        host = np.asarray(load_rgb(data, LIMITS))
        assert not isinstance(pixels, RejectedRecord)
        as_hwc = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else pixels
        # libjpeg-turbo on both sides here; nvJPEG's IDCT differs by a level or two (tests/gpu bounds it).
        np.testing.assert_array_equal(as_hwc, host)


class Refusing:
    """A stand-in ``decode_jpeg`` that refuses chosen streams, as nvJPEG refuses what it cannot decode."""

    def __init__(self, refused: set[bytes]) -> None:
        from torchvision.io import decode_jpeg

        self._real = decode_jpeg
        self.refused = refused
        self.calls: list[int] = []

    def __call__(self, data: list[torch.Tensor], **options: object) -> list[torch.Tensor]:
        self.calls.append(len(data))
        if any(bytes(tensor.numpy()) in self.refused for tensor in data):
            raise RuntimeError("nvjpeg: unsupported stream")
        return list(self._real(data, **options))


def test_a_refused_jpeg_is_decoded_on_the_host_and_the_rest_stay_on_the_device():
    good, refused = jpeg_corpus(2, 320, 240, 7)
    stand_in = Refusing({refused})
    decoder = DeviceJpegDecoder(CPU, LIMITS, decode_jpeg=stand_in)
    host_array = np.zeros((5, 5, 3), np.uint8)
    first, second = EncodedJpeg(good, 320, 240), EncodedJpeg(refused, 320, 240)
    results = decoder.materialise([first, host_array, second])
    assert stand_in.calls == [2, 1, 1], "one batched call, then one call per image to find the refused one"
    assert isinstance(results[0], torch.Tensor) and results[1] is host_array
    assert isinstance(results[2], np.ndarray)
    np.testing.assert_array_equal(results[2], np.asarray(load_rgb(refused, LIMITS)))
    assert decoder.fallbacks == 1


def test_an_image_neither_device_nor_host_can_decode_is_rejected_with_the_host_reason():
    data = jpeg()
    truncated = data[: len(data) // 2]  # device_decodable keeps these on the host; here one slips through
    stand_in = Refusing({truncated})
    decoder = DeviceJpegDecoder(CPU, LIMITS, decode_jpeg=stand_in)
    result = decoder.materialise([EncodedJpeg(truncated, 320, 240)])[0]
    assert isinstance(result, RejectedRecord) and result.reason == RejectReason.TRUNCATED_IMAGE


def test_a_decode_that_disagrees_with_the_header_is_not_trusted():
    data = jpeg(320, 240)
    decoder = DeviceJpegDecoder(CPU, LIMITS)
    result = decoder.materialise([EncodedJpeg(data, 300, 240)])[0]
    assert isinstance(result, np.ndarray) and result.shape == (240, 320, 3)
    assert decoder.fallbacks == 1


def test_device_decoding_embeds_like_the_reference_path(tiny_embedder: Embedder):
    datas = [s.data for s in sample_images(12, seed=5)] + jpeg_corpus(6, 640, 480)
    tiny = tiny_embedder.preprocessing
    device_params = replace(tiny, resize="device", decode="device")
    prepared = [prepare(d, LIMITS, device_params) for d in datas]
    pixels = DeviceJpegDecoder(CPU, LIMITS).materialise(prepared)
    assert not any(isinstance(p, RejectedRecord) for p in pixels)
    on_device = tiny_embedder.embed_decoded(decoded_only(pixels))
    reference = tiny_embedder.embed(
        np.stack([decode_and_preprocess(d, LIMITS, replace(tiny, resize="pil")) for d in datas])
    )
    assert np.sum(on_device * reference, axis=1).min() >= 0.9999


def test_missing_torchvision_stops_startup_with_the_fix(monkeypatch):
    import sys

    from worker.errors import StartupError
    from worker.imaging.device_decode import load_jpeg_decoder

    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(StartupError, match=r"clip-worker\[gpu-decode\]"):
        load_jpeg_decoder()


def test_grey_jpegs_come_back_as_three_equal_channels():
    buffer = io.BytesIO()
    Image.fromarray(np.arange(240 * 320, dtype=np.uint32).reshape(240, 320).astype(np.uint8), "L").save(
        buffer, format="JPEG"
    )
    found = device_decodable(buffer.getvalue(), LIMITS)
    assert found is not None
    pixels = DeviceJpegDecoder(CPU, LIMITS).materialise([found])[0]
    assert isinstance(pixels, torch.Tensor) and pixels.shape == (3, 240, 320)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
