"""The container engine the container tests use, and the images they run.

The engine is whatever testcontainers would use: ``$DOCKER_HOST`` (podman's Docker-compatible socket here,
set up by ``.ci/engine/setup``) or Docker's default socket. It counts only when its API answers a ping: a
``docker`` binary on PATH proves nothing. In CI (``CI=true``) a missing engine fails the container tests
instead of skipping them, so a broken engine cannot pass as green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from tests.support.kafka_broker import kafka_version

ROOT = Path(__file__).resolve().parents[2]
BUILD_IMAGES = ROOT / ".ci" / "engine" / "build-images"


@cache
def engine_answers() -> bool:
    """True when a container engine's API answers a ping within a few seconds."""
    from testcontainers.core.docker_client import DockerClient

    try:
        client = DockerClient(timeout=5).client  # the same engine testcontainers itself would pick
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def engine_required() -> bool:
    """CI must run the container tests: there a missing engine is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_engine() -> None:
    """Fail (in CI) or skip (elsewhere) the calling test when no engine answers."""
    if engine_answers():
        return
    message = "no container engine answers (DOCKER_HOST or the default Docker socket); see .ci/engine/setup"
    if engine_required():
        pytest.fail(message)
    pytest.skip(message)


def kafka_image() -> str:
    """The Kafka image built from the Maven jars (``.ci/engine/build-images kafka``)."""
    return os.environ.get("CLIP_CI_KAFKA_IMAGE", f"clip-worker-kafka:{kafka_version()}")


def worker_image() -> str:
    """The worker image built from ``docker/Dockerfile`` (``.ci/engine/build-images worker``)."""
    return os.environ.get("CLIP_CI_WORKER_IMAGE", "clip-worker:test")


def image_exists(name: str) -> bool:
    """Whether the engine holds ``name`` (no pull: no registry is reachable here)."""
    from testcontainers.core.docker_client import DockerClient

    client = DockerClient(timeout=10).client
    try:
        return bool(client.images.list(name=name))
    finally:
        client.close()


def ensure_image(name: str, which: str) -> str:
    """Build ``which`` (kafka, prometheus, worker) with the engine's CLI unless ``name`` exists already."""
    if not image_exists(name):
        if shutil.which("podman") is None and shutil.which("docker") is None:
            pytest.fail(f"image {name} is missing and neither podman nor docker is on PATH to build it")
        subprocess.run(["bash", str(BUILD_IMAGES), which], check=True, cwd=ROOT, timeout=1200)
    return name
