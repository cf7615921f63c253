"""Logging setup: one line per event, as text or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from worker.kafka_io import CLIENT_LOG_LEVELS, CLIENT_LOGGER


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RepeatLimiter(logging.Filter):
    """Lets the same message (by its template) of loggers under ``prefix`` through at most once per
    ``interval_s``, then says how many copies it held back; other records pass. kafka-python repeats an
    error about a missing topic ten times a second."""

    def __init__(
        self, prefix: str = "", interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._prefix = prefix
        self._interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        key = (record.name, record.msg)
        now = self._clock()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self._interval_s:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1000:
            self._seen.clear()  # bounded: templates are few, but a library may format its own messages
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {now - last:.0f}s)"
        return True


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Route all logs to stderr in the chosen format; quieten kafka-python's chatty internals."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in (CLIENT_LOGGER, "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The hub client logs every retry of an unreachable host; the model loader reports the outcome once.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for name, client_level in CLIENT_LOG_LEVELS.items():
        logging.getLogger(name).setLevel(client_level)
    handler.addFilter(RepeatLimiter(CLIENT_LOGGER))
