"""Stream a built dataset's shards into training: from a local folder or object storage, safely.

Shards are read by fgid.shardtar (keys of our form, member size cap, file members only), never
by webdataset's own tar reader, and decoded only by the handlers named here: webdataset's
default decoders would unpickle `.pyd`/`.pickle` members, `torch.load` `.pth` members and
inflate `.gz` members without limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import webdataset as wds
from webdataset import autodecode

from fgid.dataset import Dataset
from fgid.shardtar import decode_embedding, decode_meta, decode_text, image_size, open_samples


def shard_urls(dataset_url: str) -> list[str]:
    """The finished shards of a dataset (their stats file exists), in shard order.

    A tar without its stats belongs to a build that is still running or was interrupted; its
    content would be rewritten identically, but training should see only committed shards."""
    return Dataset(dataset_url).done_tars()


def tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """{"url": ...} dicts -> webdataset-style samples ({"__key__", "__url__", ext: bytes}),
    read through fgid.shardtar: what `webdataset.tariterators.tarfile_samples` does, safely."""
    for source in sources:
        url = source["url"]
        with open_samples(url) as samples:
            for key, members in samples:
                yield {"__key__": key, "__url__": url, **members}


class SafeImageHandler(autodecode.ImageHandler):
    """webdataset's image decoding ("rgb8", "pil", ...) for JPEG/PNG under the pixel cap only."""

    def __call__(self, key: str, data: bytes):
        if re.sub(r".*[.]", "", key).lower() not in self.extensions:
            return None
        image_size(data)
        return super().__call__(key, data)


_BASIC = {
    "txt": decode_text,
    "json": decode_meta,
    "npy": decode_embedding,
}


def basic_handler(key: str, data: bytes):
    """Text, JSON and `.npy` (no pickles); every other member stays bytes."""
    decoder = _BASIC.get(re.sub(r".*[.]", "", key))
    return None if decoder is None else decoder(data)


class ShardStream(wds.DataPipeline, wds.FluidInterface):
    """A webdataset pipeline over shard URLs whose `decode` has no unsafe default handler."""

    def __init__(self, urls: list[str], shardshuffle: int | bool = False, seed: int = 0) -> None:
        stages: list = [wds.SimpleShardList(urls)]
        if shardshuffle:
            stages.append(wds.shuffle(int(shardshuffle), seed=seed))
        stages += [wds.split_by_worker, tar_samples]
        super().__init__(*stages)

    def decode(self, *args, pre=None, post=None, only=None, partial=False, **kw):
        handlers = [SafeImageHandler(a) if isinstance(a, str) else a for a in args]
        decoder = autodecode.Decoder(
            handlers,
            pre=pre or [],
            post=[basic_handler] if post is None else post,
            only=only,
            partial=partial,
        )
        return self.map(decoder, **kw)


def webdataset(dataset_url: str, shardshuffle: int | bool = False, seed: int = 0) -> ShardStream:
    """Every finished shard of `dataset_url` as a webdataset pipeline (`.decode`, `.map`, ...).

    Remote shards are opened through fsspec with credentials from the environment (see
    storage.credentials); URLs carry none, so error messages leak nothing. Shards are read in
    order unless `shardshuffle` (a buffer size) is given."""
    urls = shard_urls(dataset_url)
    if not urls:
        raise FileNotFoundError(f"no finished shards under {dataset_url}")
    return ShardStream(urls, shardshuffle, seed)
