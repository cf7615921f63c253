"""Hostile inputs: each is embedded or rejected with its reason; fuzzing finds no uncaught exception."""

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.support.hostile import EMBED, hostile_corpus
from worker.devtools.samples import scene
from worker.errors import RejectedRecord
from worker.imaging.host import ImageLimits, Preprocessing, decode_and_preprocess
from worker.messages import decode_request, encode_request

LIMITS = ImageLimits(max_pixels=64_000_000, min_side=3)
CORPUS = hostile_corpus()


def outcome(value: bytes) -> str:
    try:
        request = decode_request(value)
        assert request.image is not None
        decode_and_preprocess(request.image, LIMITS, Preprocessing())
    except RejectedRecord as rejected:
        return rejected.reason.value
    return EMBED


def test_corpus_has_at_least_thirty_kinds():
    assert len({case.name for case in CORPUS}) >= 30


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_each_hostile_input_has_its_outcome(case):
    assert outcome(case.value) == case.outcome


def _seed_images() -> list[bytes]:
    picture = scene(48, 32, 2)
    images = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        images.append(buffer.getvalue())
    return images


SEEDS = _seed_images()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
)
def test_mutated_images_never_raise_anything_but_a_rejection(seed, cut, flips):
    data = bytearray(seed[: max(cut, 1)] if cut < len(seed) else seed)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    outcome(encode_request("fuzz", bytes(data)))  # only RejectedRecord may escape, and it is caught


@settings(max_examples=500, deadline=None)
@given(value=st.binary(max_size=2048))
def test_random_record_values_never_raise_anything_but_a_rejection(value):
    outcome(value)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(payload=st.dictionaries(st.sampled_from(["id", "image", "meta", "v", "x"]), json_like, max_size=5))
def test_arbitrary_envelopes_never_raise_anything_but_a_rejection(payload):
    import msgpack

    try:
        value = msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    outcome(value)


def test_pillow_warnings_do_not_escape():
    picture = Image.new("RGB", (8, 8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    assert outcome(encode_request("ok", buffer.getvalue())) == EMBED
