"""The journal of a shard's captions not yet written into it: what makes a crash cost one batch."""

from __future__ import annotations

import json
import os

import storage


class Journal:
    """Captions of one shard not yet written into it: key -> {field: text}, for one model.

    Local: appended and fsynced per batch. Object stores cannot append, so the object is
    rewritten whole per batch (a shard's captions are small)."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.entries: dict[str, dict[str, str]] = {}
        self._text = ""
        if storage.exists(url):
            self._load(storage.read_text(url))

    def _load(self, text: str) -> None:
        kept = []
        for line in text.split("\n"):
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a crash cut short; it is always the last
            kept.append(line + "\n")
            if entry["model"] == self.model:  # a hub id may now name other weights
                self.entries[entry["key"]] = entry["captions"]
        self._text = "".join(kept)
        if self._text != text:
            storage.atomic_write_text(self.url, self._text)

    def add(self, captions: dict[str, dict[str, str]]) -> None:
        lines = "".join(
            json.dumps({"key": k, "model": self.model, "captions": c}, ensure_ascii=False) + "\n"
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

    def remove(self) -> None:
        storage.remove(self.url)
