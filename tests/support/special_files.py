"""What a shared volume can hold besides files: a FIFO, a socket, a device and a directory, made at a path
under a test's ``--fetch-file-root``."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

# The reason each kind is dead-lettered with, and words its message must hold.
EXPECTED = {
    "fifo": ("fetch_forbidden", "is a FIFO (named pipe), not a regular file"),
    "socket": ("fetch_forbidden", "is a socket, not a regular file"),
    "device": ("fetch_forbidden", "is a character device, not a regular file"),
    "directory": ("fetch_not_found", "is a directory, not a file"),
}


def make_special(path: Path, kind: str) -> Path:
    """Make a ``kind`` (a key of :data:`EXPECTED`) at ``path``; returns ``path``.

    The device is a character device with /dev/null's numbers (a link to /dev/null would leave the root and
    be refused for that). Making it needs CAP_MKNOD: without it the test is skipped, but in CI, which runs
    as root, it fails.
    """
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))  # the socket's file stays after the socket is closed
    elif kind == "device":
        _make_device(path)
    elif kind == "directory":
        path.mkdir()
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return path


def _make_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        why = "making a device node needs CAP_MKNOD (root), which this test run lacks"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI runs the tests as root so that this case runs")
        pytest.skip(why)
