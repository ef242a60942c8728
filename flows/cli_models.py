"""The `fgid models` command: every model weight, where it is looked for, and fetching it."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_common import ConfigOpt, SetOpt, config_from, console, parse_overrides

models_app = typer.Typer(
    help="Model weights: where each is looked for and whether it is here; fetch what is missing.",
    invoke_without_command=True,
)


def _rows(config, set_: list[str]) -> list:
    """The build's set as configured (full and lite), then the training and evaluation
    defaults; one row per file or model."""
    from fgid.config import BuildConfig
    from fgid.weights import full_weights, lite_weights
    from training.weights import default_weights, merged

    build = config_from(BuildConfig, config, parse_overrides(set_))
    full = build.models.model_copy(update={"set": "full"})
    return merged([*full_weights(full), *lite_weights(), *default_weights(full)])


WIDE_TABLE = 160  # columns needed for the table to keep each cell on a line or two


def _table(rows: list) -> Table:
    table = Table(title="Model weights", title_justify="left")
    for column in ("weight", "used by", "looked for at", "setting", "size", "licence", "present"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            escape(row.name), escape(row.used_by), escape(row.where), escape(row.setting),
            row.size, escape(row.licence), _present(row),
        )  # fmt: skip
    return table


def _present(row) -> str:
    if row.note:
        return f"[yellow]{escape(row.note)}[/]"
    return "[green]yes[/]" if row.present else "[red]no[/]"


@models_app.callback()
def models_table(ctx: typer.Context, config: ConfigOpt = None, set_: SetOpt = []) -> None:  # noqa: B006 - typer needs a list default
    """List every weight the full and lite sets, training and evaluation load."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _rows(config, set_)
    out = Console()
    if out.width >= WIDE_TABLE:
        out.print(_table(rows))
    else:  # seven columns folded into 80 are unreadable: one block per weight instead
        for row in rows:
            out.print(f"{_present(row)}  [bold]{escape(row.name)}[/]  ({row.size}, "
                      f"{escape(row.licence)})", highlight=False)  # fmt: skip
            for label, value in (("used by", row.used_by), ("file", row.where),
                                 ("setting", row.setting)):  # fmt: skip
                out.print(f"      {label:<8} {escape(value)}", highlight=False, soft_wrap=True)
    missing = [r for r in rows if not r.present and not r.note]
    if missing:
        console.print(
            f"{len(missing)} missing: `fgid models download` fetches those it can "
            "(training and evaluation rows show their default settings; `fgid train` and "
            "`fgid evaluate` check the ones you give them before loading)",
            highlight=False,
        )


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in {"1", "true", "yes", "on"}


@models_app.command("download")
def download_cmd(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Only these (insightface, bisenet, llava, sd15, sdxl, clip-h, ...)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
) -> None:
    """Fetch the missing weights (InsightFace's and facexlib's downloaders, the Hugging Face
    cache, torch hub), to where `fgid models` looks for them."""
    from fgid.errors import FailureError, UsageError

    rows = _rows(config, set_)
    known = sorted({r.key for r in rows})
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"unknown weight {', '.join(unknown)}; known: {', '.join(known)}")
        rows = [r for r in rows if r.key in names]
    absent = [r for r in rows if not r.present and not r.note]
    manual = [r for r in absent if r.fetch is None]
    todo = {r.key: r for r in absent if r.fetch is not None}
    for row in manual:
        console.print(f"{escape(row.name)}: not fetched here; {escape(row.command)}")
    if not todo:
        console.print("nothing to download: every weight asked for is here" if not absent else "")
        return
    if _offline():
        raise FailureError(
            f"HF_HUB_OFFLINE is set, so nothing was downloaded ({', '.join(todo)}); unset it "
            "on a machine with internet, or copy the weights to where `fgid models` looks"
        )
    failed = []
    for key, row in todo.items():
        console.print(f"fetching {key}: {escape(row.name)} -> {escape(row.where)}")
        try:
            row.fetch()
        except Exception as error:  # noqa: BLE001 - every failure is reported, the rest still run
            failed.append(f"{key}: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
    if failed:
        raise FailureError("could not fetch " + "; ".join(failed))
    console.print(f"fetched {', '.join(todo)}")
