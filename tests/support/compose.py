"""The compose stack (docker/compose.yaml + docker/compose.local.yaml) brought up for real by a test.

podman-compose where podman is the engine (it drives the podman CLI with the engine's configuration),
``docker compose`` elsewhere. Host ports are free ones chosen by the test; the project name is unique, so
nothing collides with a stack a person runs on the same machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine import engine_required

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "docker" / "compose.yaml", ROOT / "docker" / "compose.local.yaml"]
SERVICES = ["kafka", "topics", "worker", "prometheus"]  # Grafana cannot be built without a registry


def compose_command() -> list[str]:
    """podman-compose when podman is installed, else ``docker compose``; fail in CI, skip elsewhere."""
    if shutil.which("podman"):
        tool = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
        if Path(tool).exists():
            return [tool]
    elif shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    message = "no compose tool: pip install podman-compose (with podman) or Docker's compose plugin"
    if engine_required():
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Stack:
    """A running stack: its host ports and a way to run compose commands on it."""

    command: list[str]
    env: dict[str, str]
    kafka_port: int
    prometheus_port: int

    def compose(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """Run compose with both files and ``args``; raise with its output when it fails."""
        files = [arg for path in FILES for arg in ("-f", str(path))]
        result = subprocess.run(
            [*self.command, *files, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}"
                f"\n{result.stderr[-3000:]}"
            )
        return result

    def prometheus_query(self, query: str) -> list[dict[str, Any]]:
        """The result vector of an instant query on the stack's Prometheus."""
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?query={urllib.parse.quote(query)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@contextmanager
def running_stack(project: str, model_dir: Path, kafka_port: int, prometheus_port: int) -> Iterator[Stack]:
    """``up -d`` the stack's services, yield it, ``down -v`` whatever happened."""
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "KAFKA_HOST_PORT": str(kafka_port),
        "PROMETHEUS_PORT": str(prometheus_port),
        "CLIP_CI_MODEL_HOST_DIR": str(model_dir),
    }
    stack = Stack(compose_command(), env, kafka_port, prometheus_port)
    try:
        stack.compose("up", "-d", "--no-deps", *SERVICES, timeout_s=300)
        yield stack
    finally:
        try:
            logs = stack.compose("logs", timeout_s=60).stdout
            print(logs[-6000:])  # shown by pytest when the test failed
        finally:
            stack.compose("down", "-v", "-t", "30", timeout_s=180)
