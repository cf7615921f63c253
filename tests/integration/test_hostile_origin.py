"""An origin that misbehaves in every way HTTP allows, end to end with a real broker: every id comes out
exactly once across outputs and dead letters, and every published vector is the vector of the image its
own URI serves. An answer read into the wrong request would publish another image's vector under a right
id; this is what the test is for.

Records go out one step at a time, and a step whose answer brings bytes later (an unasked answer on the
idle connection) waits until those bytes are sent: the next request then finds them on the connection
before it goes, as it would on a real network where nothing can tell it apart from a timing race."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.support.kafka_helpers import collect, create_topics, produce, running_worker, worker_settings
from worker.devtools.origin import ImageOrigin
from worker.devtools.samples import sample_images
from worker.errors import RejectReason
from worker.messages import encode_reference, encode_request

pytestmark = pytest.mark.integration

OK = None  # the step's reference must embed as its own image


def test_no_answer_of_a_hostile_origin_lands_on_the_wrong_request(kafka_bootstrap, tiny_embedder):
    samples = sample_images(40, seed=21)
    names = [sample.name for sample in samples]
    image = iter(names)

    def fresh() -> str:
        return next(image)

    # (path on the origin, the image that path must embed as or None, the reason it must be refused with,
    # how many unasked sends the step makes). Each step is followed by a plain fetch of another image,
    # which is where a shifted answer would show.
    steps: list[tuple[str, str | None, RejectReason | None, int]] = []
    for template, unasked in (
        ("/unsolicited/0/{a}", 1),
        ("/late/0.05/{a}/{b}", 1),
        ("/late/0/{a}/{b}", 1),
        ("/double/{a}/{b}", 0),
        ("/once/{a}", 0),
        ("/continue/{a}", 0),
        ("/chunked/{a}", 0),
        ("/unframed/{a}", 0),
    ):
        a, b = fresh(), fresh()
        steps.append((template.format(a=a, b=b), a, OK, unasked))
    for path in (
        "/many-headers/10000",
        "/many-headers/10000/split",
        f"/fat-header/{1 << 20}",
        "/malformed",
        "/upgrade",
        f"/truncated/{fresh()}",
        f"/reset/{fresh()}",
    ):
        steps.append((path, None, RejectReason.FETCH_FAILED, 0))

    with ImageOrigin(host="127.0.0.2") as origin:
        for sample in samples:
            origin.put(sample.name, sample.data)
        settings = worker_settings(
            kafka_bootstrap,
            batch_size=4,
            fetch_allow_hosts="127.0.0.2",
            fetch_timeout_s=5.0,
            fetch_retries=1,
            fetch_concurrency=4,
        )
        create_topics(settings)
        expected_image: dict[str, str] = {}
        expected_reason: dict[str, str] = {}
        inline = [(f"raw:bytes/{s.name}", encode_request(f"raw:bytes/{s.name}", s.data)) for s in samples]
        with running_worker(settings, tiny_embedder):
            produce(settings, inline)
            unasked_sent = 0
            for number, (path, serves, reason, unasked) in enumerate(steps):
                after = fresh()
                key, plain = f"raw:step-{number:02d}", f"raw:after-{number:02d}"
                produce(settings, [(key, encode_reference(key, origin.url(path)))])
                if unasked:
                    unasked_sent += unasked
                    origin.wait_unasked(unasked_sent, timeout_s=30)
                produce(settings, [(plain, encode_reference(plain, origin.url(f"/o/{after}")))])
                if serves is None:
                    expected_reason[key] = reason.value  # type: ignore[union-attr]
                else:
                    expected_image[key] = serves
                expected_image[plain] = after
            total = len(inline) + len(expected_image) + len(expected_reason)
            results = collect(settings, expected=total, timeout_s=120, settle_s=1.0)

    ids = [record["id"] for record in results.outputs] + results.dlq_keys()
    assert Counter(ids) == Counter(
        [key for key, _ in inline] + list(expected_image) + list(expected_reason)
    ), "every id exactly once across outputs and dead letters"
    assert results.reasons() == expected_reason
    vectors = {record["id"]: np.asarray(record["embedding"]) for record in results.outputs}
    by_image = {name: vectors[f"raw:bytes/{name}"] for name in names}
    distinct = {tuple(np.round(vector, 4)) for vector in by_image.values()}
    assert len(distinct) == len(by_image), "the images embed apart, so a swapped answer would show"
    for key, name in expected_image.items():
        np.testing.assert_allclose(vectors[key], by_image[name], atol=1e-6, err_msg=f"{key} is not {name}")
