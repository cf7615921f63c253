"""docker/compose.yaml brought up for real (with docker/compose.local.yaml: locally built images, CPU):
what ``clip-worker produce`` sends from the host is embedded, and Prometheus scrapes the worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.compose import running_stack
from tests.support.engine import ensure_image, kafka_image, require_engine, worker_image
from tests.support.kafka_helpers import unique, wait_until
from worker.devtools.brokers import free_port
from worker.devtools.samples import sample_images

pytestmark = pytest.mark.integration

IMAGES = 40


def test_compose_stack_embeds_what_the_host_produces_and_prometheus_scrapes_it(
    tiny_clip_dir: Path, tmp_path: Path
):
    require_engine()
    ensure_image(kafka_image(), "kafka")
    ensure_image(worker_image(), "worker")
    ensure_image("clip-worker-prometheus:latest", "prometheus")
    model = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, model)
    model.chmod(0o755)
    for file in model.iterdir():
        file.chmod(0o644)
    photos = tmp_path / "photos"
    photos.mkdir()
    for sample in sample_images(IMAGES):
        (photos / f"{sample.name}.img").write_bytes(sample.data)

    project = unique("clipstack").replace(".", "-")
    with running_stack(project, model, free_port(), free_port()) as stack:
        bootstrap = f"127.0.0.1:{stack.kafka_port}"
        cli = [sys.executable, "-m", "worker.cli"]
        produced = subprocess.run(
            [*cli, "produce", "--bootstrap-servers", bootstrap, str(photos)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert produced.returncode == 0, produced.stderr[-2000:]

        tailed = subprocess.run(
            [*cli, "tail", "--bootstrap-servers", bootstrap, "--max-records", str(IMAGES),
             "--idle-timeout-s", "90"],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert tailed.returncode == 0, tailed.stderr[-2000:]
        ids = sorted(json.loads(line)["id"] for line in tailed.stdout.splitlines() if line.strip())
        assert ids == sorted(p.name for p in photos.iterdir()), "every produced image embedded once"

        def scraped() -> bool:
            up = stack.prometheus_query('up{job="clip-worker"}')
            embedded = stack.prometheus_query("sum(clip_worker_images_embedded_total)")
            return (
                bool(up)
                and up[0]["value"][1] == "1"
                and bool(embedded)
                and float(embedded[0]["value"][1]) > 0
            )

        wait_until(scraped, 90, "Prometheus never saw the worker up with images embedded")
