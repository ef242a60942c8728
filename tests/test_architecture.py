"""Imports go one way: flows/ -> training/ -> fgid/ -> storage/; only flows/ imports Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "fgid": ("prefect", "flows", "training"),
    "storage": ("prefect", "flows", "training", "fgid"),
    "training": ("prefect", "flows"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & set(FORBIDDEN[package]))
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_detector_of_forbidden_imports_sees_them(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import prefect\nfrom flows.build import build\nfrom . import x\n")
    assert imported_modules(sample) == {"prefect", "flows"}


def test_importing_fgid_loads_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys, fgid.pipeline, fgid.finalize, fgid.report, fgid.samples;"
        "heavy = {'torch', 'prefect', 'insightface', 'transformers', 'dlib', 'facexlib'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
