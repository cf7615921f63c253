"""``file://`` references under one allow-listed root (a shared volume).

The path must lie under the root as written and still after every symlink is resolved, so neither
``..`` nor a link can leave it; the final component is opened without following a link, so a link
swapped in after the check is refused rather than followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from worker.fetching.body import check_declared_size, over_the_limit
from worker.fetching.outcomes import failed, forbidden, not_found
from worker.fetching.uri import Reference


class FileFetcher:
    """Reads ``file://`` references under ``root``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._given = Path(os.path.abspath(root))
        self._root = root.resolve(strict=True)
        self._max_bytes = max_bytes

    def fetch(self, reference: Reference) -> bytes:
        """The file's bytes. Raises :class:`~worker.fetching.outcomes.FetchError`."""
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
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise not_found(f"{shown}: no such file") from None
        except PermissionError:
            raise forbidden(f"{shown}: permission denied") from None
        except OSError as exc:
            raise failed(f"{shown}: cannot open it ({exc.strerror or type(exc).__name__})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise not_found(f"{shown} is not a regular file")
        with os.fdopen(fd, "rb") as file:
            check_declared_size(info.st_size, self._max_bytes, reference)
            data = file.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:  # the file grew after the size check
            raise over_the_limit(reference, self._max_bytes)
        return data

    def close(self) -> None:
        """Nothing to close: each read opens and closes its own file."""
