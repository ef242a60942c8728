"""A caption run over a built dataset: its id, its record, and which shards carry it.

A run is one captioner (model and generation settings) with one prompt per caption field. Its id
hashes exactly that, so rerunning the same command resumes the same run. The record
`captions/<id>.json` says what the run writes; each shard's stats say which run last wrote each of
its caption fields (that is what makes a shard "done" for a run); `captions/<id>.NNNNN.jsonl`
journals captions of a shard not yet rewritten, so a crash loses at most one batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import storage
from fgid.config import BuildConfig
from fgid.dataset import CAPTIONS_DIR, Dataset, write_json
from fgid.schema import CAPTION_PROMPT, FACIAL_PROMPT

BUILD_RUN = "build"  # owner of the captions a build wrote
DEFAULT_FIELDS = {"caption": CAPTION_PROMPT, "facial": FACIAL_PROMPT}
# A field becomes the member `{key}.{field}.txt`: no dots (webdataset splits the key at the first
# one), lowercase so it is the same name on every file system.
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


class FieldExists(RuntimeError):
    """The run would overwrite captions another run (or the build) wrote, without replace."""


@dataclass(frozen=True)
class CaptionRun:
    id: str
    source: str  # which captioner: "template" or the LLaVA hub id / model dir name
    fields: dict[str, str]  # field name -> prompt
    replace: bool = False
    settings: dict = field(default_factory=dict)


def check_fields(fields: dict[str, str]) -> dict[str, str]:
    if not fields:
        raise ValueError("a caption run needs at least one field")
    for name, prompt in fields.items():
        if not FIELD_NAME.fullmatch(name):
            raise ValueError(f"caption field {name!r}: use a-z, 0-9 and _, starting with a letter")
        if not prompt.strip():
            raise ValueError(f"caption field {name!r} has an empty prompt")
    return dict(fields)


def fields_from_options(prompts: list[str], fields: list[str]) -> dict[str, str]:
    """CLI pairs: --prompt/--field by position; a bare --field caption|facial keeps its prompt."""
    if not prompts:
        unknown = [f for f in fields if f not in DEFAULT_FIELDS]
        if unknown:
            raise ValueError(f"--field {unknown[0]} needs a --prompt")
        return check_fields({f: DEFAULT_FIELDS[f] for f in fields} if fields else DEFAULT_FIELDS)
    if len(prompts) != len(fields):
        raise ValueError("give one --field NAME for each --prompt TEXT")
    if len(set(fields)) != len(fields):
        raise ValueError("each --field may appear once")
    return check_fields(dict(zip(fields, prompts, strict=True)))


def captioner_source(config: BuildConfig) -> str:
    if config.models.set == "lite":
        return "template"
    path = Path(config.models.llava).expanduser()
    # The dir's name only, as LlavaCaptioner names it: a machine's paths stay out of the dataset.
    return path.name if path.is_dir() else config.models.llava


def plan_run(config: BuildConfig, fields: dict[str, str], replace: bool = False) -> CaptionRun:
    fields = check_fields(fields)
    source = captioner_source(config)
    settings = {} if source == "template" else {"max_new_tokens": config.caption.max_new_tokens}
    if source != "template" and config.caption.engine != "transformers":
        # Greedy answers can differ between engines: another engine is another run.
        settings["engine"] = config.caption.engine
    blob = json.dumps({"source": source, "fields": fields, "settings": settings}, sort_keys=True)
    slug = re.sub(r"[^a-z0-9]+", "-", source.lower()).strip("-")[-40:]
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return CaptionRun(f"{slug}-{digest}", source, fields, replace, settings)


def record_url(dataset: str, run_id: str) -> str:
    return Dataset(dataset).caption_record_url(run_id)


def journal_url(dataset: str, run_id: str, shard_id: int) -> str:
    return Dataset(dataset).caption_journal_url(run_id, shard_id)


def read_record(dataset: str, run_id: str) -> dict | None:
    url = record_url(dataset, run_id)
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def write_record(dataset: str, record: dict) -> None:
    storage.makedirs(Dataset(dataset).path(CAPTIONS_DIR))
    write_json(record_url(dataset, record["id"]), record)


def new_record(run: CaptionRun, previous: dict | None) -> dict:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {
        "id": run.id,
        "captioner": run.source,
        "fields": run.fields,
        "settings": run.settings,
        "replace": run.replace,
        "created": previous["created"] if previous else now,
        "status": "running",
        "completed": None,
        "models": previous["models"] if previous else [],
        "shards": previous["shards"] if previous else {"captioned": [], "not_built": []},
    }


def current_fields(stats: dict) -> dict[str, dict]:
    """Caption field -> {"run", "model"} that last wrote it in this shard (the build, at first)."""
    if "captions" in stats:
        return stats["captions"]
    model = stats.get("models", {}).get("captioner")
    return {name: {"run": BUILD_RUN, "model": model} for name in DEFAULT_FIELDS}


def shard_at_run(stats: dict, run: CaptionRun) -> bool:
    owners = current_fields(stats)
    return all(owners.get(name, {}).get("run") == run.id for name in run.fields)


def conflicts(stats: dict, run: CaptionRun) -> list[str]:
    """Fields of this shard the run would overwrite though another run owns them."""
    if run.replace:
        return []
    owners = current_fields(stats)
    return [n for n in run.fields if n in owners and owners[n]["run"] != run.id]


def built_shards(dataset: str) -> list[int]:
    """Shards whose build is committed (their stats exist)."""
    return Dataset(dataset).done_shards()


def read_stats(dataset: str, shard_id: int) -> dict:
    return Dataset(dataset).read_stats(shard_id)


def prepare_run(
    dataset: str, config: BuildConfig, fields: dict[str, str], replace: bool = False
) -> CaptionRun:
    """Plan the run, refuse what it must not overwrite, and record it as running."""
    out = str(dataset)
    run = plan_run(config, fields, replace)
    data = Dataset.open(out)
    data.check_free()  # a caller holding the lock passes: recaption, the caption flow
    data.check_no_pending_removal()
    clashes = {}
    for shard_id in built_shards(out):
        hit = conflicts(read_stats(out, shard_id), run)
        if hit:
            clashes[shard_id] = hit
    if clashes:
        names = sorted({n for hit in clashes.values() for n in hit})
        raise FieldExists(
            f"{len(clashes)} shard(s) already have caption field(s) {', '.join(names)} from "
            "another run; pass replace (--replace) to overwrite, or name new fields"
        )
    data.prepare()
    write_record(out, new_record(run, read_record(out, run.id)))
    return run


def shards_to_caption(dataset: str, run: CaptionRun) -> list[int]:
    return [s for s in built_shards(dataset) if not shard_at_run(read_stats(dataset, s), run)]


def finish_run(dataset: str, run: CaptionRun) -> dict:
    """Record which shards carry the run's captions and which models wrote them."""
    out = str(dataset)
    record = new_record(run, read_record(out, run.id))
    built = built_shards(out)
    stats = {s: read_stats(out, s) for s in built}
    done = [s for s in built if shard_at_run(stats[s], run)]
    models = {current_fields(stats[s])[n]["model"] for s in done for n in run.fields}
    not_built = sorted({p.shard_id for p in Dataset(out).outline()} - set(built))
    record["shards"] = {"captioned": done, "not_built": not_built}
    record["models"] = sorted(models)
    if len(done) == len(built):
        record["status"] = "done"
        record["completed"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_record(out, record)
    return record
