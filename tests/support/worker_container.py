"""The worker image run as a container, as a user would run it: non-root, read-only root filesystem, the
model mounted read-only, a writable cache volume at /models, the metrics port published on loopback."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

from worker.config import Settings

METRICS_PORT = 9400
MODEL_MOUNT = "/opt/model"


class WorkerContainer(DockerContainer):
    """``clip-worker run`` in the worker image, configured through CLIP_WORKER_* variables."""

    def __init__(
        self, image: str, network: Network, settings: Settings, model_dir: Path, cache_dir: Path
    ) -> None:
        super().__init__(image)
        self.ports[f"{METRICS_PORT}/tcp"] = ("127.0.0.1",)  # type: ignore[assignment]  # docker-py accepts it
        self.with_network(network)
        self.with_volume_mapping(str(model_dir), MODEL_MOUNT, "ro")
        self.with_volume_mapping(str(cache_dir), "/models", "rw")
        self.tmpfs["/tmp"] = "rw,size=64m"
        self.with_kwargs(read_only=True)
        self.with_envs(
            CLIP_WORKER_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
            CLIP_WORKER_INPUT_TOPIC=settings.input_topic,
            CLIP_WORKER_OUTPUT_TOPIC=settings.output_topic,
            CLIP_WORKER_DLQ_TOPIC=settings.dlq_topic,
            CLIP_WORKER_GROUP_ID=settings.group_id,
            CLIP_WORKER_MODEL=MODEL_MOUNT,
            CLIP_WORKER_DEVICE="cpu",
            CLIP_WORKER_BATCH_SIZE=str(settings.batch_size),
            CLIP_WORKER_BATCH_TIMEOUT_MS=str(settings.batch_timeout_ms),
            CLIP_WORKER_SHUTDOWN_GRACE_S=str(settings.shutdown_grace_s),
        )

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<published port><path>``."""
        return f"http://127.0.0.1:{self.get_exposed_port(METRICS_PORT)}{path}"

    def http_status(self, path: str) -> int:
        """The HTTP status of ``path`` on the published metrics port (0 when nothing answers)."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until ``/readyz`` answers 200; fail at once, with the logs, if the container exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.http_status("/readyz") == 200:
                return
            if self.state()["Status"] == "exited":
                raise AssertionError(f"the worker container exited:\n{self.logs_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout_s:.0f}s:\n{self.logs_text()[-3000:]}")

    def state(self) -> dict[str, Any]:
        """``State`` of ``docker inspect``: Status, ExitCode, ..."""
        state: dict[str, Any] = self.inspect()["State"]
        return state

    def inspect(self) -> dict[str, Any]:
        """The engine's view of the container (``docker inspect``)."""
        wrapped = self.get_wrapped_container()
        wrapped.reload()
        attrs: dict[str, Any] = wrapped.attrs
        return attrs

    def logs_text(self) -> str:
        """stdout and stderr, decoded."""
        stdout, stderr = self.get_logs()
        return (stdout + stderr).decode(errors="replace")


def image_healthcheck(client: Any, image: str) -> list[str]:
    """The image's HEALTHCHECK command as an exec argv (``CMD`` form, or ``CMD-SHELL`` through sh).

    Docker's image API reports it under ``Config.Healthcheck``; podman's Docker-compatible API leaves it
    out (4.x) and its libpod endpoint on the same socket has it at the top level."""
    config = client.images.get(image).attrs.get("Config") or {}
    test = (config.get("Healthcheck") or {}).get("Test")
    if not test:
        response = client.api.get(f"{client.api.base_url}/v4.0.0/libpod/images/{image}/json")
        if response.ok:
            test = (response.json().get("Healthcheck") or {}).get("Test")
    assert test, f"the image {image} has no HEALTHCHECK"
    kind, *argv = test
    return ["sh", "-c", argv[0]] if kind == "CMD-SHELL" else list(argv)
