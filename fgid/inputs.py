"""Turn folders, files and list files into a deterministic plan of shards.

Inputs may be local paths or object-store URLs (s3://bucket/prefix); a URL source stays a URL.
Keys are a hash of the absolute source path or URL, so they carry no dots, survive reordering
and are the same on every rerun. The plan is written once per output folder; a rerun must see
the same plan, so that finished shards stay valid.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import storage

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".jpe"}
)
LIST_SUFFIXES = frozenset({".txt", ".lst"})

PLAN_FILE = "plan.parquet"
PLAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("key", pa.string()), ("source", pa.string()), ("label", pa.string())]
)


@dataclass(frozen=True)
class InputItem:
    key: str
    source: str
    label: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    shard_id: int
    items: tuple[InputItem, ...]


def sample_key(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _is_image(name: str) -> bool:
    # Hidden files are editor/OS litter (.DS_Store, ._foo.jpg), not photos.
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk_images(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files) if _is_image(name))
    return found


def _resolve(line: str, base: str) -> str:
    """A list entry: a URL or absolute path as is, anything else relative to the list."""
    if storage.is_remote(line) or os.path.isabs(line):
        return line
    if storage.is_remote(base):
        protocol, rest = storage.join(base, line).split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest)}"  # as abspath does for local lists
    return str(Path(base) / line)


def _read_list(path: str) -> list[str]:
    base = posixpath.dirname(path) if storage.is_remote(path) else str(Path(path).parent)
    sources = []
    for line in storage.read_text(path).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            sources.append(_resolve(line, base))
    return sources


def _is_list(path: str) -> bool:
    return Path(storage.name(path)).suffix.lower() in LIST_SUFFIXES


def _collect_remote(url: str) -> list[str]:
    """An object-store URL: a prefix holding objects, a list object, or one image object."""
    url = url.rstrip("/")
    fs, path = storage.filesystem(url)
    if fs.isfile(path):
        return _read_list(url) if _is_list(url) else [url]
    if fs.isdir(path):
        return [u for u in storage.walk_files(url) if _is_image(storage.name(u))]
    parent = posixpath.dirname(path)
    if not parent or not fs.exists(parent):
        raise FileNotFoundError(f"input not found: {url}")
    return [url]  # a missing object in an existing bucket: an `unreadable` row, as locally


def collect_sources(inputs: list[str]) -> list[str]:
    """Expand inputs into absolute source paths and URLs, sorted and without repeats.

    A folder (or an s3:// prefix) contributes every image-suffixed file below it; a .txt/.lst
    file is a list of paths or URLs (one per line, relative to the list); any other path is taken
    as one image, even if it does not exist (it then becomes an `unreadable` row, not a crash)."""
    sources: set[str] = set()
    for raw in inputs:
        raw = str(raw)
        if storage.is_remote(raw):
            sources.update(_collect_remote(raw))
            continue
        path = Path(raw)
        if path.is_dir():
            sources.update(_walk_images(path))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            sources.update(_read_list(str(path)))
        elif not path.exists() and not path.is_symlink() and not path.parent.exists():
            raise FileNotFoundError(f"input not found: {raw}")
        else:
            sources.add(str(path))
    return sorted(s if storage.is_remote(s) else os.path.abspath(s) for s in sources)


def read_labels(path: str | None) -> dict[str, str]:
    """CelebA's identity_CelebA.txt format: '<file name> <identity>' per line."""
    if not path:
        return {}
    labels = {}
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<file> <identity>', got {line!r}")
        labels[parts[0]] = parts[1]
    return labels


def plan_shards(
    inputs: list[str], shard_size: int, labels_file: str | None = None
) -> list[ShardPlan]:
    labels = read_labels(labels_file)
    sources = collect_sources(inputs)
    items = [InputItem(sample_key(s), s, labels.get(storage.name(s))) for s in sources]
    return [
        ShardPlan(i // shard_size, tuple(items[i : i + shard_size]))
        for i in range(0, len(items), shard_size)
    ]


def plan_table(plans: list[ShardPlan]) -> pa.Table:
    rows = [(p.shard_id, it.key, it.source, it.label) for p in plans for it in p.items]
    columns = list(zip(*rows, strict=True)) if rows else [[], [], [], []]
    return pa.Table.from_arrays(
        [pa.array(c, t.type) for c, t in zip(columns, PLAN_SCHEMA, strict=True)], schema=PLAN_SCHEMA
    )


def plans_from_table(table: pa.Table) -> list[ShardPlan]:
    grouped: dict[int, list[InputItem]] = {}
    for row in table.to_pylist():
        grouped.setdefault(row["shard"], []).append(
            InputItem(row["key"], row["source"], row["label"])
        )
    return [ShardPlan(shard, tuple(items)) for shard, items in sorted(grouped.items())]


def write_plan(out_dir: str, plans: list[ShardPlan]) -> None:
    with storage.atomic_open(storage.join(out_dir, PLAN_FILE)) as handle:
        pq.write_table(plan_table(plans), handle)


def read_plan(out_dir: str) -> list[ShardPlan]:
    with storage.open_input(storage.join(str(out_dir), PLAN_FILE)) as handle:
        return plans_from_table(pq.read_table(handle))
