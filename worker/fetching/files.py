"""``file://`` references under one allow-listed root (a shared volume).

The path must lie under the root as written and still after every symlink is resolved, so neither
``..`` nor a link can leave it; the final component is opened without following a link, so a link
swapped in after the check is refused rather than followed.

Only regular files are read, and nothing else is ever waited on: the path's type is checked before it is
opened, and it is opened non-blocking and checked again on the open descriptor (a FIFO swapped in between
would otherwise hold the open until a writer came, and its partition with it). The read is bounded by
``--fetch-timeout-s`` between chunks, like an S3 body.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from worker.fetching.body import check_declared_size, read_limited
from worker.fetching.outcomes import failed, forbidden, not_found
from worker.fetching.uri import Reference

T = TypeVar("T")
_CHUNK = 1 << 20
# O_NOCTTY: a terminal swapped in must not become the worker's controlling terminal.
_OPEN_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
)
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class FileFetcher:
    """Reads ``file://`` references under ``root``, each read within ``timeout_s``."""

    def __init__(self, root: Path, max_bytes: int, timeout_s: float = 10.0) -> None:
        self._given = Path(os.path.abspath(root))
        self._root = root.resolve(strict=True)
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s

    def fetch(self, reference: Reference) -> bytes:
        """The file's bytes. Raises :class:`~worker.fetching.outcomes.FetchError`: ``fetch_forbidden``
        outside the root or for a FIFO, socket or device, ``fetch_not_found`` for a missing path or a
        directory, ``fetch_timeout`` for a read past the deadline."""
        deadline = time.monotonic() + self._timeout_s
        real = self._resolve(reference)
        _refuse_unless_regular(_os_call(os.stat, real, reference, "look at").st_mode, reference)
        fd = _os_call(os.open, real, reference, "open", _OPEN_FLAGS)
        try:
            info = os.fstat(fd)
            _refuse_unless_regular(info.st_mode, reference)  # swapped since the check above
            check_declared_size(info.st_size, self._max_bytes, reference)
            # O_NONBLOCK was for the open alone: plain reads from here, bounded by the deadline between chunks
            # (a file system that honoured the flag must not turn a slow read into a failure).
            os.set_blocking(fd, True)
            # Read to the end, not to the size seen: a file that grew past the limit is still refused.
            return read_limited(_chunks(fd, reference), self._max_bytes, deadline, reference)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing to close: each read opens and closes its own file."""

    def _resolve(self, reference: Reference) -> Path:
        """The real path of ``reference``, refused unless it lies under the root both as written and
        after every symlink."""
        shown = reference.shown
        written = Path(os.path.normpath(reference.target))
        if not (written.is_relative_to(self._given) or written.is_relative_to(self._root)):
            raise forbidden(f"{shown} is outside --fetch-file-root")
        try:
            real = written.resolve(strict=True)
        except FileNotFoundError:
            raise not_found(f"{shown}: no such file") from None
        except (OSError, RuntimeError) as exc:  # a symlink loop, a permission problem
            raise failed(f"{shown}: cannot resolve the path ({type(exc).__name__})") from None
        if not real.is_relative_to(self._root):
            raise forbidden(f"{shown} leads outside --fetch-file-root through a symlink")
        return real


def _refuse_unless_regular(mode: int, reference: Reference) -> None:
    """Refuse what is not a regular file: a directory is ``fetch_not_found`` (no file by that name, as an
    S3 "folder" has no object), a FIFO, socket or device ``fetch_forbidden`` (never read: it could block or
    never end)."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise not_found(f"{reference.shown} is a directory, not a file")
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
    raise forbidden(f"{reference.shown} is {kind}, not a regular file: only regular files are read")


def _os_call(call: Callable[..., T], real: Path, reference: Reference, what: str, *args: int) -> T:
    """``call(real, *args)`` (a stat, an open), its errors typed: the path can change under the checks."""
    shown = reference.shown
    try:
        return call(real, *args)
    except FileNotFoundError:
        raise not_found(f"{shown}: no such file") from None
    except PermissionError:
        raise forbidden(f"{shown}: permission denied") from None
    except OSError as exc:
        raise failed(f"{shown}: cannot {what} it ({exc.strerror or type(exc).__name__})") from None


def _chunks(fd: int, reference: Reference) -> Iterator[bytes]:
    """The file's bytes in chunks, up to its end."""
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError as exc:  # an I/O error of the file system: a failed fetch, not a crash
            why = exc.strerror or type(exc).__name__
            raise failed(f"{reference.shown}: cannot read it ({why})") from None
        if not chunk:
            return
        yield chunk
