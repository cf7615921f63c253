"""Images by reference end to end: a real broker, a local HTTP origin and moto's S3 server on loopback.
Inline bytes, http and s3 references and bad ones in one stream: every id exactly once across outputs
and dead letters, with the expected reasons; a referenced image embeds exactly as its bytes do."""

from __future__ import annotations

from collections import Counter

import msgpack
import numpy as np
import pytest

from tests.support.bad_inputs import bad_requests
from tests.support.kafka_helpers import collect, create_topics, produce, running_worker, worker_settings
from tests.support.object_store import S3_ENV, object_store
from tests.support.schemas import validate_dlq_headers, validate_msgpack
from worker.devtools.origin import ImageOrigin
from worker.devtools.samples import sample_images
from worker.errors import RejectReason
from worker.messages import encode_reference, encode_request

pytestmark = pytest.mark.integration

R = RejectReason


def test_round_trip_mixing_bytes_http_and_s3_references_and_bad_ones(
    kafka_bootstrap, tiny_embedder, monkeypatch
):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    samples = sample_images(70)
    # The origin listens on 127.0.0.2, the one address opened: localhost (127.0.0.1) and ::1 stay refused.
    with ImageOrigin(host="127.0.0.2") as origin, object_store() as store:
        settings = worker_settings(
            kafka_bootstrap,
            batch_size=16,
            fetch_allow_hosts="127.0.0.2",
            s3_endpoint_url=store.endpoint_url,
            fetch_timeout_s=1.0,
            fetch_retries=1,
            fetch_concurrency=16,
        )
        create_topics(settings, partitions=3)
        good: list[tuple[str, bytes]] = []  # (id, record value), each sample three ways
        for sample in samples:
            origin.put(sample.name, sample.data)
            s3_uri = store.put("images", f"set/{sample.name}", sample.data)
            good.append((f"raw:bytes/{sample.name}", encode_request(f"raw:bytes/{sample.name}", sample.data)))
            http_id, s3_id = f"raw:http/{sample.name}", f"raw:s3/{sample.name}"
            good.append((http_id, encode_reference(http_id, origin.url(f"/o/{sample.name}"))))
            good.append((s3_id, encode_reference(s3_id, s3_uri)))
        origin.put("notes.txt", b"not an image\n" * 20)
        flaky = origin.url(f"/flaky/k/503/1/{samples[0].name}")
        good.append(("raw:http-503-then-200", encode_reference("raw:http-503-then-200", flaky)))
        refused = {
            "raw:ssrf-loopback-name": f"http://localhost:{origin.port}/o/{samples[0].name}",
            "raw:ssrf-ipv6-loopback": f"http://[::1]:{origin.port}/o/{samples[0].name}",
            "raw:ssrf-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "raw:ssrf-private": "http://10.0.0.1/x.jpg",
            "raw:ssrf-redirect": origin.url(f"/redirect?to=http://localhost:{origin.port}/o/x"),
            "raw:scheme-ftp": "ftp://example.com/x.jpg",
            "raw:scheme-file": "file:///etc/passwd",
        }
        bad_refs: list[tuple[str, str, RejectReason]] = [
            *[(key, uri, R.FETCH_FORBIDDEN) for key, uri in refused.items()],
            ("raw:http-404", origin.url("/o/missing.jpg"), R.FETCH_NOT_FOUND),
            ("raw:s3-no-key", "s3://images/set/missing.jpg", R.FETCH_NOT_FOUND),
            ("raw:s3-no-bucket", "s3://no-such-bucket/x.jpg", R.FETCH_NOT_FOUND),
            ("raw:http-403", origin.url("/status/403"), R.FETCH_FORBIDDEN),
            ("raw:http-slow", origin.url(f"/slow/4/{samples[0].name}"), R.FETCH_TIMEOUT),
            ("raw:http-huge", origin.url(f"/huge/{64 << 20}"), R.FETCH_TOO_LARGE),
            ("raw:http-500", origin.url("/flaky/always/500/99/x"), R.FETCH_FAILED),
            ("raw:http-truncated", origin.url(f"/truncated/{samples[1].name}"), R.FETCH_FAILED),
            ("raw:http-not-an-image", origin.url("/o/notes.txt"), R.NOT_AN_IMAGE),
            ("raw:uri-with-space", "http://exa mple.com/x.jpg", R.INVALID_ENVELOPE),
        ]
        bad = [(key, encode_reference(key, uri), reason) for key, uri, reason in bad_refs]
        both = msgpack.packb({"id": "x", "image": b"1", "uri": "http://h/x"}, use_bin_type=True)
        bad.append(("raw:image-and-uri", both, R.INVALID_ENVELOPE))
        bad += bad_requests()
        produce(settings, good + [(key, value) for key, value, _ in bad])
        expected_total = len(good) + len(bad)
        assert expected_total >= 200

        with running_worker(settings, tiny_embedder) as worker:
            results = collect(settings, expected=expected_total, timeout_s=240, settle_s=1.0)
        ssrf_requests = origin.requests[f"/o/{samples[0].name}"]

    all_ids = [r["id"] for r in results.outputs] + results.dlq_keys()
    assert Counter(all_ids) == Counter([key for key, _ in good] + [key for key, _, _ in bad])
    assert results.reasons() == {key: reason.value for key, _, reason in bad}
    sent = dict(good) | {key: value for key, value, _ in bad}
    for message in results.dead:
        validate_dlq_headers(list(message.headers))
        assert message.value == sent[message.key.decode()], "the dead letter is the request unchanged"

    by_id = {record["id"]: record for record in results.outputs}
    for raw in results.raw_outputs:
        validate_msgpack(raw, "image-embedding.schema.json")
    for sample in samples:
        inline = by_id[f"raw:bytes/{sample.name}"]
        assert "uri" not in inline and "image" not in inline
        for kind in ("http", "s3"):
            referenced = by_id[f"raw:{kind}/{sample.name}"]
            assert referenced["uri"].endswith(sample.name) and "image" not in referenced
            np.testing.assert_allclose(referenced["embedding"], inline["embedding"], atol=1e-6)

    fetches = {
        (s.labels["scheme"], s.labels["outcome"]): s.value
        for metric in worker.metrics.fetches.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert fetches[("http", "ok")] == len(samples) + 2  # the flaky one, and the non-image
    assert fetches[("s3", "ok")] == len(samples)
    assert fetches[("http", "fetch_forbidden")] == 6  # 5 refused addresses and the 403
    assert ssrf_requests == 1, "only the http sample itself, no refused reference, reached it"
