"""What every `fgid` command shares: the console, --set parsing and common option types."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fgid.errors import FailureError, MultiLineError, UsageError

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
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise typer.BadParameter(
                f"cannot read the value of {pair!r}", param_hint="--set"
            ) from None
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


def config_from(model_cls, path: Path | None, overrides: dict[str, object]):
    """A typed config: YAML (if any), then dotted overrides; errors are one-line usage errors."""
    from pydantic import ValidationError

    from fgid.config import ConfigError, check_setting, describe_error, read_yaml

    data = read_yaml(path) if path else {}
    for dotted, value in overrides.items():
        check_setting(model_cls, dotted)
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is not a section in {path}")
        node[leaf] = value
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        where = f" (in {path} or --set)" if path else ""
        raise ConfigError(describe_error(error) + where) from None


@contextlib.contextmanager
def prefect_session(enabled: bool = True):
    """Run the body against PREFECT_API_URL or the local fgid Prefect server (started if needed)."""
    if not enabled:
        yield None
        return
    from flows.local_server import prefect_api

    with prefect_api(say=lambda line: console.print(line, highlight=False)) as url:
        yield url


PrefectOpt = Annotated[
    bool, typer.Option(help="Run as a Prefect flow (a temporary local server if none is set).")
]


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FGID_DEBUG", "") not in ("", "0")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _click_errors() -> tuple[tuple, tuple]:
    """(usage errors, no-args-is-help errors) of click, and of the copy newer typers vendor."""
    import click.exceptions as plain

    usage, no_args = [plain.UsageError], [getattr(plain, "NoArgsIsHelpError", None)]
    with contextlib.suppress(ImportError):
        import typer._click.exceptions as vendored

        usage.append(vendored.UsageError)
        no_args.append(getattr(vendored, "NoArgsIsHelpError", None))
    return tuple(usage), tuple(e for e in no_args if e is not None)


def run_cli(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the `fgid` command; a mistake or failure becomes one line on stderr and an exit code.

    2: a usage error (a bad option, path or setting, an output that holds another build);
    1: a failure; 130: interrupted. `--debug` anywhere, or FGID_DEBUG=1, shows the traceback.
    """
    usage_errors, no_args_errors = _click_errors()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        result = app(args=argv, prog_name="fgid", standalone_mode=False)
    except no_args_errors as error:
        console.print(error.ctx.get_help(), markup=False, highlight=False)
        return 2
    except usage_errors as error:
        if debug:
            raise
        where = error.ctx.command_path if error.ctx else "fgid"
        hint = f" (see {where} --help)" if error.ctx else ""
        _say_error(where, error.format_message() + hint)
        return 2
    except (KeyboardInterrupt, typer.Abort):
        console.print("interrupted (rerun the same command to resume)")
        return 130
    except Exception as error:  # noqa: BLE001 - the boundary where any failure becomes one line
        if debug:
            raise
        usage = isinstance(error, UsageError)
        message = str(error) or type(error).__name__
        if not usage and not isinstance(error, FailureError | OSError):
            message = f"{type(error).__name__}: {message} (rerun with --debug for the traceback)"
        _say_error("fgid", message, keep_lines=isinstance(error, MultiLineError))
        return 2 if usage else 1
    return result if isinstance(result, int) else 0


def _say_error(where: str, message: str, keep_lines: bool = False) -> None:
    text = message if keep_lines else _one_line(message)
    console.print(f"[red]{where}: error:[/] {escape(text)}", highlight=False)
