"""Inputs inside containers: what a source string names, and the facts a table or shard brings.

A member source is `CONTAINER#MEMBER`: `shards/x.tar#abc.jpg` (a tar member, webdataset shards
included), `ffhq.zip#images/00001.png` (a zip member), `faces.parquet#image/12` (row 12 of the
image column of a Parquet dataset). The container is a local path or an s3:// URL; the last `#`
splits, and member names holding `#` are never planned. http(s) sources are downloaded
(fgid.download). Every reader here raises `Unusable` with a reason code of fgid.schema.REASONS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

# A URL-table value that is not an http(s) URL: planned under this prefix (so it gets a row
# with reason bad_url), never read as a local path or another store's object.
BAD_URL = "bad-url:"
CONTAINERS = {".zip": "zip", ".tar": "tar", ".parquet": "parquet"}
WEB_SCHEMES = ("http", "https")
# Provenance kept from a sidecar member or a table row: at most this much JSON per sample.
EXTRA_MAX_BYTES = 64 * 1024


class Unusable(Exception):
    """A source that cannot give an image; `code` is a reason of fgid.schema.REASONS."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class PlanError(ValueError):
    """A container or table that cannot be planned at all; the message is one line."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A planned source and what its table, archive or shard said about it."""

    source: str
    label: str | None = None
    caption: str | None = None
    license: str | None = None
    url: str | None = None
    extra: str | None = None  # JSON object text, keys sorted


def extra_json(fields: dict) -> str | None:
    """`fields` as compact sorted JSON, or None when empty or larger than EXTRA_MAX_BYTES."""
    if not fields:
        return None
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text.encode()) <= EXTRA_MAX_BYTES else None


def is_web(source: str) -> bool:
    return urlsplit(source).scheme.lower() in WEB_SCHEMES if "://" in source else False


def container_kind(path: str) -> str | None:
    """'zip', 'tar' or 'parquet' for a path or URL with that suffix, else None."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((kind for suffix, kind in CONTAINERS.items() if name.endswith(suffix)), None)


def split_member(source: str) -> tuple[str, str, str] | None:
    """(kind, container, member) of a member source, or None for any other source."""
    if is_web(source) or source.startswith(BAD_URL):
        return None
    container, sep, member = source.rpartition("#")
    kind = container_kind(container) if sep and member else None
    return (kind, container, member) if kind else None


def member_source(container: str, member: str) -> str:
    return f"{container}#{member}"


def read_member(source: str, max_bytes: int) -> bytes:
    """The bytes a member source names: at most `max_bytes`, else Unusable(file_too_large)."""
    found = split_member(source)
    if found is None:
        raise ValueError(f"not a member source: {source!r}")
    kind, container, member = found
    if kind == "parquet":
        from fgid.sources.tables import read_row_image

        return read_row_image(container, member, max_bytes)
    from fgid.sources.archives import read_archive_member

    return read_archive_member(kind, container, member, max_bytes)
