"""Every ```python block of README.md runs as written, in a folder laid out as after make demo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def after_demo(phantom_store, tmp_path_factory) -> Path:
    """A working folder with `demo/store.h5`, as `make demo` leaves the repository."""
    root = tmp_path_factory.mktemp("readme")
    (root / "demo").mkdir()
    shutil.copy(phantom_store, root / "demo" / "store.h5")
    return root


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_python_block_runs_as_written(after_demo, index):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=after_demo,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, (
        f"README block {index}:\n{BLOCKS[index]}\n{result.stderr[-3000:]}"
    )
