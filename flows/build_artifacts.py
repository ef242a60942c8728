"""What a build shows in the Prefect UI: live progress, per-shard table, failures, outputs.

Every artifact is created from the flow's thread, so it belongs to the flow run itself (not to
a task run), and carries a key made from the dataset's name, so each kind has one entry in the
artifact catalog whose versions are the history of that dataset's builds.
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from pathlib import Path

from prefect import get_client
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.schemas.actions import ArtifactUpdate

import storage
from fgid import progress
from fgid.config import BuildConfig
from fgid.inputs import PlannedShard
from fgid.report import STAGES, summary_markdown, summary_table
from fgid.schema import shard_name

# The UI polls; a build can finish thousands of batches. One update every few seconds is live
# enough and costs the server nothing.
UPDATE_SECONDS = 3.0
# What flows/serve.py puts in a scheduled output folder's name: {date}, {datetime}, expanded
# (2026-11-03, 2026-11-03_020000) or not yet (the deployment's template).
DATED = re.compile(r"[-_.]?(\d{4}-\d{2}-\d{2}(_\d{6})?|\{date\}|\{datetime\})")


def dataset_name(out: str) -> str:
    """The dataset's name for keys and tags: its folder's name without a scheduled build's date,
    so `fgid-2026-11-03` and `fgid-2026-11-04` are one dataset; a bare date folder takes its
    parent's name."""
    name = DATED.sub("", storage.name(out)).strip("-_.")
    if name:
        return name
    parent = str(out).rstrip("/").rsplit("/", 1)[0]
    return dataset_name(parent) if parent and parent != str(out) else storage.name(out)


def artifact_key(kind: str, name: str) -> str:
    # Artifact keys allow only lowercase letters, digits and dashes.
    slug = re.sub(r"[^a-z0-9-]+", "-", storage.name(name).lower()).strip("-")
    return f"fgid-{kind}-{slug}"[:100]


def link(url: str) -> str:
    """An address the UI can link to: s3:// as is, a local path as file://."""
    return url if storage.is_remote(url) else Path(url).expanduser().absolute().as_uri()


def resume_command(inputs: list[str], out: str, config: BuildConfig) -> str:
    """The `fgid build` command that resumes this build: same inputs, output and settings."""
    args = ["fgid", "build", *inputs, "--out", out]
    default = BuildConfig().model_dump(mode="json")
    for dotted, value in _changed(default, config.model_dump(mode="json")):
        if dotted == "models.set":
            args += ["--models", str(value)]
        elif dotted == "shard_size":
            args += ["--shard-size", str(value)]
        else:
            args += ["--set", f"{dotted}={value}"]
    return shlex.join(args)


