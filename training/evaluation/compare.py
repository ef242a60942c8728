"""Several evaluation runs side by side: one row per run with the paper's columns (FGID_SPEC §7),
and what makes two rows not comparable (other images, seed or metric models).

A run is a folder `run.evaluate` wrote; its `evaluation.json`, written after the tables, marks it
complete. The table goes to the terminal (flows/cli_train.py) or a file: Markdown, CSV, Parquet.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

import storage
from fgid.errors import UsageError
from training.evaluation.run import (
    ABOUT,
    ALL,
    PER_IMAGE,
    SUMMARY,
    SUMMARY_COLUMNS,
    SUMMARY_SCHEMA,
    markdown_table,
    read_table,
)

LABELS = ("run", "generator", "images")  # the columns before the metrics
# A row: the run, then its summary row's columns (types as in summary.parquet) and its seed.
SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("out_dir", pa.string()),
        *(SUMMARY_SCHEMA.field(c) for c in ("generator", "category", "images")),
        ("seed", pa.int64()),
        *(SUMMARY_SCHEMA.field(c) for c in SUMMARY_COLUMNS),
    ]
)
COLUMNS = tuple(SCHEMA.names)
FORMATS = (".md", ".csv", ".parquet")


class NotAnEvaluation(UsageError):
    """A folder given as a run that `fgid evaluate` did not finish writing."""


@dataclass
class Comparison:
    rows: list[dict]  # one per run, in the order given: COLUMNS
    notes: list[str]  # why some rows are not comparable with the first; empty when all are
    category: str = ALL

    @property
    def title(self) -> str:
        return "Evaluation" + ("" if self.category == ALL else f": {self.category} prompts")

    def markdown(self) -> str:
        notes = "".join(f"\n> not comparable: {n}\n" for n in self.notes)
        return markdown_table(self.rows, LABELS, self.title) + notes


@dataclass
class _Run:
    out_dir: str
    about: dict
    summary: list[dict]
    images: set[tuple[str, int]]  # (reference key, prompt index)


def _read_run(out_dir: str) -> _Run:
    def refuse(why: str) -> NotAnEvaluation:
        return NotAnEvaluation(f"{out_dir} is not an fgid evaluate output: {why}")

    if not storage.exists(storage.join(out_dir, ABOUT)):
        if not storage.exists(out_dir):
            raise refuse("no such folder")
        unfinished = storage.exists(storage.join(out_dir, "images"))
        raise refuse(
            f"no {ABOUT}"
            + (
                " (its images are there: rerun its fgid evaluate to finish it)"
                if unfinished
                else ""
            )
        )
    try:
        about = json.loads(storage.read_text(storage.join(out_dir, ABOUT)))
        summary = read_table(out_dir, SUMMARY)
        per_image = read_table(out_dir, PER_IMAGE, ["key", "prompt_index"])
    except (ValueError, OSError, pa.ArrowException) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise refuse(f"its tables do not read ({reason})") from None
    if not isinstance(about, dict) or "generator" not in about:
        raise refuse(f"{ABOUT} names no generator")
    images = {(r["key"], r["prompt_index"]) for r in per_image}
    return _Run(out_dir, about, summary, images)


def _labels(out_dirs: Sequence[str]) -> list[str]:
    """Each run's folder name, or the whole path where two runs share a name."""
    names = [storage.name(d) for d in out_dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, out_dirs, strict=True)]


def _notes(runs: list[_Run], labels: list[str]) -> list[str]:
    first, label = runs[0], labels[0]
    notes = []
    for run, name in zip(runs[1:], labels[1:], strict=True):
        if run.images != first.images:
            shared = len(run.images & first.images)
            notes.append(
                f"{name} drew other images than {label} ({len(run.images)} and "
                f"{len(first.images)}, {shared} in common): other references or prompts"
            )
        if run.about.get("seed") != first.about.get("seed"):
            notes.append(
                f"{name} used seed {run.about.get('seed')}, {label} seed {first.about.get('seed')}"
            )
        mine, theirs = run.about.get("models", {}), first.about.get("models", {})
        other = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if other:
            notes.append(
                f"{name} was scored with other metric models than {label}: "
                + ", ".join(f"{k} {mine.get(k)} vs {theirs.get(k)}" for k in other)
            )
    return notes


def compare_runs(out_dirs: Sequence[str], category: str = ALL) -> Comparison:
    """One row per run in `out_dirs` (local folders or s3:// URLs): its summary row of
    `category` (default all prompts), labelled with the run's folder name and generator."""
    out_dirs = [str(d).rstrip("/") or str(d) for d in out_dirs]
    if not out_dirs:
        raise UsageError("give at least one fgid evaluate output folder")
    twice = sorted({d for d in out_dirs if out_dirs.count(d) > 1})
    if twice:
        raise UsageError(f"{', '.join(twice)} given more than once")
    runs = [_read_run(d) for d in out_dirs]
    labels = _labels(out_dirs)
    rows = []
    for run, label in zip(runs, labels, strict=True):
        found = {r["category"]: r for r in run.summary}
        if category not in found:
            raise UsageError(
                f"{run.out_dir} has no {category!r} prompts (it has {', '.join(found)})"
            )
        summary = found[category]
        rows.append(
            {
                "run": label,
                "out_dir": run.out_dir,
                "generator": run.about["generator"],
                "category": category,
                "images": int(summary["images"]),
                "seed": run.about.get("seed"),
                **{c: summary[c] for c in SUMMARY_COLUMNS},
            }
        )
    return Comparison(rows, _notes(runs, labels), category)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:  # an unmeasured value is an empty cell
        writer.writerow(
            {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        )
    return buffer.getvalue()


def write_comparison(comparison: Comparison, path: str) -> str:
    """Write the table to `path` as its suffix says: .md (one decimal, the notes below it), .csv
    or .parquet (full precision, COLUMNS). Returns the path written."""
    suffix = next((s for s in FORMATS if str(path).lower().endswith(s)), None)
    if suffix is None:
        raise UsageError(f"{path}: write the table as {', '.join(FORMATS)}")
    if suffix == ".md":
        storage.atomic_write_text(path, comparison.markdown())
    elif suffix == ".csv":
        storage.atomic_write_text(path, _csv(comparison.rows))
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(comparison.rows, schema=SCHEMA), buffer)
        storage.atomic_write_bytes(path, buffer.getvalue())
    return str(path)
