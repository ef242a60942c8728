"""What every `fgid` command shares: the console, --set parsing and common option types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# soft_wrap: long paths in messages stay on one line (users grep them, tests read them).
console = Console(stderr=True, soft_wrap=True)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """--set section.field=value pairs -> {dotted name: YAML-parsed value}."""
    import yaml

    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(
                f"expected section.field=value, got {pair!r}", param_hint="--set"
            )
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


ModelsOpt = Annotated[
    str | None,
    typer.Option(
        help="Model set: 'full' (InsightFace, BiSeNet, LLaVA; the default) "
        "or 'lite' (CPU, offline)."
    ),
]
ConfigOpt = Annotated[Path | None, typer.Option(help="YAML config; flags and --set override it.")]
SetOpt = Annotated[
    list[str], typer.Option("--set", help="Override any setting: --set section.field=value")
]
PrefectOpt = Annotated[
    bool, typer.Option(help="Run as a Prefect flow (a temporary local server if none is set).")
]
