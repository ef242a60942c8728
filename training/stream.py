"""Stream a built dataset's shards into training: from a local folder or object storage."""

from __future__ import annotations

import posixpath

import webdataset as wds

import storage
from storage.gopen import open_for_webdataset, register


def shard_urls(dataset_url: str) -> list[str]:
    """The finished shards of a dataset (their stats file exists), in shard order.

    A tar without its stats belongs to a build that is still running or was interrupted; its
    content would be rewritten identically, but training should see only committed shards."""
    shards = storage.join(str(dataset_url), "shards")
    done = {
        posixpath.basename(u).removesuffix(".stats.json")
        for u in storage.list_files(shards, "[0-9]*.stats.json")
    }
    return [
        u
        for u in storage.list_files(shards, "[0-9]*.tar")
        if posixpath.basename(u).removesuffix(".tar") in done
    ]


def webdataset(dataset_url: str, **kw) -> wds.WebDataset:
    """A `webdataset.WebDataset` over every finished shard of `dataset_url`.

    Remote shards are opened through fsspec with credentials from the environment (see
    storage.credentials); URLs carry none, so webdataset's error messages leak nothing.
    Keyword arguments go to WebDataset; shards are read in order unless `shardshuffle` is set."""
    urls = shard_urls(dataset_url)
    if not urls:
        raise FileNotFoundError(f"no finished shards under {dataset_url}")
    register(urls[0])
    kw.setdefault("shardshuffle", False)
    dataset = wds.WebDataset(urls, **kw)
    # Pickled by reference with the dataset: a spawned DataLoader worker that unpickles it
    # imports storage.gopen, which registers the scheme in that process too.
    dataset.fgid_opener = open_for_webdataset
    return dataset
