"""Imports go one way: flows/ -> training/ -> fgid/ -> storage/; only flows/ imports Prefect."""

from __future__ import annotations

import ast
import sys
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


# Inside fgid/: the format layer (schema, shard tars, the dataset) knows nothing of the
# commands built on it, and the build does not reach into takedowns or caption runs.
LOW_LEVEL = ("fgid.schema", "fgid.shardtar", "fgid.dataset", "fgid.writer")
FEATURES = ("fgid.pipeline", "fgid.removal", "fgid.captioning.run", "fgid.captioning.recaption",
            "fgid.export", "fgid.finalize", "fgid.card")  # fmt: skip
LAYERS = {
    **{low: FEATURES for low in LOW_LEVEL},
    "fgid.pipeline": (
        "fgid.removal",
        "fgid.captioning.run",
        "fgid.captioning.recaption",
        "fgid.export",
    ),
}


def fgid_imports(path: Path) -> set[str]:
    """Full names of the fgid modules `path` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("fgid"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from fgid import schema` imports fgid.schema; `from fgid.x import f`, fgid.x.
            names.update(f"{node.module}.{a.name}" for a in node.names)
            names.add(node.module)
    return names


def fgid_graph() -> dict[str, set[str]]:
    modules = {}
    for path in (ROOT / "fgid").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return {
        name: {m for m in fgid_imports(path) if m in modules and m != name and m.startswith("fgid")}
        for name, path in modules.items()
    }


def test_format_layer_does_not_import_the_commands():
    graph = fgid_graph()
    offenders = {
        low: sorted(m for m in graph.get(low, ()) if m.startswith(banned))
        for low, banned in LAYERS.items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_among_fgid_modules():
    graph = fgid_graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules is not a loop.
    real = [c for c in cycles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
    assert real == []


def test_cycle_detector_sees_a_loop_hidden_in_a_function(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from fgid.captioning.run import CAPTIONS_DIR\n")
    assert "fgid.captioning.run" in fgid_imports(sample)


def test_no_module_shadows_the_standard_library():
    """Prefect puts a path entrypoint's folder (flows/serve.py -> flows/) on sys.path, and a
    spawned process (a DataLoader worker) rebuilds its imports from that path: a flows/secrets.py
    once hid the stdlib `secrets` there, the worker died importing huggingface_hub, and the
    parent hung writing the worker's start-up data into a pipe nobody read."""
    ours = {
        path.stem if path.name != "__init__.py" else path.parent.name
        for package in ("fgid", "flows", "storage", "training")
        for path in (ROOT / package).rglob("*.py")
    }
    assert sorted(ours & set(sys.stdlib_module_names)) == []
