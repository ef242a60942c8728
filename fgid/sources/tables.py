"""Tables as inputs: URL tables (CSV, TSV, JSONL, Parquet) and Parquet datasets of image bytes.

A URL table gives one source per row: its http(s) URL (other values are planned as `bad-url:`
rows, never read as paths). A Parquet file with an image column (Hugging Face `datasets`' Image
layout, a struct {bytes, path}, or plain binary) gives one member source per row,
`file.parquet#column/row`, read later one row group at a time. Named caption, label and licence
columns travel with each source either way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

import storage
from fgid.sources import BAD_URL, Entry, PlanError, Unusable, extra_json, is_web, member_source
from storage.credentials import check_url

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet"}  # fmt: skip
TABLE_MAX_BYTES = 4 << 30  # text tables are read whole
# A row group is read whole to give one row's image: refuse ones that would not fit in memory.
ROW_GROUP_MAX_BYTES = 2 << 30
CACHED_ROW_GROUPS = 2


def table_kind(path: str) -> str | None:
    name = storage.name(path).lower()
    return next((kind for suffix, kind in TABLE_SUFFIXES.items() if name.endswith(suffix)), None)


def _is_image_type(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        return "bytes" in names and _is_binary(kind.field("bytes").type)
    return _is_binary(kind)


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def image_column(schema: pa.Schema, wanted: str | None, path: str) -> str | None:
    """The column of image bytes: `wanted`, or the only struct{bytes, path} column, or None."""
    if wanted is not None:
        if wanted not in schema.names or not _is_image_type(schema.field(wanted).type):
            raise PlanError(f"{path}: no image-bytes column {wanted!r} (columns: "
                            f"{', '.join(schema.names)})")  # fmt: skip
        return wanted
    found = [f.name for f in schema if pa.types.is_struct(f.type) and _is_image_type(f.type)]
    if len(found) > 1:
        raise PlanError(f"{path}: several image columns ({', '.join(found)}); choose one with "
                        "--set inputs.image_column=NAME")  # fmt: skip
    return found[0] if found else None


def _read(path: str, kind: str, columns: list[str] | None = None) -> pa.Table:
    if storage.size(path) > TABLE_MAX_BYTES and kind != "parquet":
        raise PlanError(f"table is larger than {TABLE_MAX_BYTES} bytes: {path}")
    try:
        with storage.open_input(path) as handle:
            if kind == "parquet":
                return pq.read_table(handle, columns=columns)
            if kind == "jsonl":
                return pjson.read_json(handle)
            options = pcsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            return pcsv.read_csv(handle, parse_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
        raise PlanError(f"{kind} table cannot be read: {path} ({str(error)[:200]})") from None


def _strings(table: pa.Table, name: str | None, path: str) -> list[str | None]:
    if name is None:
        return [None] * table.num_rows
    if name not in table.column_names:
        raise PlanError(f"{path}: no column {name!r} (columns: {', '.join(table.column_names)})")
    values = table[name].to_pylist()
    return [None if v is None or str(v).strip() == "" else str(v).strip() for v in values]


def table_entries(path: str, columns) -> list[Entry]:
    """Entries of a URL table or a Parquet image dataset; `columns` is an InputsConfig."""
    kind = table_kind(path)
    if kind is None:
        raise PlanError(f"not a table: {path}")
    image = None
    if kind == "parquet":
        try:
            with storage.open_input(path) as handle:
                schema = pq.read_schema(handle)
        except (pa.ArrowInvalid, OSError) as error:
            raise PlanError(f"parquet table cannot be read: {path} ({error})") from None
        image = image_column(schema, columns.image_column, path)
    if image is not None:
        return _image_rows(path, schema, image, columns)
    table = _read(path, kind)
    urls = _strings(table, columns.url_column, path)
    facts = _facts(table, columns, path)
    entries = []
    for row, url in enumerate(urls):
        if url is None:
            continue  # an empty cell names nothing
        if is_web(url):
            try:
                check_url(url)
            except ValueError as error:  # the message never repeats the URL
                raise PlanError(f"{path} row {row + 1}: {error}") from None
            entries.append(Entry(url, **{**facts[row], "url": url}))
        else:
            entries.append(Entry(BAD_URL + url[:1000], **facts[row]))
    return entries


def _facts(table: pa.Table, columns, path: str, url: str | None = None) -> list[dict]:
    label = _strings(table, columns.label_column, path)
    caption = _strings(table, columns.caption_column, path)
    license_ = _strings(table, columns.license_column, path)
    urls = _strings(table, url, path) if url else [None] * table.num_rows
    return [
        {"label": label[i], "caption": caption[i], "license": license_[i], "url": urls[i]}
        for i in range(table.num_rows)
    ]


def _image_rows(path: str, schema: pa.Schema, image: str, columns) -> list[Entry]:
    wanted = [columns.label_column, columns.caption_column, columns.license_column]
    url = columns.url_column if columns.url_column in schema.names else None
    names = sorted({n for n in [*wanted, url] if n is not None})
    table = _read(path, "parquet", names)
    facts = _facts(table, columns, path, url)
    paths = [None] * table.num_rows
    if (
        pa.types.is_struct(schema.field(image).type)
        and schema.field(image).type.get_field_index("path") >= 0
    ):
        paths = _read(path, "parquet", [f"{image}.path"]).column(0).to_pylist()
    return [
        Entry(
            member_source(path, f"{image}/{row}"),
            extra=extra_json({"path": paths[row]} if paths[row] else {}),
            **facts[row],
        )
        for row in range(table.num_rows)
    ]


class _RowGroups:
    """The image column of recently read row groups: a batch's rows mostly share one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple, pa.ChunkedArray] = OrderedDict()
        self._layouts: OrderedDict[str, list[tuple[int, int, int]]] = OrderedDict()

    def layout(self, path: str) -> list[tuple[int, int, int]]:
        """(first row, rows, bytes) per row group."""
        with self._lock:
            if path in self._layouts:
                return self._layouts[path]
        with storage.open_input(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        first, layout = 0, []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            layout.append((first, group.num_rows, group.total_byte_size))
            first += group.num_rows
        with self._lock:
            self._layouts[path] = layout
            while len(self._layouts) > 64:
                self._layouts.popitem(last=False)
        return layout

    def column(self, path: str, group: int, column: str) -> pa.ChunkedArray:
        key = (path, group, column)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
        with storage.open_input(path) as handle:
            parquet = pq.ParquetFile(handle)
            if column not in parquet.schema_arrow.names:
                raise Unusable("unreadable", f"no column {column[:200]!r}")
            values = parquet.read_row_group(group, columns=[column]).column(0)
        with self._lock:
            self._groups[key] = values
            while len(self._groups) > CACHED_ROW_GROUPS:
                self._groups.popitem(last=False)
        return values


_ROW_GROUPS = _RowGroups()


def read_row_image(path: str, member: str, max_bytes: int) -> bytes:
    """The image bytes of `column/row` in the Parquet file at `path`."""
    column, _, row_text = member.rpartition("/")
    if not column or not row_text.isdigit():
        raise Unusable("unreadable", f"not a column/row member: {member[:200]!r}")
    row = int(row_text)
    try:
        for group, (first, rows, size) in enumerate(_ROW_GROUPS.layout(path)):
            if first <= row < first + rows:
                if size > ROW_GROUP_MAX_BYTES:
                    raise Unusable("file_too_large", f"row group of {size} bytes")
                value = _ROW_GROUPS.column(path, group, column)[row - first].as_py()
                break
        else:
            raise Unusable("unreadable", f"no row {row} in {storage.name(path)}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise Unusable("unreadable", f"{type(error).__name__}: {error}") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as error:
        raise Unusable("unreadable", f"parquet: {str(error)[:200]}") from None
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        where = value.get("path") if isinstance(value, dict) else None
        raise Unusable("empty_file", f"no image bytes (path {where!r})" if where else "")
    if len(data) > max_bytes:
        raise Unusable("file_too_large", f"{len(data)} bytes > {max_bytes}")
    return bytes(data)
