"""Keep the model stages fed: decode the next batches in threads while the current one runs.

`ReadAhead` loads batches in order on one background thread, up to `depth` batches ahead, and
counts how long its consumer (the model stages) waits for them: that wait over the consumer's
whole time is the GPU-idle fraction reported in the shard stats. `ThreadedDecodeStage` spreads
one batch's decoding over a thread pool (Pillow's decoders, file reads and hashing release the
GIL). Neither changes what a batch holds, only when it is ready, so shards stay byte-identical.
Both respect the decoded-bytes budget (fgid.budget, `decode.memory_budget_mb`): a batch is
accounted from its load until the consumer asks for the next one.
"""

from __future__ import annotations

import contextvars
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Generic, TypeVar

from fgid.budget import BUDGET, Budget
from fgid.config import DecodeConfig, DownloadConfig
from fgid.sample import Sample
from fgid.stages.decode import DecodeStage

Chunk = TypeVar("Chunk")
Batch = TypeVar("Batch")


class ReadAhead(Generic[Chunk, Batch]):
    """Iterate `load(chunk)` over `chunks` in order, loading up to `depth` batches ahead.

    depth 0 loads each batch in the consumer's thread when it is asked for (all of that time
    is waiting). A load's exception is raised where its batch would have been yielded, after
    the batches before it. Use as a context manager: leaving it, early or by an exception,
    cancels the loads not started and waits for the one running.

    The images decoded by `load` are accounted on `budget` as one batch each, released when the
    consumer asks for the next batch (or leaves): a load ahead waits while the decoded bytes in
    flight would pass `decode.memory_budget_mb`."""

    def __init__(
        self,
        load: Callable[[Chunk], Batch],
        chunks: Sequence[Chunk],
        depth: int,
        budget: Budget = BUDGET,
    ):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.load, self.chunks, self.depth = load, chunks, depth
        self.budget = budget
        self._stream = budget.stream()
        self.wait_seconds = 0.0
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="fgid-read-ahead") if depth > 0 else None
        )

    def __enter__(self) -> ReadAhead[Chunk, Batch]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Closing the stream first wakes a load waiting for budget, so shutdown cannot hang.
        self.budget.close(self._stream)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, index: int, chunk: Chunk) -> Batch:
        with self.budget.batch(self._stream, index):
            return self.load(chunk)

    def __iter__(self) -> Iterator[Batch]:
        if self._pool is None:
            for index, chunk in enumerate(self.chunks):
                batch = self._timed(partial(self._load, index), chunk)
                yield batch
                del batch
                self.budget.release(self._stream, index)
            return
        todo = enumerate(self.chunks)
        pending: deque[Future[Batch]] = deque()

        def submit_next() -> None:
            item = next(todo, _END)
            if item is not _END:
                # In a copy of the consumer's context: a warning logged while loading is then
                # attributed to the same run (e.g. Prefect's task run) as the consumer's own.
                context = contextvars.copy_context()
                pending.append(self._pool.submit(context.run, self._load, *item))

        for _ in range(self.depth):
            submit_next()
        index = 0
        while pending:
            batch = self._timed(Future.result, pending.popleft())
            submit_next()
            yield batch
            del batch
            self.budget.release(self._stream, index)
            index += 1

    def _timed(self, fn: Callable, arg: object):
        started = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.wait_seconds += time.perf_counter() - started


_END = object()


class ThreadedDecodeStage(DecodeStage):
    """DecodeStage with one task per sample on `pool`; the samples end as DecodeStage leaves them.

    An unexpected error (not a rejection) is raised once every sample has run, so the base
    Stage's retry-one-by-one decides each sample's fate exactly as for the plain stage."""

    def __init__(
        self, config: DecodeConfig, pool: ThreadPoolExecutor, download: DownloadConfig | None = None
    ) -> None:
        super().__init__(config, download)
        self.pool = pool

    def process(self, samples: list[Sample]) -> None:
        if len(samples) == 1:
            return super().process(samples)
        decode_one = super().process
        # Each task runs in a copy of this thread's context: its reservations count for the
        # batch being loaded (fgid.budget).
        futures = [
            self.pool.submit(contextvars.copy_context().run, decode_one, [sample])
            for sample in samples
        ]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
