"""A decoded-bytes budget shared by every read-ahead and decode thread of the process.

Each batch a read-ahead loads is a ticket of its stream. Decoding an image reserves an estimate
of its pixel bytes on the batch's ticket before any pixel is decoded, and settles to the size of
the RGB array it keeps; the read-ahead releases the whole batch once the model stages are done
with it. A reservation for a batch waits while the bytes in flight would pass the limit, but only
while an older batch of its own stream is still held: the oldest batch, the one the model stages
need next, never waits, so a batch (or one image) larger than the whole budget is still decoded,
alone, and nothing deadlocks. Decoding outside a read-ahead is not accounted.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(eq=False)
class Stream:
    """One read-ahead's batches: the oldest one not yet released, and the bytes each holds."""

    budget: Budget
    oldest: int = 0
    closed: bool = False
    held: dict[int, int] = field(default_factory=dict)


_BATCH: ContextVar[tuple[Stream, int] | None] = ContextVar("fgid_decode_batch", default=None)


class Reservation:
    """Bytes reserved for one image; `settle(kept)` shrinks them to what the batch keeps."""

    def __init__(self, budget: Budget | None, stream: Stream | None, batch: int, nbytes: int):
        self.budget, self.stream, self.batch, self.nbytes = budget, stream, batch, nbytes

    def settle(self, kept: int) -> None:
        if self.budget is not None and kept < self.nbytes:
            self.budget._give_back(self.stream, self.batch, self.nbytes - kept)
            self.nbytes = kept


class Budget:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0

    def stream(self) -> Stream:
        return Stream(self)

    @contextlib.contextmanager
    def batch(self, stream: Stream, index: int) -> Iterator[None]:
        """Reservations made in this context (and in tasks copying it) count for the batch."""
        token = _BATCH.set((stream, index))
        try:
            yield
        finally:
            _BATCH.reset(token)

    def reserve(self, nbytes: int, limit: int) -> Reservation:
        """Wait until `nbytes` fit under `limit` (see the module docstring), then take them."""
        current = _BATCH.get()
        if current is None or current[0].budget is not self:
            return Reservation(None, None, 0, nbytes)
        stream, index = current
        with self._cond:
            while not stream.closed and index > stream.oldest and self.in_flight + nbytes > limit:
                self._cond.wait()
            if stream.closed:  # the read-ahead is shutting down: nothing more is accounted
                return Reservation(None, None, 0, nbytes)
            stream.held[index] = stream.held.get(index, 0) + nbytes
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)
        return Reservation(self, stream, index, nbytes)

    def release(self, stream: Stream, index: int) -> None:
        """The consumer is done with batch `index`: its bytes go, the next batch is the oldest."""
        with self._cond:
            self.in_flight -= stream.held.pop(index, 0)
            stream.oldest = max(stream.oldest, index + 1)
            self._cond.notify_all()

    def close(self, stream: Stream) -> None:
        """Stop waiting and accounting for `stream`; what it still holds is released."""
        with self._cond:
            stream.closed = True
            self.in_flight -= sum(stream.held.values())
            stream.held.clear()
            self._cond.notify_all()

    def reset_peak(self) -> None:
        with self._cond:
            self.peak = self.in_flight

    def _give_back(self, stream: Stream, index: int, nbytes: int) -> None:
        with self._cond:
            if not stream.closed and index in stream.held:
                stream.held[index] -= nbytes
                self.in_flight -= nbytes
                self._cond.notify_all()


# One per process: shards built side by side (workers > 1) share it.
BUDGET = Budget()
