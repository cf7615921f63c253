"""The worker image (docker/Dockerfile) run as a container against Kafka in a container, as users run it.

The image is built once per CI run before the tests (``make images``); here it is only built when missing.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bad_inputs import bad_requests
from tests.support.engine import ensure_image, require_engine, worker_image
from tests.support.kafka_container import KafkaBrokerContainer
from tests.support.kafka_helpers import collect, create_topics, produce, wait_until, worker_settings
from worker.devtools.samples import sample_images

pytestmark = pytest.mark.integration

CONTAINER_UID = 10001
GRACE_S = 20


@pytest.fixture(scope="module")
def image() -> str:
    """The worker image; built here only if ``make images`` has not built it."""
    require_engine()
    return ensure_image(worker_image(), "worker")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A writable cache volume for /models, owned by the container's user."""
    path = tmp_path / "models-cache"
    path.mkdir()
    os.chown(path, CONTAINER_UID, CONTAINER_UID)
    return path


@pytest.fixture
def model_copy(tiny_clip_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the tiny checkpoint readable by the container's user (pytest's folders are 0700)."""
    path = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, path)
    path.chmod(0o755)
    for file in path.iterdir():
        file.chmod(0o644)
    yield path


def test_worker_container_round_trip_health_and_sigterm_drain(
    image, kafka_container: KafkaBrokerContainer, model_copy: Path, cache_dir: Path
):
    from tests.support.worker_container import WorkerContainer, image_healthcheck

    host = worker_settings(kafka_container.bootstrap_servers, batch_size=16, shutdown_grace_s=GRACE_S)
    inside = worker_settings(
        kafka_container.internal_bootstrap,
        tag=host.input_topic.removesuffix(".images"),
        batch_size=16,
        shutdown_grace_s=GRACE_S,
    )
    create_topics(host, partitions=3)
    good = [(s.name, s.data) for s in sample_images(120)]
    bad = bad_requests()
    produce(host, good + [(key, value) for key, value, _ in bad])

    container = WorkerContainer(image, kafka_container.network, inside, model_copy, cache_dir)
    with container:
        container.wait_ready(120)
        assert container.http_status("/healthz") == 200

        results = collect(host, expected=len(good) + len(bad), timeout_s=120, settle_s=1.0)
        all_ids = [r["id"] for r in results.outputs] + results.dlq_keys()
        expected = [name for name, _ in good] + [key for key, _, _ in bad]
        assert Counter(all_ids) == Counter(expected), "every id exactly once across output and DLQ"
        assert results.reasons() == {key: reason.value for key, _, reason in bad}

        uid = container.exec(["id", "-u"])
        assert uid.output.decode().strip() == str(CONTAINER_UID), "runs as the image's non-root user"
        assert container.exec(["touch", "/opt/venv/x"]).exit_code != 0, "root filesystem is read-only"
        assert container.exec(["touch", "/models/x"]).exit_code == 0, "the cache volume is writable"

        healthcheck = image_healthcheck(container.get_docker_client().client, image)
        checked = container.exec(healthcheck)
        assert checked.exit_code == 0, f"the image's HEALTHCHECK failed: {checked.output!r}"

        wrapped = container.get_wrapped_container()
        started = time.monotonic()
        wrapped.stop(timeout=GRACE_S + 10)  # SIGTERM, then SIGKILL after the timeout
        stopped_s = time.monotonic() - started
        state = container.state()
        logs = container.logs_text()
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after SIGTERM:\n{logs[-3000:]}"
        assert stopped_s < GRACE_S, f"took {stopped_s:.1f}s to drain (grace {GRACE_S}s)"


def test_unreadable_weights_say_permission_denied_and_name_the_user(
    image, kafka_container: KafkaBrokerContainer, model_copy: Path, cache_dir: Path
):
    from tests.support.worker_container import WorkerContainer

    weights = next(model_copy.glob("*.safetensors"))
    weights.chmod(0o600)  # owned by root on the host: the container's user cannot read it
    settings = worker_settings(kafka_container.internal_bootstrap)
    container = WorkerContainer(image, kafka_container.network, settings, model_copy, cache_dir)
    with container:
        wait_until(lambda: container.state()["Status"] == "exited", 120, container.logs_text)
        logs = container.logs_text()
        assert container.state()["ExitCode"] != 0
        assert "permission denied" in logs, logs[-2000:]
        assert f"uid {CONTAINER_UID}" in logs, logs[-2000:]
        assert "No such file or directory" not in logs, logs[-2000:]
