"""fgid: FGID-style fine-grained face datasets, and the models trained on them."""

from __future__ import annotations

from functools import cache


@cache
def version() -> str:
    """fgid's version: the installed distribution's, else that of the pyproject.toml beside a
    source tree put on PYTHONPATH without installing it (as the GPU check runs), else unknown."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    from pathlib import Path

    try:
        return installed("fgid")
    except PackageNotFoundError:
        pass
    import tomllib

    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"
