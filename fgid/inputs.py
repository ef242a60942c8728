"""Turn folders, files, list files, tables and archives into a deterministic plan of shards.

Inputs may be local paths or object-store URLs (s3://bucket/prefix); a URL source stays a URL.
URL tables (CSV, TSV, JSONL, Parquet), Parquet image datasets, zip and tar archives and
webdataset shards (a list or a brace pattern, `shard-{000..009}.tar`) give one source per image,
with the caption, label, licence and URL their table or shard holds (fgid.sources).
Keys are a hash of the absolute source path or URL, so they carry no dots, survive reordering
and are the same on every rerun. The plan is written once per output folder; a rerun must see
the same plan, so that finished shards stay valid.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import pyarrow as pa

import storage
from fgid import sorting
from fgid.config import InputsConfig
from fgid.errors import UsageError
from fgid.sources import BAD_URL, Entry, PlanError, container_kind, is_web, split_member
from fgid.sources.archives import archive_entries, is_compressed_tar
from fgid.sources.tables import table_entries, table_kind
from storage.credentials import check_url
from storage.local import NotRegularFile, open_regular

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".jpe"}
)
LIST_SUFFIXES = frozenset({".txt", ".lst"})
# Labels files are read whole, up to this; list files are read a line at a time.
TEXT_MAX_BYTES = 1 << 30
LIST_MAX_BYTES = 1 << 40
LINE_MAX_BYTES = 1 << 20
# A source whose name is not valid UTF-8 cannot be stored as text as it is: it is kept as this
# prefix + the name with the bad bytes written as \xNN, and becomes an `unreadable` row. Local
# sources are absolute and URLs have a scheme, so no real source starts with it.
UNDECODABLE = "undecodable-name:"

PLAN_FILE = "plan.parquet"
PLAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("key", pa.string()), ("source", pa.string()), ("label", pa.string()),
     # What a table or shard said about the source; plans written before these existed lack
     # them and read as nulls.
     ("caption", pa.string()), ("license", pa.string()), ("source_url", pa.string()),
     ("extra", pa.string())]
)  # fmt: skip
BRACES = re.compile(r"\{([^{}]*)\}")
MAX_EXPANSION = 1_000_000


class InputError(UsageError):
    """Inputs that cannot be planned: a missing path, zero images, a bad list or labels file.

    `problems` holds one line per problem; str() joins them with '; '."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class InputNotFound(InputError, FileNotFoundError):
    """An input path, bucket or list file that does not exist."""


@dataclass(frozen=True, slots=True)  # no __dict__: about 110 bytes less per planned input
class InputItem:
    key: str
    source: str
    label: str | None = None
    caption: str | None = None
    license: str | None = None
    source_url: str | None = None
    extra: str | None = None  # JSON object text: a shard's or table's other fields

    def provenance(self) -> dict:
        """What the item's table or shard said, for the sample's json (`source_info`)."""
        found = {"caption": self.caption, "license": self.license, "url": self.source_url}
        found = {k: v for k, v in found.items() if v is not None}
        if self.extra:
            found["fields"] = json.loads(self.extra)
        return found


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One shard's inputs, in plan order: what process_shard builds."""

    shard_id: int
    items: tuple[InputItem, ...]


@dataclass(frozen=True, slots=True)
class PlannedShard:
    """A shard of the recorded plan without its inputs (read when it is built,
    Dataset.shard_plan): a plan of ten million inputs is a thousand of these."""

    shard_id: int
    size: int


