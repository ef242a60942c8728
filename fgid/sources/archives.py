"""Zip and tar archives (webdataset shards included) read in place: listed, never extracted.

Planning lists an archive's image members; members that share a webdataset key with an image
(`dir/abc.jpg` beside `dir/abc.txt`, `.json`, `.cls`) are its caption, fields and label. Names
are hostile: absolute, `..`, `#`, NUL or control characters, links and devices are skipped with
a warning. Reading checks the member's declared size against the cap and never reads past it;
a tar is indexed once (header offsets) and each member read by seeking, so decoding never walks
the archive again. Compressed tars cannot be read in place and are refused when planned.
"""

from __future__ import annotations

import json
import logging
import posixpath
import stat
import tarfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import storage
from fgid.sources import Entry, PlanError, Unusable, extra_json, member_source

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".jpe"}
)
CAPTION_EXTS = ("txt", "caption", "caption.txt")
LABEL_EXTS = ("cls", "label", "id")
SIDECAR_MAX_BYTES = 64 * 1024
MAX_NAME_CHARS = 1024
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                         zipfile.ZIP_LZMA})  # fmt: skip
CACHED_ARCHIVES = 8


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # tar: where the data starts; zip: unused
    size: int


def safe_name(name: str) -> bool:
    """A member name we plan: relative, no `..`, no `#`, printable, not too long."""
    if not name or len(name) > MAX_NAME_CHARS or name.startswith(("/", "\\")):
        return False
    if "#" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    if name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") != name:
        return False
    return ".." not in name.split("/") and not (len(name) > 1 and name[1] == ":")


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def is_compressed_tar(path: str) -> bool:
    return storage.name(path).lower().endswith(COMPRESSED_TARS)


# Listing.


