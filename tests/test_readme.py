"""Every ```python block of README.md and of every package's guide runs as written, in a
folder laid out as after make demo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [
    ROOT / "README.md",
    *(ROOT / name / "README.md" for name in ("preprocess", "loader", "training", "scripts")),
]
BLOCKS = [
    (f"{guide.relative_to(ROOT)} block {index}", block)
    for guide in GUIDES
    for index, block in enumerate(
        re.findall(r"^```python\n(.*?)^```", guide.read_text(), re.M | re.S)
    )
]


def test_the_readme_has_python_examples():
    assert sum(name.startswith("README.md") for name, _ in BLOCKS) >= 2


def test_every_guide_is_linked_from_the_readme_and_links_back():
    front = (ROOT / "README.md").read_text()
    for guide in GUIDES[1:]:
        assert f"({guide.relative_to(ROOT)})" in front, guide
        assert "(../README.md)" in guide.read_text(), guide


@pytest.fixture(scope="module")
def after_demo(phantom_store, phantom_bids, tmp_path_factory) -> Path:
    """A working folder with `demo/store.h5` and `demo/bids/`, as `make demo` leaves the
    repository."""
    root = tmp_path_factory.mktemp("readme")
    (root / "demo").mkdir()
    shutil.copy(phantom_store, root / "demo" / "store.h5")
    shutil.copytree(phantom_bids, root / "demo" / "bids")
    return root


@pytest.mark.parametrize(("name", "block"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_a_python_block_runs_as_written(after_demo, name, block):
    result = subprocess.run(
        [sys.executable, "-c", block],
        cwd=after_demo,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, f"{name}:\n{block}\n{result.stderr[-3000:]}"
