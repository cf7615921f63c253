"""``clip-worker serve`` as a real process on loopback, for the integration tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.kafka_helpers import CLI, clean_env, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    """A running server: its base URL and process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> str:
        """The base URL OpenAI's client takes."""
        return f"{self.url}/v1"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric from /metrics."""
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def start_serve(model_dir: Path, log: Path, *flags: str) -> ServeProcess:
    """Start ``clip-worker serve`` on the tiny checkpoint on a free loopback port; wait until it is ready."""
    port = free_port()
    command = [*CLI, "serve", "--model", str(model_dir), "--device", "cpu", "--serve-host", "127.0.0.1"]
    command += ["--serve-port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    server = ServeProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until(
            lambda: process.poll() is not None or server.ready(),
            120,
            lambda: f"serve did not become ready:\n{log.read_text()}",
        )
    except BaseException:
        process.kill()
        raise
    assert process.poll() is None, f"serve exited {process.returncode}:\n{log.read_text()}"
    return server


@contextlib.contextmanager
def running_serve(model_dir: Path, log: Path, *flags: str) -> Iterator[ServeProcess]:
    """A server for a ``with`` block; it must exit 0 on SIGTERM."""
    server = start_serve(model_dir, log, *flags)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            code = server.stop()
            assert code == 0, f"serve exited {code} on SIGTERM:\n{log.read_text()}"