def _tar_members(path: str) -> dict[str, Member]:
    members: dict[str, Member] = {}
    with storage.open_input(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for info in tar:
            if not info.isreg() or info.issparse():
                log.warning("%s: skipped member %r (not a regular file)", path, info.name[:200])
                continue
            members[info.name] = Member(info.name, info.offset_data, info.size)
    return members


def _zip_members(path: str) -> dict[str, Member]:
    with storage.open_input(path) as handle, zipfile.ZipFile(handle) as archive:
        members = {}
        for info in archive.infolist():
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the tool stored no type
            if info.is_dir() or kind not in (0, stat.S_IFREG):
                continue  # folders, and links stored by Unix zip tools
            members[info.filename] = Member(info.filename, 0, info.file_size)
        return members


def _list(kind: str, path: str) -> dict[str, Member]:
    try:
        return _tar_members(path) if kind == "tar" else _zip_members(path)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise PlanError(f"{kind} archive cannot be read: {path} ({error})") from None


def archive_entries(kind: str, path: str) -> list[Entry]:
    """One entry per image member of the archive at `path`, with its sidecars as provenance."""
    members = _list(kind, path)
    _INDEXES.put(path, members)
    groups: dict[str, dict[str, Member]] = {}
    for name, member in members.items():
        if not safe_name(name):
            log.warning("%s: skipped member %r (unsafe name)", path, name[:200])
            continue
        key, ext = _split_key(name)
        groups.setdefault(key, {})[ext] = member
    entries = []
    for found in groups.values():
        images = [m for ext, m in found.items() if posixpath.splitext(m.name)[1].lower()
                  in IMAGE_SUFFIXES]  # fmt: skip
        for image in images:
            entries.append(_with_sidecars(kind, path, image, found))
    return entries


def _with_sidecars(kind: str, path: str, image: Member, group: dict[str, Member]) -> Entry:
    def text(exts: tuple[str, ...]) -> str | None:
        for ext in exts:
            member = group.get(ext)
            if member is not None and member.size <= SIDECAR_MAX_BYTES:
                data = read_archive_member(kind, path, member.name, SIDECAR_MAX_BYTES)
                return data.decode("utf-8", "replace").strip() or None
        return None

    fields: dict = {}
    if "json" in group and group["json"].size <= SIDECAR_MAX_BYTES:
        try:
            loaded = json.loads(read_archive_member(kind, path, group["json"].name,
                                                    SIDECAR_MAX_BYTES))  # fmt: skip
            fields = loaded if isinstance(loaded, dict) else {}
        except (ValueError, Unusable):
            log.warning("%s: %s is not a JSON object; not kept", path, group["json"].name[:200])
    caption = text(CAPTION_EXTS) or _field(fields, "caption", "text", "TEXT")
    label = text(LABEL_EXTS) or _field(fields, "label", "identity")
    return Entry(
        member_source(path, image.name),
        label=label,
        caption=caption,
        license=_field(fields, "license", "LICENSE"),
        url=_field(fields, "url", "URL"),
        extra=extra_json(fields),
    )


def _field(fields: dict, *names: str) -> str | None:
    for name in names:
        value = fields.get(name)
        if value is not None and not isinstance(value, dict | list):
            return str(value)
    return None


# Reading one member.


class _Indexes:
    """Member tables of recently used archives (a tar's offsets cost one pass over its headers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: OrderedDict[str, dict[str, Member]] = OrderedDict()

    def put(self, path: str, members: dict[str, Member]) -> None:
        with self._lock:
            self._tables[path] = members
            self._tables.move_to_end(path)
            while len(self._tables) > CACHED_ARCHIVES:
                self._tables.popitem(last=False)

    def get(self, kind: str, path: str) -> dict[str, Member]:
        with self._lock:
            if path in self._tables:
                self._tables.move_to_end(path)
                return self._tables[path]
        members = _tar_members(path) if kind == "tar" else _zip_members(path)
        self.put(path, members)
        return members


_INDEXES = _Indexes()
# Open zip files per thread: zipfile parses the central directory once per open.
_LOCAL = threading.local()


def _zip(path: str) -> zipfile.ZipFile:
    opened: OrderedDict[str, tuple] = getattr(_LOCAL, "zips", None) or OrderedDict()
    _LOCAL.zips = opened
    if path in opened:
        opened.move_to_end(path)
        return opened[path][1]
    handle = storage.open_input(path)
    try:
        archive = zipfile.ZipFile(handle)
    except BaseException:
        handle.close()
        raise
    opened[path] = (handle, archive)
    while len(opened) > 2:
        _, (old_handle, old_archive) = opened.popitem(last=False)
        old_archive.close()
        old_handle.close()
    return archive


def read_archive_member(kind: str, path: str, name: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of member `name`; Unusable with a reason otherwise."""
    try:
        member = _INDEXES.get(kind, path).get(name)
        if member is None or not safe_name(name):
            raise Unusable("unreadable", f"no member {name[:200]!r} in {kind} archive")
        if member.size > max_bytes:
            raise Unusable("file_too_large", f"{member.size} bytes > {max_bytes}")
        if member.size == 0:
            raise Unusable("empty_file")
        data = _read_tar(path, member) if kind == "tar" else _read_zip(path, name, max_bytes)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise Unusable("unreadable", f"{type(error).__name__}: {error}") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise Unusable("truncated", f"{kind} member: {type(error).__name__}: {error}") from None
    if len(data) > max_bytes:  # a zip whose declared size lied
        raise Unusable("file_too_large", f"more than {max_bytes} bytes")
    return data


def _read_tar(path: str, member: Member) -> bytes:
    with storage.open_input(path) as handle:
        handle.seek(member.offset)
        data = handle.read(member.size)
    if len(data) != member.size:
        raise Unusable("truncated", f"tar member ends after {len(data)} of {member.size} bytes")
    return data


def _read_zip(path: str, name: str, max_bytes: int) -> bytes:
    archive = _zip(path)
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise Unusable("unreadable", "encrypted zip member")
    if info.compress_type not in ZIP_METHODS:
        raise Unusable("unreadable", f"zip compression method {info.compress_type}")
    with archive.open(info) as member:
        return member.read(max_bytes + 1)
