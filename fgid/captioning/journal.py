"""The journal of a shard's captions not yet written into it: what makes a crash cost one batch."""

from __future__ import annotations

import json
import os

import storage
from fgid.shardtar import is_key


class Journal:
    """Captions of one shard not yet written into it: key -> {field: text}, for one model.

    `context` digests whatever else the captions depend on (prompts, generation settings, the
    build's config hash): entries of another model or context are ignored, so a changed setting
    never reuses a stale caption. An entry may carry a `stamp` (the build uses the source file's
    sha256), which `get` checks per sample. Local: appended and fsynced per batch. Object stores
    cannot append, so the object is rewritten whole per batch (a shard's captions are small)."""

    def __init__(self, url: str, model: str, context: str | None = None) -> None:
        self.url, self.model, self.context = url, model, context
        self.entries: dict[str, dict[str, str]] = {}
        self.stamps: dict[str, str | None] = {}
        self._text = ""
        if storage.exists(url):
            self._load(storage.read_text(url))

    def _load(self, text: str) -> None:
        kept, _ = _complete_lines(text)
        for line in kept:
            entry = _entry_of(line)
            # A hub id may now name other weights; a setting may have changed since.
            if entry and entry["model"] == self.model and entry.get("context") == self.context:
                self.entries[entry["key"]] = entry["captions"]
                self.stamps[entry["key"]] = entry.get("stamp")
        self._text = "".join(kept)
        if self._text != text:
            storage.atomic_write_text(self.url, self._text)

    def get(self, key: str, stamp: str | None = None) -> dict[str, str] | None:
        """The journaled captions of `key`, if made from the input `stamp` names."""
        if key in self.entries and self.stamps[key] == stamp:
            return self.entries[key]
        return None

    def add(
        self, captions: dict[str, dict[str, str]], stamps: dict[str, str] | None = None
    ) -> None:
        lines = "".join(
            json.dumps(self._entry(k, c, stamps), ensure_ascii=False) + "\n"
            for k, c in captions.items()
        )
        self._text += lines
        if storage.is_remote(self.url):
            storage.atomic_write_text(self.url, self._text)
        else:
            fs, path = storage.filesystem(self.url)
            with fs.open(path, "ab") as handle:
                handle.write(lines.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
        self.entries.update(captions)
        self.stamps.update({k: (stamps or {}).get(k) for k in captions})

    def _entry(self, key: str, captions: dict[str, str], stamps: dict[str, str] | None) -> dict:
        entry: dict = {"key": key, "model": self.model}
        if self.context is not None:
            entry["context"] = self.context
        if stamps is not None:
            entry["stamp"] = stamps[key]
        entry["captions"] = captions
        return entry

    def remove(self) -> None:
        storage.remove(self.url)


def _complete_lines(text: str) -> tuple[list[str], bool]:
    """(whole lines, each ending in a newline; whether a cut one was dropped)."""
    kept = []
    for line in text.split("\n"):
        if not line:
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            return kept, True  # the line a crash cut short; it is always the last
        kept.append(line + "\n")
    return kept, False


def purge(url: str, keys: set[str]) -> int:
    """Drop the entries of `keys` from the journal at `url` (a takedown), with any line a crash
    cut short (it may name one of them); an emptied journal is deleted. Returns entries dropped."""
    if not storage.exists(url):
        return 0
    kept, cut = _complete_lines(storage.read_text(url))
    # Lines that are no entry of ours go too: nothing could ever look them up.
    remaining = [line for line in kept if (e := _entry_of(line)) and e["key"] not in keys]
    if not remaining:
        storage.remove(url)
    elif cut or len(remaining) < len(kept):
        storage.atomic_write_text(url, "".join(remaining))
    return len(kept) - len(remaining)


def _entry_of(line: str) -> dict | None:
    """A journal line as an entry, or None for one this code did not write: a shared dataset's
    journal is untrusted, and an entry is only ever looked up by a key of our form."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not is_key(entry.get("key")):
        return None
    captions = entry.get("captions")
    if not isinstance(captions, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in captions.items()
    ):
        return None
    return entry if isinstance(entry.get("model"), str) else None
