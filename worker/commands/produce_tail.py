"""``clip-worker produce`` and ``clip-worker tail``: getting images in and embeddings out by hand."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import numpy as np

from worker.config import Settings
from worker.errors import StartupError
from worker.kafka_io import IgnoreRebalances, ensure_topics, open_producer, open_reader
from worker.messages import decode_embedding, encode_reference, encode_request

log = logging.getLogger(__name__)
_DELIVERY_TIMEOUT_S = 30.0


def iter_image_files(paths: list[str]) -> Iterator[tuple[str, Path]]:
    """``(id, path)`` for every regular, non-hidden file; id is the path relative to its argument."""
    for argument in paths:
        root = Path(argument)
        if root.is_file():
            yield root.name, root
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root)
                if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                    yield relative.as_posix(), path
        else:
            raise StartupError(f"{argument}: no such file or directory")


def reference_requests(base: str, paths: list[str], settings: Settings) -> Iterator[tuple[str, bytes]]:
    """``(id, record value)`` of requests by reference under ``base``.

    With ``paths``, each file's path relative to its argument is appended to ``base``: the folder as
    served over HTTP (``http://host/images/``, the path percent-encoded) or copied under an S3 prefix
    (``s3://bucket/prefix/``, the key verbatim). Without ``paths``, ``base`` must be an S3 prefix, and its
    objects are listed.
    """
    scheme = base.partition("://")[0].lower()
    if scheme not in ("http", "https", "s3"):
        raise StartupError(f"--by-reference {base!r}: use an http://, https:// or s3:// base")
    prefix = base if base.endswith("/") else base + "/"
    if paths:
        for request_id, _path in iter_image_files(paths):
            tail = request_id if scheme == "s3" else quote(request_id)
            yield request_id, encode_reference(request_id, prefix + tail, {"path": request_id})
        return
    if scheme != "s3":
        raise StartupError("--by-reference with an http(s) base needs the local folder it serves")
    bucket, _, key_prefix = base[len("s3://") :].partition("/")
    for key in list_s3_keys(bucket, key_prefix, settings):
        yield key, encode_reference(key, f"s3://{bucket}/{key}", {"path": key})


def list_s3_keys(bucket: str, prefix: str, settings: Settings) -> Iterator[str]:
    """The keys under ``prefix`` in ``bucket`` (credentials, endpoint and addressing as the worker's)."""
    from worker.fetching.s3 import s3_client  # boto3 loads only where S3 is used

    client = s3_client(settings.s3_endpoint_url, settings.s3_region)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                yield item["Key"]


def produce_paths(
    settings: Settings, paths: list[str], partitions: int | None = None, by_reference: str | None = None
) -> int:
    """Publish each file as one request record (key = id), carrying its bytes, or with ``by_reference``
    its URI under that base (:func:`reference_requests`); returns how many were acknowledged."""
    # Listed before connecting, so that a wrong path is the error a user sees.
    if by_reference is not None:
        requests: Iterator[tuple[str, bytes]] = iter(list(reference_requests(by_reference, paths, settings)))
    elif paths:
        files = list(iter_image_files(paths))
        requests = (
            (request_id, encode_request(request_id, path.read_bytes(), {"path": str(path)}))
            for request_id, path in files
        )
    else:
        raise StartupError("name the image files or folders to publish")
    if partitions:
        ensure_topics(settings, {settings.input_topic: partitions})
    producer = open_producer(settings)
    failures: list[BaseException] = []
    sent = 0
    try:
        for request_id, value in requests:
            delivery = producer.send(settings.input_topic, key=request_id.encode(), value=value, headers=[])
            delivery.add_errback(failures.append)
            sent += 1
        producer.flush(timeout=_DELIVERY_TIMEOUT_S)  # every delivery is reported, one way or the other
    finally:
        producer.close(timeout=_DELIVERY_TIMEOUT_S)
    if failures:
        raise StartupError(f"{len(failures)} of {sent} requests were not published: {failures[0]}")
    return sent


def describe_output(value: bytes, head: int = 4) -> dict[str, Any]:
    """The JSON-line summary of one output record."""
    record = decode_embedding(value)
    vector: np.ndarray = record["embedding"]
    return {
        "id": record["id"],
        "kind": record.get("kind", "image"),
        "dim": record["dim"],
        "norm": round(float(np.linalg.norm(vector)), 6),
        "model": record["model"],
        "source": record["source"],
        "head": [round(float(x), 6) for x in vector[:head]],
    }


def describe_dlq(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> dict[str, Any]:
    """The JSON-line summary of one dead-lettered record."""
    fields = {
        name: (raw or b"").decode("utf-8", "replace")
        for name, raw in headers
        if name.startswith("clip-worker-")
    }
    return {
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "bytes": len(value or b""),
        "reason": fields.get("clip-worker-reason"),
        "error": fields.get("clip-worker-error"),
        "source": {
            "topic": fields.get("clip-worker-source-topic"),
            "partition": int(fields.get("clip-worker-source-partition", "-1")),
            "offset": int(fields.get("clip-worker-source-offset", "-1")),
        },
    }


def tail_topic(
    settings: Settings,
    dlq: bool = False,
    max_records: int | None = None,
    idle_timeout_s: float | None = None,
    out: TextIO = sys.stdout,
    read_committed: bool = False,
) -> int:
    """Print records of the output (or DLQ) topic from the beginning as JSON lines; no offsets committed.

    ``read_committed`` skips records of aborted transactions (outputs of an ``--exactly-once`` worker).
    """
    topic = settings.dlq_topic if dlq else settings.output_topic
    consumer = open_reader(settings, read_committed)
    consumer.subscribe([topic], IgnoreRebalances())
    printed = 0
    last_record = time.monotonic()
    try:
        while max_records is None or printed < max_records:
            batches = consumer.poll(timeout_ms=500, max_records=500)
            for messages in batches.values():
                for message in messages:
                    if dlq:
                        line = describe_dlq(message.key, message.value, message.headers or [])
                    else:
                        line = describe_output(message.value or b"")
                    print(json.dumps(line), file=out, flush=True)
                    printed += 1
                    last_record = time.monotonic()
            if idle_timeout_s is not None and time.monotonic() - last_record > idle_timeout_s:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close(timeout_ms=5000)
    return printed
