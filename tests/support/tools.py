"""External tools the deployment checks need: present in CI (installed by .ci/run), optional on a laptop."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require_tool(name: str, install_hint: str) -> str:
    """Path of ``name``; a failure in CI (where .ci/run installs it), a skip elsewhere."""
    venv_bin = Path(sys.executable).parent / name
    path = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing in CI; {install_hint}")
    pytest.skip(f"{name} not installed ({install_hint})")
