"""Regenerate the settings table of docs/configuration.md from the settings model.

``python -m worker.devtools.docs_table`` rewrites the block between ``<!-- settings-table:start -->`` and
``<!-- settings-table:end -->`` (``make docs``); ``--check`` only says whether it is current and exits 1
when it is not (``make docs-check``, in CI).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from worker.config import markdown_table

PAGE = Path("docs") / "configuration.md"

_BLOCK = re.compile(r"<!-- settings-table:start -->\n.*?<!-- settings-table:end -->\n", re.S)


def render(page: str) -> str:
    """The page's text with its settings table regenerated."""
    block = f"<!-- settings-table:start -->\n{markdown_table()}<!-- settings-table:end -->\n"
    if not _BLOCK.search(page):
        raise ValueError("no <!-- settings-table:start/end --> block in the page")
    return _BLOCK.sub(lambda _match: block, page)


def main(argv: list[str] | None = None) -> int:
    """Update (or with --check, verify) docs/configuration.md under the current directory."""
    args = sys.argv[1:] if argv is None else argv
    text = PAGE.read_text()
    current = render(text)
    if "--check" in args:
        if current != text:
            print(f"{PAGE} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        PAGE.write_text(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
