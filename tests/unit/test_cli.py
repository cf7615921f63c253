"""The command line as a user meets it: one-line errors and exit codes (subprocesses, no broker)."""

import subprocess
import sys

from tests.support.kafka_helpers import clean_env
from worker.devtools.brokers import free_port


def clip_worker(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    environment = clean_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )


def test_every_setting_is_a_run_flag():
    from worker.config import Settings, flag_name

    help_text = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in Settings.model_fields:
        assert flag_name(name) in help_text


def test_bad_flag_value_stops_startup_with_one_line():
    result = clip_worker("run", "--batch-size", "-1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--batch-size / CLIP_WORKER_BATCH_SIZE" in lines[0]


def test_bad_env_var_stops_startup_with_one_line():
    result = clip_worker("run", env={"CLIP_WORKER_DTYPE": "int4"})
    assert result.returncode == 2
    assert "CLIP_WORKER_DTYPE" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_model_exits_non_zero_naming_the_flags(tmp_path):
    result = clip_worker("run", "--model", str(tmp_path / "missing"), "--metrics-port", "0")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "--model" in last and "--model-dir" in last and "--random-weights" in last


def test_unreachable_broker_retries_then_exits_non_zero(tiny_clip_dir):
    port = free_port()
    result = clip_worker(
        "run",
        "--model",
        str(tiny_clip_dir),
        "--bootstrap-servers",
        f"127.0.0.1:{port}",
        "--connect-timeout-s",
        "4",
        "--metrics-port",
        "0",
    )
    assert result.returncode == 2
    assert "retrying" in result.stderr  # one line per attempt
    last = result.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in last and "--bootstrap-servers" in last
