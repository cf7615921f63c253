"""``clip-worker demo``, the README's first command, runs end to end and warns only of what one can fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


# kafka-python only in CI (librdkafka's reader and producer, which the demo uses, are covered by the bench and
# exactly-once tests): `clip-worker demo --kafka-client librdkafka` passes this test too.
@pytest.mark.parametrize("kafka_client", ["kafka-python"])
def test_the_demo_embeds_its_samples_dead_letters_the_broken_ones_and_warns_of_nothing(kafka_client):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # no hub here: the demo says so and takes random weights
    }
    done = subprocess.run(
        [
            *[sys.executable, "-m", "worker.cli", "demo", "--count", "6", "--batch-size", "4"],
            *["--device", "cpu", "--kafka-client", kafka_client],
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"^embedded\s+6 image\(s\)$", done.stdout, re.MULTILINE), done.stdout[-2000:]
    dead = re.search(r"^dead-lettered\s+(\d+) \((.+)\)$", done.stdout, re.MULTILINE)
    assert dead and int(dead.group(1)) > 0 and dead.group(2) != "none", done.stdout[-2000:]
    assert "RANDOM weights" in done.stdout, "a newcomer is told the vectors are not CLIP's"
    warnings = [line for line in output.splitlines() if re.search(r"\bWARN(ING)?\b|Traceback", line)]
    # The one a newcomer can act on (fetch the weights once with network) is the only one allowed.
    noise = [line for line in warnings if "RANDOM WEIGHTS" not in line]
    assert noise == [], "\n".join(noise)
    assert len(warnings) == 1, "the random weights are named once by the worker"
