"""Rewrite the configuration table in README.md from the settings model.

``python -m worker.devtools.readme_table`` (``make docs``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from worker.config import markdown_table

_BLOCK = re.compile(r"<!-- settings-table:start -->\n.*?<!-- settings-table:end -->\n", re.S)


def render(readme: str) -> str:
    """README text with its settings table regenerated."""
    block = f"<!-- settings-table:start -->\n{markdown_table()}<!-- settings-table:end -->\n"
    return _BLOCK.sub(lambda _match: block, readme)


def main() -> int:
    """Update README.md in the current directory."""
    path = Path("README.md")
    path.write_text(render(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
