"""fgid's version, installed or run from a source tree on PYTHONPATH (as the GPU check runs)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version as installed
from pathlib import Path

import fgid

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_installed_distributions():
    assert fgid.version() == installed("fgid")


def test_a_source_tree_without_installed_metadata_reads_pyproject():
    # -S: no site-packages, so no fgid distribution metadata; only the source tree.
    code = "import fgid; print(fgid.version())"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert out == tomllib.load(f)["project"]["version"]
