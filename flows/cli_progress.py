"""The build's progress bar: inputs done of planned, rejections, rate and ETA; logs above it.

Fed by fgid.progress events, so it moves per batch with or without Prefect. While it is shown,
Prefect's console handlers and fgid's own log lines print through the bar's console, which
draws them above the bar instead of over it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fgid import progress


class RateColumn(ProgressColumn):
    """Inputs per second over this run (inputs of shards done before it are not counted)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            f"{speed:.1f} inputs/s" if speed else "-- inputs/s", style="progress.data.speed"
        )


def _prefect_console_handlers() -> list[logging.Handler]:
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # Prefect not imported in this mode
        return []
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]


@contextlib.contextmanager
def logs_through(console: Console) -> Iterator[None]:
    """Route Prefect's and fgid's console logging through `console` (so above a live bar)."""
    swapped = [(h, h.console) for h in _prefect_console_handlers() if hasattr(h, "console")]
    for handler, _old in swapped:
        handler.console = console
    fgid_logger = logging.getLogger("fgid")
    ours = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    ours.setLevel(logging.INFO)
    propagate, level = fgid_logger.propagate, fgid_logger.level
    if not _prefect_console_handlers():
        # Without Prefect nothing prints fgid's records: show them (with Prefect, its console
        # handler on the root logger already does, and two handlers would print each twice).
        fgid_logger.addHandler(ours)
        fgid_logger.setLevel(logging.INFO)
        fgid_logger.propagate = False
    try:
        yield
    finally:
        for handler, old in swapped:
            handler.console = old
        if ours in fgid_logger.handlers:
            fgid_logger.removeHandler(ours)
            fgid_logger.propagate, fgid_logger.level = propagate, level


@contextlib.contextmanager
def build_progress(console: Console, total: int | None = None) -> Iterator[progress.Tracker]:
    """A bar over `total` inputs while the body builds (None: until the plan is known, from
    its `planned` event); yields the tracker it feeds."""
    bar = Progress(
        TextColumn("[bold]building[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("inputs"),
        TextColumn("{task.fields[rejected]} rejected"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    task = bar.add_task("build", total=total, rejected=0)
    tracker = progress.Tracker()

    def on_event(kind: str, payload: dict) -> None:
        if kind == "planned":
            bar.update(task, total=payload["inputs"])
            return
        added = tracker(kind, payload)
        if kind == "skipped":
            # Done before this run: fill the bar without counting it in the rate.
            bar.reset(task, completed=tracker.inputs, rejected=tracker.rejected)
            return
        bar.update(task, advance=added, rejected=tracker.rejected)

    unsubscribe = progress.subscribe(on_event)
    try:
        with bar, logs_through(console):
            yield tracker
    finally:
        unsubscribe()
