"""``clip-worker fleet`` starts N processes in one group; SIGTERM drains them all."""

import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tests.support.kafka_helpers import (
    CLI,
    clean_env,
    collect,
    create_topics,
    produce,
    topic_flags,
    wait_until,
    worker_settings,
)
from worker.devtools.samples import jpeg_corpus

pytestmark = pytest.mark.integration


def consecutive_free_ports(count: int) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no consecutive free ports")


def assigned(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("clip_worker_assigned_partitions "):
                    return float(line.split()[1])
    except (urllib.error.URLError, ConnectionError):
        pass
    return -1.0


def test_fleet_runs_processes_in_one_group_and_drains_on_sigterm(kafka_bootstrap, tiny_clip_dir):
    settings = worker_settings(kafka_bootstrap)
    create_topics(settings, partitions=4)
    base = consecutive_free_ports(2)
    fleet = subprocess.Popen(
        [
            *CLI, "fleet", "--gpus", "none", "--cpu-processes", "2", "--metrics-port-base", str(base), "--",
            *topic_flags(settings), "--model", str(tiny_clip_dir), "--metrics-host", "127.0.0.1",
            "--session-timeout-ms", "6000", "--log-level", "warning",
        ],
        env=clean_env(),
    )  # fmt: skip
    try:
        wait_until(
            lambda: (
                assigned(base) >= 1 and assigned(base + 1) >= 1 and assigned(base) + assigned(base + 1) == 4
            ),
            90,
            "fleet members did not share partitions",
        )
        items = [(f"fleet-{i:03d}.jpg", data) for i, data in enumerate(jpeg_corpus(60, 128, 96))]
        for partition in range(4):
            produce(settings, items[partition::4], partition=partition)
        results = collect(settings, expected=60, timeout_s=90)
        assert Counter(r["id"] for r in results.outputs) == Counter(name for name, _ in items)
        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(timeout=60) == 0
    finally:
        if fleet.poll() is None:
            fleet.kill()