def sample_key(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _printable(text: str) -> str:
    """`text` with the undecodable bytes of a name (surrogateescape) written as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def storable(source: str) -> str:
    """`source` as valid UTF-8 text: unchanged, or marked with UNDECODABLE and escaped."""
    printable = _printable(source)
    return source if printable == source else UNDECODABLE + printable


def _is_image(name: str) -> bool:
    # Hidden files are editor/OS litter (.DS_Store, ._foo.jpg), not photos.
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_dataset(folder: str | Path) -> bool:
    """A folder a build wrote (it holds the plan): its card plots and shards are never inputs."""
    return os.path.isfile(os.path.join(folder, PLAN_FILE))


def _walk_images(folder: Path, exclude: frozenset[str] = frozenset()) -> Iterator[str]:
    if is_dataset(folder) or os.path.abspath(folder) in exclude:
        return
    for root, dirs, files in os.walk(folder, followlinks=False):
        # An output folder inside an input folder: a rerun must not list what the build wrote.
        dirs[:] = [
            d
            for d in sorted(dirs)
            if not is_dataset(os.path.join(root, d))
            and os.path.abspath(os.path.join(root, d)) not in exclude
        ]
        yield from (os.path.join(root, name) for name in sorted(files) if _is_image(name))


def _resolve(line: str, base: str) -> str:
    """A list entry: a URL or absolute path as is, anything else relative to the list."""
    if storage.is_remote(line) or os.path.isabs(line):
        return line
    if storage.is_remote(base):
        protocol, rest = storage.join(base, line).split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest)}"  # as abspath does for local lists
    return str(Path(base) / line)


def read_lines(path: str, what: str, limit: int = TEXT_MAX_BYTES) -> list[str]:
    """The lines of a small text file or object, decoded with surrogateescape.

    Only a regular file (or an object) of at most `limit` bytes is read; anything else is an
    InputError naming `what` and the path, in one line."""
    return list(iter_lines(path, what, limit))


def iter_lines(path: str, what: str, limit: int = LIST_MAX_BYTES) -> Iterator[str]:
    """read_lines a line at a time: a list of ten million paths is never held whole. A line
    longer than LINE_MAX_BYTES, a NUL byte or more than `limit` bytes is an InputError."""
    with _open_text_source(path, what) as handle:
        total, number, rest = 0, 0, b""
        while True:
            chunk = handle.read(1 << 20)
            total += len(chunk)
            if total > limit:
                raise InputError(f"{what} is larger than {limit} bytes: {path}")
            if b"\0" in chunk:
                raise InputError(f"{what} is not a text file (it holds NUL bytes): {path}")
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop() if chunk else b""
            if not chunk and lines and not lines[-1]:
                lines.pop()  # the file ended with a newline
            for line in lines:
                number += 1
                if len(line) > LINE_MAX_BYTES:
                    raise InputError(f"{path}:{number}: a line longer than {LINE_MAX_BYTES} bytes")
                yield line.decode("utf-8", "surrogateescape").removesuffix("\r")
            if len(rest) > LINE_MAX_BYTES:
                raise InputError(f"{path}:{number + 1}: a line longer than {LINE_MAX_BYTES} bytes")
            if not chunk:
                return


@contextlib.contextmanager
def _open_text_source(path: str, what: str):
    if storage.is_remote(path):
        try:
            check_url(path)
            fs, inner = storage.filesystem(path)
            handle = fs.open(inner, "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise InputNotFound(f"{what} not found: {path}") from None
        except ValueError as error:  # a URL with credentials: the message never repeats it
            raise InputError(f"{what}: {error}") from None
    else:
        try:
            handle = open_regular(path)
        except NotRegularFile as error:
            raise InputError(f"{what} is {error.kind}, not a regular file: {path}") from None
        except FileNotFoundError:
            raise InputNotFound(f"{what} not found: {path}") from None
        except OSError as error:
            raise InputError(f"{what} cannot be read: {path} ({error.strerror})") from None
    with handle:
        yield handle


def _read_list(path: str) -> Iterator[str]:
    base = posixpath.dirname(path) if storage.is_remote(path) else str(Path(path).parent)
    for number, line in enumerate(iter_lines(path, "list file"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        source = _resolve(line, base)
        if storage.is_remote(source):
            try:
                check_url(source)
            except ValueError as error:  # never stored, never repeated
                raise InputError(f"{path}:{number}: {error}") from None
        yield source


def _is_list(path: str) -> bool:
    return Path(storage.name(path)).suffix.lower() in LIST_SUFFIXES


def _collect_file(path: str, columns) -> list[Entry] | None:
    """The entries of a table, archive or shard at `path` (a file or object), else None."""
    if is_compressed_tar(path):
        raise InputError(f"a compressed tar cannot be read in place: {path}; use .tar or .zip")
    try:
        if table_kind(path) is not None:
            return table_entries(path, columns)
        kind = container_kind(path)
        return archive_entries(kind, path) if kind in ("zip", "tar") else None
    except PlanError as error:
        raise InputError(str(error)) from None


def _collect_remote(url: str, columns) -> Iterable[Entry]:
    """An object-store URL: a prefix holding objects, a list object, a table, archive or
    shard, or one image object."""
    url = url.rstrip("/")
    try:
        check_url(url)
    except ValueError as error:
        raise InputError(str(error)) from None
    if is_web(url):
        return [Entry(url)]  # downloaded when decoded (fgid.download)
    fs, path = storage.filesystem(url)
    if fs.isfile(path):
        if _is_list(url):
            return map(Entry, _read_list(url))
        return _collect_file(url, columns) or [Entry(url)]
    if fs.isdir(path):
        return (Entry(u) for u in storage.iter_files(url) if _is_image(storage.name(u)))
    parent = posixpath.dirname(path)
    if not parent or not fs.exists(parent):
        raise InputNotFound(f"input not found: {url}")
    return [Entry(url)]  # a missing object in an existing bucket: an `unreadable` row, as locally


def suggestion(path: Path) -> str:
    """' (did you mean P?)' for the closest name beside the first missing part of `path`."""
    missing = path.absolute()
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    try:
        with os.scandir(missing.parent) as entries:
            names = [entry.name for _, entry in zip(range(10_000), entries, strict=False)]
    except OSError:
        return ""
    close = difflib.get_close_matches(missing.name, names, n=1, cutoff=0.6)
    if not close:
        return ""
    rest = path.absolute().relative_to(missing)
    return f" (did you mean {missing.parent / close[0] / rest}?)"


def expand_braces(pattern: str) -> list[str]:
    """`shard-{000..009}.tar` and `{a,b}.tar` as webdataset spells shard lists; zero-padded
    ranges keep their width. At most MAX_EXPANSION names (InputError past it)."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    ends = body.split("..")
    if len(ends) == 2 and ends[0].isdigit() and ends[1].isdigit():
        low, high = int(ends[0]), int(ends[1])
        if high - low >= MAX_EXPANSION:
            raise InputError(f"brace range too large: {{{body}}}")
        width = len(ends[0]) if ends[0].startswith("0") else 0
        choices = [f"{n:0{width}d}" for n in range(low, high + 1)]
    else:
        choices = body.split(",")
    names: list[str] = []
    for choice in choices:
        names.extend(expand_braces(head + choice + tail))
        if len(names) > MAX_EXPANSION:
            raise InputError(f"brace pattern names more than {MAX_EXPANSION} inputs: {pattern}")
    return names


def _collect_one(raw: str, exclude: frozenset[str], columns=None) -> Iterable[Entry]:
    """The entries of one input, as a list or lazily (folders, buckets and list files, which
    may name millions); a missing input raises at once, a bad list file when it is read."""
    columns = columns if columns is not None else InputsConfig()
    if "{" in raw and not storage.is_remote(raw) and not os.path.lexists(raw):
        expanded = expand_braces(raw)
        if expanded != [raw]:
            return chain.from_iterable(_collect_one(n, exclude, columns) for n in expanded)
    if storage.is_remote(raw):
        if "{" in raw and not is_web(raw):
            expanded = expand_braces(raw)
            if expanded != [raw]:
                return chain.from_iterable(_collect_remote(n, columns) for n in expanded)
        return _collect_remote(raw, columns)
    path = Path(raw)
    if path.is_dir():
        return map(Entry, _walk_images(path, exclude))
    if path.suffix.lower() in LIST_SUFFIXES and (path.exists() or path.is_symlink()):
        # a FIFO or device named *.txt is refused, never read
        return map(Entry, _read_list(str(path)))
    if not path.exists() and not path.is_symlink():
        raise InputNotFound(f"input not found: {raw}{suggestion(path)}")
    if path.is_file():
        found = _collect_file(os.path.abspath(raw), columns)
        if found is not None:
            return found
    return [Entry(str(path))]  # a special file or a broken link: a row says what it is


def _absolute(entry: Entry) -> Entry:
    source = entry.source
    # Member sources are built from an absolute container already; URL-table values are kept.
    if not (storage.is_remote(source) or source.startswith(BAD_URL) or split_member(source)):
        source = os.path.abspath(source)
    source = storable(source)
    return (
        entry
        if source == entry.source
        else Entry(source, entry.label, entry.caption, entry.license, entry.url, entry.extra)
    )


ENTRY_SCHEMA = pa.schema([(name, pa.string()) for name in Entry.__slots__])


def _row(entry: Entry) -> tuple:
    return (entry.source, entry.label, entry.caption, entry.license, entry.url, entry.extra)


def sorted_entries(found: Iterable[Entry]) -> Iterator[Entry]:
    """Absolute, storable, one per source (the first an input gave), sorted by source; sorted
    in bounded memory (fgid.sorting), lazily."""
    last = None
    # A stable sort keeps repeats in input order, so the first of each run is the first given.
    for row in sorting.sorted_rows(map(_row, map(_absolute, found)), ENTRY_SCHEMA):
        if row[0] != last:
            last = row[0]
            yield Entry(*row)


def iter_entries(inputs: list[str], exclude: Iterable[str] = (), columns=None) -> Iterator[Entry]:
    """collect_entries, lazily; an input that does not exist raises before any is yielded."""
    skip = frozenset(os.path.abspath(e) for e in exclude if not storage.is_remote(e))
    found = [_collect_one(str(raw), skip, columns) for raw in inputs]
    return sorted_entries(chain.from_iterable(found))


def collect_entries(inputs: list[str], exclude: Iterable[str] = (), columns=None) -> list[Entry]:
    """collect_sources, with what each source's table or shard said about it."""
    return list(iter_entries(inputs, exclude, columns))


def collect_sources(inputs: list[str], exclude: Iterable[str] = (), columns=None) -> list[str]:
    """Expand inputs into absolute source paths and URLs, sorted and without repeats.

    A folder (or an s3:// prefix) contributes every image-suffixed file below it, except the
    folders in `exclude` (give the build's output) and any folder a build wrote; a .txt/.lst
    file is a list of paths or URLs (one per line, relative to the list), where a missing entry
    becomes an `unreadable` row, not a crash. A URL table, Parquet image dataset, zip or tar
    (webdataset shards too) gives a source per row or image member (`columns`: an InputsConfig
    naming the table's columns). Any other input is taken as one image; one that does not
    exist raises InputNotFound. URLs with credentials raise InputError."""
    return [e.source for e in iter_entries(inputs, exclude, columns)]


def check_inputs(inputs: list[str], exclude: Iterable[str] = (), columns=None) -> None:
    """InputError naming every problem with `inputs`, for a command to call before it writes
    anything: an input that does not exist (with the nearest existing name as a hint), a
    folder, prefix, list file, table or archive that yields no image, a bad list file, table or
    archive, a URL with credentials, or no input at all. Each problem is one line in
    `InputError.problems`; the messages never repeat a credential.

    A folder or an object-store input is read up to its first image only: planning lists it
    (once; a bucket of millions takes minutes to list), and what planning finds further on is
    still refused before the output is written. Local list files, tables and archives are read
    whole here, so a bad line is named before a Prefect server starts."""
    skip = frozenset(os.path.abspath(e) for e in exclude if not storage.is_remote(e))
    problems: list[str] = []
    for raw in map(str, inputs):
        try:
            entries = iter(_collect_one(raw, skip, columns))
            if next(entries, None) is None:
                problems.append(f"no images found in {raw}")
            elif not (storage.is_remote(raw) or os.path.isdir(raw)):
                for _ in entries:
                    pass
        except InputError as error:
            problems.extend(error.problems)
    if problems:
        raise InputError(*problems)
    if not inputs:
        raise InputError("no images found in the inputs: -")


def read_labels(path: str | None) -> dict[str, str]:
    """CelebA's identity_CelebA.txt format: '<file name> <identity>' per line.

    A missing, special, oversized or malformed file is an InputError in one line (the line
    number for a malformed line)."""
    if not path:
        return {}
    labels = {}
    for number, line in enumerate(read_lines(path, "labels file"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            shown = _printable(line if len(line) <= 80 else line[:77] + "...")
            raise InputError(f"{path}:{number}: expected '<file> <identity>', got {shown!r}")
        if _printable(line) != line:
            raise InputError(f"{path}:{number}: not UTF-8 text")
        labels[parts[0]] = parts[1]
    return labels


def iter_items(
    inputs: list[str],
    labels_file: str | None = None,
    exclude: Iterable[str] = (),
    columns=None,
) -> Iterator[InputItem]:
    """The planned inputs in source order, lazily; `exclude` and `columns` as for
    collect_sources. A label from a table or shard wins over the labels file's."""
    labels = read_labels(labels_file)
    for e in iter_entries(inputs, exclude, columns):
        label = e.label if e.label is not None else labels.get(storage.name(e.source))
        yield InputItem(sample_key(e.source), e.source, label, e.caption, e.license, e.url, e.extra)


def plan_shards(
    inputs: list[str],
    shard_size: int,
    labels_file: str | None = None,
    exclude: Iterable[str] = (),
    columns=None,
) -> list[ShardPlan]:
    """Shards of `shard_size` inputs in source order, in memory (see write_listing for a plan
    of any size); arguments as iter_items."""
    items = list(iter_items(inputs, labels_file, exclude, columns))
    return [
        ShardPlan(i // shard_size, tuple(items[i : i + shard_size]))
        for i in range(0, len(items), shard_size)
    ]