def _changed(default: dict, now: dict, prefix: str = "") -> list[tuple[str, object]]:
    found = []
    for name, value in now.items():
        if isinstance(value, dict):
            found += _changed(default.get(name, {}), value, f"{prefix}{name}.")
        elif value != default.get(name):
            found.append((f"{prefix}{name}", "null" if value is None else value))
    return found


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class BuildReport:
    """The run's progress artifacts and per-shard rows, fed by fgid.progress events.

    Events arrive on task threads (per batch) and on the flow's thread (per shard); `refresh`,
    called only from the flow's thread, turns them into at most one API update every
    UPDATE_SECONDS."""

    def __init__(self, name: str, plans: list[PlannedShard], done_before: list[dict]) -> None:
        self.name = name
        self.planned_shards = len(plans)
        self.planned_inputs = sum(p.size for p in plans)
        self.tracker = progress.Tracker()
        self.rows: dict[int, dict] = {
            p.shard_id: {
                "shard": shard_name(p.shard_id),
                "state": "planned",
                "inputs": p.size,
            }
            for p in plans
        }
        self.failures: dict[int, str] = {}
        self.skipped = [s["shard"] for s in done_before]
        self.started = time.monotonic()
        self._last_update = 0.0
        self._lock = threading.Lock()
        self._unsubscribe = progress.subscribe(self.tracker)
        for stats in done_before:
            progress.shard_skipped(stats)
            self._row(stats, "done before this run", stats.get("wall_seconds"))
        self._bar = create_progress_artifact(
            self.percent(),
            key=artifact_key("progress", name),
            description=self.line(),
        )
        self._status = create_markdown_artifact(
            self.markdown(), key=artifact_key("status", name), description="FGID build status"
        )

    def close(self) -> None:
        self._unsubscribe()

    # Events, on the flow's thread.

    def shard_built(self, stats: dict) -> None:
        progress.shard_finished(stats)
        self._row(stats, "built", stats.get("task_seconds", stats.get("wall_seconds")))
        self.refresh()

    def shard_failed(self, shard_id: int, error: str) -> None:
        progress.shard_failed(shard_id)
        self.failures[shard_id] = error
        self.rows[shard_id].update(state="failed", error=error)
        self.refresh()

    def _row(self, stats: dict, state: str, seconds: float | None) -> None:
        self.rows[stats["shard"]].update(
            state=state,
            inputs=stats["inputs"],
            kept=stats["ok"],
            rejected=stats["rejected"],
            reasons=stats.get("reasons", {}),
            seconds=seconds,
        )

    # Figures.

    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.started
        built = self.tracker.inputs - self.tracker.skipped
        return built / elapsed if built and elapsed > 0 else None

    def percent(self) -> float:
        return (
            round(100.0 * self.tracker.inputs / self.planned_inputs, 1)
            if self.planned_inputs
            else 100.0
        )

    def shards_done(self) -> int:
        return sum(r["state"] in ("built", "done before this run") for r in self.rows.values())

    def line(self, state: str = "running") -> str:
        rate = self.rate()
        left = self.planned_inputs - self.tracker.inputs
        eta = left / rate if rate and state == "running" else None
        parts = [
            f"{state}: {self.shards_done()} of {self.planned_shards} shards",
            f"{self.tracker.inputs} of {self.planned_inputs} inputs",
            f"{self.tracker.rejected} rejected",
            f"{rate:.2f} inputs/s" if rate else "-- inputs/s",
        ]
        if state == "running":
            parts.append(f"ETA {_duration(eta)}")
        if self.failures:
            parts.append(f"{len(self.failures)} shard(s) failed")
        return ", ".join(parts)

    def markdown(self, state: str = "running") -> str:
        lines = [f"# Build `{self.name}`: {state}", "", self.line(state), ""]
        if self.skipped:
            done = ", ".join(shard_name(s) for s in self.skipped)
            lines += [f"Resumed: {len(self.skipped)} shard(s) done before this run ({done}).", ""]
        lines += ["| shard | state | inputs | kept | rejected |", "|---|---|---:|---:|---:|"]
        for row in self.rows.values():
            lines.append(
                f"| {row['shard']} | {row['state']} | {row['inputs']} "
                f"| {row.get('kept', '')} | {row.get('rejected', '')} |"
            )
        return "\n".join(lines)

    # Artifacts.

    def refresh(self, state: str = "running", force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._last_update < UPDATE_SECONDS:
                return
            self._last_update = time.monotonic()
            percent = 100.0 if state == "completed" else self.percent()
            with get_client(sync_client=True) as client:
                bar = ArtifactUpdate(data=percent, description=self.line(state))
                client.update_artifact(self._bar, bar)
                client.update_artifact(self._status, ArtifactUpdate(data=self.markdown(state)))

    def seconds_to_next_update(self) -> float:
        return max(0.1, UPDATE_SECONDS - (time.monotonic() - self._last_update))

    def shard_table(self) -> None:
        """One table per run: each shard's inputs, kept, rejections by reason, seconds."""
        reasons = sorted({r for row in self.rows.values() for r in row.get("reasons", {})})
        table = []
        for row in self.rows.values():
            table.append(
                {
                    "shard": row["shard"],
                    "state": row["state"],
                    "inputs": row["inputs"],
                    "kept": row.get("kept", ""),
                    "rejected": row.get("rejected", ""),
                    **{f"rejected: {r}": row.get("reasons", {}).get(r, 0) for r in reasons},
                    "seconds (with model load)": row.get("seconds", ""),
                    "error": row.get("error", ""),
                }
            )
        create_table_artifact(
            table,
            key=artifact_key("shards", self.name),
            description=f"FGID shards of this run; stages {' > '.join(STAGES)}",
        )

    def failure(self, inputs: list[str], out: str, config: BuildConfig, deployed: bool) -> str:
        """The failure artifact: each failed shard with its error, and how to resume."""
        rows = "\n".join(
            f"| {shard_name(s)} | {_cell(e)} |" for s, e in sorted(self.failures.items())
        )
        again = [
            "Finished shards are kept: resuming builds only the failed ones, once the cause is "
            "fixed. Resume with:",
            "",
            f"```\n{resume_command(inputs, out, config)}\n```",
        ]
        if deployed:
            again += ["", "or retry this flow run from the UI (it builds into the same folder)."]
        markdown = "\n".join(
            [
                f"# Build `{self.name}` failed: {len(self.failures)} shard(s)",
                "",
                self.line("failed"),
                "",
                "| shard | error |",
                "|---|---|",
                rows,
                "",
                *again,
            ]
        )
        create_markdown_artifact(
            markdown, key=artifact_key("failure", self.name), description="FGID failed shards"
        )
        return markdown


def _cell(text: str) -> str:
    # Plain text that wraps in a table cell (a code span would not), Markdown escaped.
    text = " ".join(text.split())[:1000]
    for char in "\\`*_|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;")


def publish_summary(name: str, out: str, summary: dict, card: dict | None) -> None:
    """Summary, counts, card and the output's links, on the flow run."""
    markdown = summary_markdown(summary, out)
    if not summary["complete"]:
        inputs, shards = summary["inputs"], summary["shards"]
        markdown = (
            f"**{shards['done']} of {shards['planned']} shards, {inputs['indexed']} of "
            f"{inputs['planned']} planned inputs.**\n\n{markdown}"
        )
    create_markdown_artifact(
        markdown, key=artifact_key("summary", name), description="FGID build summary"
    )
    create_table_artifact(
        summary_table(summary), key=artifact_key("counts", name), description="FGID build counts"
    )
    create_link_artifact(
        link(out), link_text=str(out), key=artifact_key("output", name),
        description="FGID dataset: shards, index, summary",
    )  # fmt: skip
    if card is None:
        return
    # The API stores no binary artifacts; the UI renders data: images inside Markdown.
    create_markdown_artifact(
        f"{card['embedded_markdown']}\n\nFiles: `{card['readme']}` and its PNG plots.",
        key=artifact_key("card", name),
        description="FGID dataset card",
    )
    create_link_artifact(
        link(card["readme"]), link_text=str(card["readme"]), key=artifact_key("card-file", name),
        description="FGID dataset card (README.md)",
    )  # fmt: skip
