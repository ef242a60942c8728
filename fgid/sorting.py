"""Sort more rows than fit in memory: sorted runs spilled to a local temporary folder, merged.

Planning sorts every listed input by its source, and a rerun or append sorts the recorded plan
the same way to compare the two. At ten million inputs the rows as Python objects take about
3.5 GB; here at most RUN_ROWS of them are in memory while the runs are written, and one batch
per run while they are merged. Small listings (one run) never touch the disk.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter

import pyarrow as pa

from storage.scratch import scratch

RUN_ROWS = 250_000  # rows sorted in memory at once (about 100 MB of planned inputs)
BATCH_ROWS = 2_048  # rows read back per run while merging


def sorted_rows(
    rows: Iterable[tuple],
    schema: pa.Schema,
    key: Callable[[tuple], object] = itemgetter(0),
    run_rows: int = RUN_ROWS,
) -> Iterator[tuple]:
    """`rows` (tuples matching `schema`) in order of `key`; rows with equal keys keep their
    input order (the sort is stable), so "the first one given" survives a sort.

    A generator: the runs live in a temporary folder that is deleted when it is exhausted or
    closed."""
    run: list[tuple] = []
    with scratch("sort") as folder:
        paths: list[str] = []
        for row in rows:
            run.append(row)
            if len(run) >= run_rows:
                paths.append(_spill(run, schema, key, folder, len(paths)))
                run = []
        run.sort(key=key)
        if not paths:
            yield from run
            return
        if run:
            paths.append(_spill(run, schema, key, folder, len(paths)))
            run = []
        # heapq.merge is stable across its inputs, and the runs are in input order.
        yield from heapq.merge(*(_read_run(p) for p in paths), key=key)


def _spill(run: list[tuple], schema: pa.Schema, key, folder: str, number: int) -> str:
    run.sort(key=key)
    path = os.path.join(folder, f"run-{number:05d}.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for lo in range(0, len(run), BATCH_ROWS):
            columns = list(zip(*run[lo : lo + BATCH_ROWS], strict=True))
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema
            ))  # fmt: skip
    run.clear()
    return path


def _read_run(path: str) -> Iterator[tuple]:
    with pa.OSFile(path, "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield from zip(*(c.to_pylist() for c in batch.columns), strict=True)
