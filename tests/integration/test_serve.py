"""``clip-worker serve`` as a real process on loopback: OpenAI's Python client and plain HTTP both work, every
bad request gets its documented 4xx, a burst over a small queue gets answers or 429s and the server stays up,
and SIGTERM finishes the requests under way before exiting 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.support.kafka_helpers import wait_until
from tests.support.serve_process import ServeProcess, running_serve, start_serve
from worker.devtools.samples import sample_images
from worker.inference.embedder import Embedder, ModelSpec, load_embedder

TEXTS = ["a photo of a dog", "a cat on a sofa", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def text_embedder(tiny_clip_dir: Path) -> Embedder:
    return load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cpu"), texts=True)


@pytest.fixture(scope="module")
def server(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_serve(
        tiny_clip_dir, log, "--served-model-name", "tiny-clip", "--serve-max-inputs", "8",
        "--max-message-bytes", "200000", "--batch-timeout-ms", "5",
    ) as running:  # fmt: skip
        yield running


def test_openai_client_gets_the_text_towers_vectors(server: ServeProcess, text_embedder: Embedder):
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    answer = client.embeddings.create(model="tiny-clip", input=TEXTS)  # the client asks for base64
    vectors = np.array([item.embedding for item in answer.data], dtype=np.float32)
    assert answer.model == "tiny-clip" and [item.index for item in answer.data] == [0, 1, 2]
    assert np.abs(vectors - text_embedder.embed_texts(TEXTS)).max() <= 1e-6
    assert answer.usage.prompt_tokens > len(TEXTS)
    floats = client.embeddings.create(model="tiny-clip", input=TEXTS[0], encoding_format="float")
    assert np.abs(np.array(floats.data[0].embedding, dtype=np.float32) - vectors[0]).max() <= 1e-6
    assert next(model.id for model in client.models.list()) == "tiny-clip"


def test_openai_client_sends_images_with_modality(server: ServeProcess):
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    images = [base64.b64encode(sample.data).decode() for sample in sample_images(2)]
    answer = client.embeddings.create(model="tiny-clip", input=images, extra_body={"modality": "image"})
    assert len(answer.data) == 2
    assert all(abs(np.linalg.norm(item.embedding) - 1) < 1e-5 for item in answer.data)


def test_plain_http_gets_the_same_answer(server: ServeProcess, text_embedder: Embedder):
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[1]}, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    vector = np.array(answer.json()["data"][0]["embedding"], dtype=np.float32)
    assert np.abs(vector - text_embedder.embed_texts([TEXTS[1]])[0]).max() <= 1e-6
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert "clip_worker_serve_requests_total" in httpx.get(f"{server.url}/metrics").text


IMAGE = base64.b64encode(b"\xff\xd8" + b"\x00" * 300_000).decode()
BAD_REQUESTS = {
    "wrong type": ({"input": [1, 2]}, 400, "invalid_request"),
    "empty input": ({"input": []}, 400, "invalid_request"),
    "too long": ({"input": "a" * 16385}, 400, "text_too_long"),
    "too many": ({"input": ["a"] * 9}, 400, "too_many_inputs"),
    "unknown parameter": ({"input": "a", "top_k": 3}, 400, "unknown_parameter"),
    "dimensions": ({"input": "a", "dimensions": 3}, 400, "dimensions_not_supported"),
    "unknown model": ({"input": "a", "model": "text-embedding-3-large"}, 404, "model_not_found"),
    "oversized image": ({"input": IMAGE, "modality": "image"}, 413, "image_too_large"),
    "forbidden uri": (
        {"input": "http://169.254.169.254/latest", "modality": "image"},
        403,
        "fetch_forbidden",
    ),
    "forbidden scheme": ({"input": "gopher://example.com/x", "modality": "image"}, 403, "fetch_forbidden"),
    "s3 not fetched by default": (
        {"input": "s3://bucket/key.jpg", "modality": "image"},
        403,
        "fetch_forbidden",
    ),
    "not an image": (
        {"input": base64.b64encode(b"hello").decode(), "modality": "image"},
        422,
        "not_an_image",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_each_bad_request_gets_its_documented_4xx(server: ServeProcess, case: str):
    payload, status, code = BAD_REQUESTS[case]
    answer = httpx.post(f"{server.url}/v1/embeddings", json=payload, timeout=30)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]


def test_openai_client_raises_its_own_errors(server: ServeProcess):
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny-clip", input=[])


@contextlib.contextmanager
def open_files_raised(wanted: int) -> Iterator[int]:
    """The soft limit on open files raised towards ``wanted`` (up to the hard limit) for the block, and
    restored after: what the block may open, its server child included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield max(soft, target)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def burst(url: str, count: int, connections: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(n: int) -> int:
            answer = await client.post("/v1/embeddings", json={"input": f"query number {n}"})
            if answer.status_code == 429:
                assert answer.headers["retry-after"] == "1"
            return answer.status_code

        return Counter(await asyncio.gather(*(one(n) for n in range(count))))


def test_a_burst_of_1000_over_a_small_queue_gets_answers_or_429s(tiny_clip_dir: Path, tmp_path: Path):
    flags = ("--serve-max-queue", "16", "--serve-max-inputs", "4", "--batch-size", "8")
    # 1000 sockets at once (here and in the server) pass `ulimit -n 1024`: raise it, or open fewer at once
    # (what is left for the interpreter, the model and the server's own files).
    with (
        open_files_raised(4096) as open_files,
        running_serve(tiny_clip_dir, tmp_path / "serve.log", *flags) as server,
    ):
        connections = min(1000, open_files - 256)
        statuses = asyncio.run(asyncio.wait_for(burst(server.url, 1000, connections), timeout=180))
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[200] >= 16 and statuses[429] > 0, statuses
        assert server.ready(), "the server stays up"
        assert httpx.post(f"{server.url}/v1/embeddings", json={"input": "after"}).status_code == 200
        assert server.metric("clip_worker_serve_queued_inputs") == 0


def test_sigterm_drains_the_requests_under_way_then_exits_0(tiny_clip_dir: Path, tmp_path: Path):
    # A batch would wait 10 minutes for company: only SIGTERM's drain sends the request's input on, so it is
    # under way when the signal comes, however slow this machine is.
    server = start_serve(
        tiny_clip_dir, tmp_path / "serve.log", "--batch-size", "64", "--batch-timeout-ms", "600000"
    )
    answers: list[tuple[float, httpx.Response]] = []

    def ask() -> None:
        answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": "late"}, timeout=60)
        answers.append((time.monotonic(), answer))

    waiting = threading.Thread(target=ask)
    waiting.start()
    try:
        wait_until(
            lambda: server.metric("clip_worker_serve_queued_inputs") == 1, 30, "the request never queued"
        )
        signalled = time.monotonic()
        assert server.stop() == 0, (tmp_path / "serve.log").read_text()
    finally:
        waiting.join(timeout=60)
        server.process.kill()
    assert answers, "no answer came"
    answered_at, answer = answers[0]
    assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) > 0
    assert answered_at > signalled
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_the_serve_bench_section_measures_both_batching_modes(tmp_path: Path):
    import json
    import subprocess
    import sys

    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "worker.cli", "bench", "--sections", "serve", "--device", "cpu"]
    command += [
        "--seconds",
        "1",
        "--serve-clients",
        "1,4",
        "--serve-image-clients",
        "1",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(output.read_text())
    rows = {row["case"]: row for row in report["rows"] if row["section"] == "serve"}
    assert set(rows) == {
        "texts, batching on, 1 clients",
        "texts, batching on, 4 clients",
        "images by base64, batching on, 1 clients",
        "texts, batching off, 1 clients",
        "texts, batching off, 4 clients",
    }
    for row in rows.values():
        assert row["failed"] is None and row["images_per_s"] > 0 and row["detail"]["errors"] == 0
        assert 0 < row["detail"]["p50_ms"] <= row["detail"]["p99_ms"]
    assert report["ratios"]["serve_batching_on_over_off_4_clients"] > 0
