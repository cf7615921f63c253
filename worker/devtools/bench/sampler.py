"""py-spy sampling this very process: which thread ran which Python stack, and which one held the GIL.

One sampler records every thread that is running (where its CPU time goes), another, in a run of its own,
only the thread holding the GIL (``py-spy --gil``). ``--nonblocking`` keeps py-spy from stopping the
process at every sample, so the worker runs at close to its own speed.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_READY = "Sampling process"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*):(?P<line>\d+)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")


class ProfilerUnavailable(Exception):
    """py-spy is missing or cannot attach to this process; the message says what to do."""


@dataclass(frozen=True)
class Frame:
    """One Python frame of a sampled stack."""

    function: str  # qualified name, e.g. ``Pipeline.step``
    path: str


@dataclass(frozen=True)
class Stack:
    """A sampled stack, outermost frame first, and the thread it ran on."""

    thread_id: int  # the native thread id (``threading.Thread.native_id``)
    thread_name: str
    frames: tuple[Frame, ...]


def py_spy_binary() -> str:
    """The py-spy executable next to this Python (a virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfilerUnavailable("py-spy is not installed; pip install 'clip-worker[bench]'")
    return found


class Sampler:
    """``py-spy record`` on this process until :meth:`stop`; ``gil=True`` keeps only the GIL holder."""

    def __init__(self, output: Path, rate: int, gil: bool) -> None:
        self.output = output
        self.rate = rate
        self.gil = gil
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: list[str] = []

    def start(self, timeout_s: float = 20.0) -> None:
        """Start py-spy and wait until it samples; raises :class:`ProfilerUnavailable` if it cannot."""
        command = [
            py_spy_binary(),
            "record",
            "--pid",
            str(os.getpid()),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--full-filenames",
            "--threads",
            "--nonblocking",
            "--output",
            str(self.output),
        ]
        if self.gil:
            command.append("--gil")
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        threading.Thread(target=self._read, name="py-spy-output", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                break
            if _READY in line:
                return
        self.stop()
        said = " ".join(self._log)[-300:] or "nothing"
        raise ProfilerUnavailable(
            f"py-spy did not start sampling this process (it said: {said}); it needs ptrace permission "
            "(root, or kernel.yama.ptrace_scope=0, or CAP_SYS_PTRACE in a container)"
        )

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._log.append(line.strip())
            self._lines.put(line)
        self._lines.put(None)

    def stop(self) -> Counter[Stack]:
        """Stop sampling (as Ctrl-C does, so py-spy writes its file) and return the stacks it counted."""
        process, self._process = self._process, None
        if process is None:
            return Counter()
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not self.output.exists():
            return Counter()
        return parse_raw(self.output.read_text())


def parse_raw(text: str) -> Counter[Stack]:
    """py-spy's raw (collapsed stack) format with ``--threads``: ``thread (TID): NAME;frame;... COUNT``."""
    stacks: Counter[Stack] = Counter()
    for line in text.splitlines():
        trace, _, count = line.rpartition(" ")
        if not trace or not count.isdigit():
            continue
        head, *frames = trace.split(";")
        thread = _THREAD.match(head)
        if thread is None:
            continue
        parsed: list[Frame] = []
        for frame in frames:
            match = _FRAME.match(frame)
            parsed.append(Frame(match["function"], match["path"]) if match else Frame(frame, ""))
        stack = Stack(int(thread["tid"]), thread["name"] or "", tuple(parsed))
        stacks[stack] += int(count)
    return stacks
