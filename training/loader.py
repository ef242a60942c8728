"""Training batches from a built dataset: deterministic, resumable, split by node and worker.

Order. Training runs in rounds (epochs). Round r permutes the shards with (seed, r); slot
`node + nodes * worker` of the `nodes * workers` slots takes every slot-th shard of it, so each
round covers every shard once across the cluster (a resampled run with fewer shards than slots
chains several permutations so that every slot gets one). A worker reads its shards in order
through webdataset, shuffles raw samples (bytes, not decoded) in a buffer seeded by (seed,
round, node, worker), pairs each target with a reference image of its identity (training.pairs;
fetched by random access, training.tarindex), decodes and batches: batches are built inside the
worker, so the DataLoader (batch_size=None) moves whole batches between processes.

Resume. The DataLoader takes batches from its workers round-robin, skipping workers that ran
out; global batch b of a resampled run is worker b % W's batch b // W. Shard sample counts come
from the shard indexes, so `start_batch=k` knows, without reading any image, how many batches
each worker contributed before k: it skips whole rounds arithmetically, then drops that many
raw samples of the current round before decoding, and rotates the workers so that the
DataLoader's first worker plays the one that owns batch k. A finite run (resampled=False) ends
after one round and resumes just as exactly; its per-rank batch counts may differ.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import storage
from fgid.dataset import IDENTITIES_FILE, Dataset
from storage.gopen import register
from training.consistentid.batch import ConsistentIDBatch
from training.faceclip.batch import FaceCLIPBatch
from training.pairs import IdentityTable, draw
from training.reference import Reference, decode_sample, shard_id
from training.regions import CLIP_MEAN, CLIP_STD
from training.schedule import Schedule, node_rank
from training.stream import shard_urls, tar_samples
from training.tarindex import ShardReader
from training.text import add_facial_token

log = logging.getLogger(__name__)

Item = tuple[Reference, Reference, bool]  # target, reference, reference is another image


class LoaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, description="samples per batch, per process")
    resolution: int = Field(512, ge=8, description="side of the target image and masks")
    clip_size: int = Field(224, ge=8, description="side of CLIP image-encoder inputs")
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    seed: int = 0
    shuffle_buffer: int = Field(
        1000, ge=0, description="raw samples per worker buffer (~100 KB each at 512 px)"
    )
    shuffle_shards: bool = True
    workers: int = Field(2, ge=0, description="DataLoader worker processes; 0 = in process")
    resampled: bool = Field(True, description="endless rounds for multi-epoch runs")
    pair_identities: bool = Field(True, description="reference = another image of the identity")
    drop_last: bool = Field(False, description="finite runs: drop each worker's short last batch")
    max_length: int = Field(77, ge=8, description="text tokens")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker prepares ahead")
    start_method: Literal["spawn", "forkserver", "fork"] = Field(
        "spawn", description="how worker processes start (see _worker_context)"
    )
    index_cache: str | None = Field(
        None,
        description="local folder for shard tar indexes, shared by workers and later runs "
        "(recommended for s3:// datasets, where indexing a tar reads most of it)",
    )


def shuffled(items: Iterator, size: int, rng) -> Iterator:
    """A buffer shuffle: each item leaves at a random time within `size` items of arriving."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class FaceBatches(IterableDataset):
    """Batches for one process of one node; see the module docstring for the order."""

    def __init__(
        self,
        urls: list[str],
        schedule: Schedule,
        config: LoaderConfig,
        make_batch: Callable[[list[Item]], dict],
        table: IdentityTable | None,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.urls, self.schedule, self.config = urls, schedule, config
        self.make_batch, self.table = make_batch, table
        self.rotation, self.skips = schedule.resume(start_batch)
        self.by_shard = {shard_id(u): u for u in urls}
        self.reader = ShardReader(config.index_cache)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, count = (0, 1) if info is None else (info.id, info.num_workers)
        if count != self.schedule.workers:
            raise RuntimeError(f"planned for {self.schedule.workers} workers, running {count}")
        worker = (self.rotation + physical) % count
        batch: list[Item] = []
        for round_, raw in self._raw(worker, self.skips[worker] * self.config.batch_size):
            batch.append(self._pair(round_, raw))
            if len(batch) == self.config.batch_size:
                yield self.make_batch(batch)
                batch = []
        if batch and not self.config.drop_last:
            yield self.make_batch(batch)

    def _raw(self, worker: int, skip: int) -> Iterator[tuple[int, dict]]:
        """(round, undecoded sample) from `skip` samples into this worker's stream."""
        sched = self.schedule
        for round_ in itertools.count() if sched.resampled else (0,):
            shards = sched.shards(round_, worker)
            total = sum(sched.counts[i] for i in shards)
            if skip >= total:  # a whole round before the resume point: nothing to read
                skip -= total
                continue
            rng = draw(sched.seed, "samples", round_, sched.node, worker)
            source = tar_samples([{"url": self.urls[i]} for i in shards])
            seen: Counter = Counter()
            for raw in shuffled(source, self.config.shuffle_buffer, rng):
                seen[raw["__url__"]] += 1
                if skip:
                    skip -= 1
                    continue
                yield round_, raw
            expected = Counter({self.urls[i]: sched.counts[i] for i in shards})
            if seen != expected:
                log.warning("shard sample counts differ from their indexes: resume is inexact")

    def _pair(self, round_: int, raw: dict) -> Item:
        key = raw["__key__"]
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        identity = self.table.identity_of(key) if self.table is not None else None
        target = decode_sample(members, key, identity or f"unassigned-{key}")
        choice = None
        if self.table is not None and self.config.pair_identities:
            choice = self.table.reference(key, self.config.seed, round_)
        if choice is None:
            return target, target, False
        ref_key, ref_shard = choice
        ref_members = self.reader.read(self.by_shard[ref_shard], ref_key)
        return target, decode_sample(ref_members, ref_key, target.identity), True


class Identified:
    """A batch maker with the identity fields added (picklable, for spawned workers)."""

    def __init__(self, make_batch: Callable[[list[Item]], dict]) -> None:
        self.make_batch = make_batch

    def __call__(self, items: list[Item]) -> dict:
        return {**_identity_fields(items), **self.make_batch(items)}


def _identity_fields(items: list[Item]) -> dict:
    return {
        "key": [t.key for t, _, _ in items],
        "identity": [t.identity for t, _, _ in items],
        "ref_key": [r.key for _, r, _ in items],
        "has_reference": torch.tensor([has for _, _, has in items], dtype=torch.bool),
    }


def consistentid_loader(
    dataset_url: str,
    tokenizer,
    config: LoaderConfig | None = None,
    start_batch: int = 0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    keep_facial_token: bool = False,
    tokenizer_2=None,
) -> DataLoader:
    """ConsistentID batches (training/consistentid/batch.py); adds FACIAL_TOKEN to `tokenizer`
    if it lacks it. `tokenizer_2`: SDXL's second tokenizer (ConsistentID-SDXL's batches)."""
    config = config or LoaderConfig()
    add_facial_token(tokenizer)
    batcher = Identified(ConsistentIDBatch(tokenizer, config, keep_facial_token, tokenizer_2))
    return _loader(dataset_url, config, batcher, start_batch, rank, world_size)


def faceclip_loader(
    dataset_url: str,
    config: LoaderConfig | None = None,
    start_batch: int = 0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """FaceCLIP batches."""
    config = config or LoaderConfig()
    batcher = Identified(FaceCLIPBatch(config))
    return _loader(dataset_url, config, batcher, start_batch, rank, world_size)


def face_batches(
    dataset_url: str,
    config: LoaderConfig,
    make_batch: Callable[[list[Item]], dict],
    start_batch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> FaceBatches:
    """The dataset behind both loaders, for a caller that builds its own DataLoader (which
    must use batch_size=None and num_workers=config.workers)."""
    if start_batch < 0:
        raise ValueError("start_batch must be >= 0")
    dataset_url = str(dataset_url)
    node, nodes = node_rank(rank, world_size)
    urls = shard_urls(dataset_url)
    if not urls:
        raise FileNotFoundError(f"no finished shards under {dataset_url}")
    register(urls[0])
    dataset = Dataset(dataset_url)
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(dataset.kept_samples, map(shard_id, urls)))
    table = None
    if config.pair_identities or storage.exists(dataset.path(IDENTITIES_FILE)):
        table = IdentityTable.read(dataset_url, shards={shard_id(u) for u in urls})
    # Shards with no kept sample are left out, so every slot of a round gets samples.
    urls = [u for u, n in zip(urls, counts, strict=True) if n]
    counts = [n for n in counts if n]
    if not urls:
        raise ValueError(f"{dataset_url} has no kept samples")
    schedule = Schedule(
        counts=tuple(counts),
        node=node,
        nodes=nodes,
        workers=max(1, config.workers),
        seed=config.seed,
        resampled=config.resampled,
        shuffle_shards=config.shuffle_shards,
        batch_size=config.batch_size,
        drop_last=config.drop_last,
    )
    log.info(
        "%d shards, %d samples; rank %d of %d, %d workers, from batch %d",
        len(urls), sum(counts), node, nodes, schedule.workers, start_batch,
    )  # fmt: skip
    return FaceBatches(urls, schedule, config, make_batch, table, start_batch)


def _loader(dataset_url, config, make_batch, start_batch, rank, world_size) -> DataLoader:
    dataset = face_batches(dataset_url, config, make_batch, start_batch, rank, world_size)
    workers = config.workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=config.prefetch_factor if workers else None,
        multiprocessing_context=_worker_context(config.start_method) if workers else None,
    )


def _worker_context(method: str):
    """Workers are spawned by default, not forked from the trainer: a training process holds
    threads (Prefect's API and log workers, fsspec's event loop, CUDA) that a fork copies in
    whatever state they are in, and finished workers of forked finite runs were seen exiting
    with an error after such threads had run. A spawned worker also sees the environment as it
    is now (storage credentials loaded from a Prefect block), which a fork server started
    earlier would not. Spawning costs a few seconds per worker, once per loader (importing torch).

    "forkserver" starts one clean server process per trainer, with this module (and so torch)
    imported once: later workers fork from it in a fraction of a second. It suits a process that
    makes many loaders and whose environment is settled before the first one."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context
