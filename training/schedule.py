"""Which shards each (round, node, worker) reads, and where a resumed run starts: pure arithmetic.

See training/loader.py's docstring for the order and resume rules this implements.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from training.pairs import draw


def node_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): arguments, else torch.distributed when initialised, else RANK and
    WORLD_SIZE from the environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank = found[0] if rank is None else rank
    world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return rank, world_size


@dataclass(frozen=True)
class Schedule:
    """Which shards each (round, node, worker) reads, and where a resumed run starts."""

    counts: tuple[int, ...]  # kept samples per shard
    node: int
    nodes: int
    workers: int  # >= 1; virtual workers, the DataLoader's with workers=0 being one
    seed: int
    resampled: bool
    shuffle_shards: bool
    batch_size: int
    drop_last: bool

    def shards(self, round_: int, worker: int) -> list[int]:
        slots = self.nodes * self.workers
        order: list[int] = []
        for rep in itertools.count():
            perm = list(range(len(self.counts)))
            if self.shuffle_shards:
                draw(self.seed, "shards", round_, rep).shuffle(perm)
            order += perm
            if not self.resampled or len(order) >= slots:
                break
        return order[self.node + self.nodes * worker :: slots]

    def batches(self, worker: int) -> int:
        """Batches of `worker` in a finite run."""
        samples = sum(self.counts[i] for i in self.shards(0, worker))
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def resume(self, start_batch: int) -> tuple[int, tuple[int, ...]]:
        """(worker playing the DataLoader's first worker, batches each worker skips)."""
        w = self.workers

        def owned(key: int, worker: int) -> int:  # worker's batches with round-robin key < key
            return max(0, -(-(key - worker) // w))

        if self.resampled:
            return start_batch % w, tuple(owned(start_batch, v) for v in range(w))
        sizes = [self.batches(v) for v in range(w)]
        if start_batch >= sum(sizes):
            return 0, tuple(sizes)

        def before(key: int) -> int:
            return sum(min(n, owned(key, v)) for v, n in enumerate(sizes))

        lo, hi = 0, w * max(sizes)  # the round-robin key of batch start_batch
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if before(mid + 1) > start_batch else (mid + 1, hi)
        return lo % w, tuple(min(n, owned(lo, v)) for v, n in enumerate(sizes))
