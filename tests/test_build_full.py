"""The `full` model set (InsightFace, BiSeNet, LLaVA code paths) through a whole build.

The models are tiny, built here under the real file names and formats; real weights cannot be
downloaded on the machines that run these tests.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from fgid.pipeline import build


def test_full_set_builds_readable_shards(full_config, demo_inputs, tmp_path):
    out = tmp_path / "full"
    summary = build([str(demo_inputs)], out, full_config)
    assert summary["complete"]
    assert summary["embedding_dim"] == 512
    index = pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet"))).to_pylist()
    assert len(index) == len(list(demo_inputs.iterdir()))
    by_name = {r["source"].rsplit("/", 1)[1]: r for r in index}
    assert by_name["notes.jpg"]["reason"].startswith("not_an_image")

    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert len(samples) == summary["samples"] > 0
    for sample in samples:
        meta = sample["json"]
        assert meta["models"]["detector"].startswith("insightface")
        assert meta["models"]["captioner"].startswith("llava")
        assert meta["embedding"]["dim"] == 512
        assert abs(np.linalg.norm(sample["id.npy"]) - 1.0) < 1e-4  # normed_embedding
        assert meta["gender"] in ("male", "female")
        assert meta["regions"]["unseen"] == []  # BiSeNet can produce every class
        assert isinstance(sample["caption.txt"], str) and isinstance(sample["facial.txt"], str)
    assert json.loads((out / "summary.json").read_text())["samples"] == summary["samples"]
