"""The build history: one record per build or append of new inputs, shown by `fgid inspect`.

A record is written when its shards are planned, before the plan grows, and marked done when
finalize has seen every shard. Its `first_shard` is where its inputs start; finalize keeps the
identities of every sample before the latest record's first shard (fgid.finalize).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fgid.dataset import Dataset, write_json
from fgid.inputs import PlannedShard

BUILD, APPEND = "build", "append"
PLANNED, DONE = "planned", "done"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def start(
    dataset: Dataset,
    kind: str,
    plans: list[PlannedShard],
    inputs: list[str],
    missing: int = 0,
) -> dict:
    """Record a build or append of `plans` (its new shards), before they are written to the plan.

    A record left "planned" whose shards never reached the plan (a kill in between) is replaced,
    so a rerun records the same addition once."""
    records = dataset.history()
    first = plans[0].shard_id if plans else None
    number = len(records)
    if records and records[-1]["status"] == PLANNED and records[-1]["first_shard"] == first:
        number -= 1
    record = {
        "number": number,
        "kind": kind,
        "started": _now(),
        "finished": None,
        "status": PLANNED,
        "inputs": [str(i) for i in inputs],
        "inputs_added": sum(p.size for p in plans),
        "inputs_missing": missing,
        "first_shard": first,
        "last_shard": plans[-1].shard_id if plans else None,
        "shards_added": len(plans),
        "samples_added": None,
    }
    write_json(dataset.history_url(number), record)
    return record


def record_earlier_build(dataset: Dataset, plans: list[PlannedShard]) -> None:
    """A dataset built before it kept a history gets a record of that build first."""
    if plans and not dataset.history():
        record = start(dataset, BUILD, plans, [])
        record.update(started=None, status=DONE, samples_added=_kept(dataset, 0, None))
        write_json(dataset.history_url(record["number"]), record)


def pending(dataset: Dataset) -> list[dict]:
    return [r for r in dataset.history() if r["status"] != DONE]


def boundary(dataset: Dataset) -> int:
    """The first shard of the latest append (0 without one): samples before it keep their
    identities."""
    appends = [r for r in dataset.history() if r["kind"] == APPEND and r["first_shard"] is not None]
    return appends[-1]["first_shard"] if appends else 0


def finish(dataset: Dataset) -> None:
    """Mark every planned record done, with the samples its shards kept."""
    records = dataset.history()
    for i, record in enumerate(records):
        if record["status"] == DONE:
            continue
        later = [r["first_shard"] for r in records[i + 1 :] if r["first_shard"] is not None]
        first = record["first_shard"]
        added = 0 if first is None else _kept(dataset, first, later[0] if later else None)
        record.update(status=DONE, finished=_now(), samples_added=added)
        write_json(dataset.history_url(record["number"]), record)


def _kept(dataset: Dataset, first: int, end: int | None) -> int:
    """Samples kept by the done shards in [first, end)."""
    return sum(
        dataset.read_stats(s)["ok"]
        for s in dataset.done_shards()
        if s >= first and (end is None or s < end)
    )


def history_lines(dataset: Dataset) -> list[str]:
    """`fgid inspect`'s history section: one line per build or append, oldest first."""
    lines = []
    for r in dataset.history():
        when = (r.get("finished") or r.get("started") or "before the history")[:19]
        line = (
            f"{when.replace('T', ' ')}  {r['kind']:<6}  +{r['inputs_added']} inputs, "
            f"+{r['shards_added']} shards, "
            f"+{r['samples_added'] if r['samples_added'] is not None else '?'} samples"
        )
        if r.get("inputs_missing"):
            line += f", {r['inputs_missing']} inputs missing"
        if r["status"] != DONE:
            line += " (unfinished: rerun to complete)"
        lines.append(line)
    return lines
