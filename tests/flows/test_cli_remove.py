"""`fgid remove` as users run it: by content hash of the requester's photo, and a clear refusal."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from tests.flows.test_build_flow import run_cli

pytestmark = pytest.mark.slow


def test_remove_by_photo_hash_then_refuse_unknown_identity(demo_inputs, tmp_path):
    out = tmp_path / "ds"
    built = run_cli(
        ["build", str(demo_inputs), "--out", str(out), "--models", "lite", "--no-prefect"]
    )
    assert built.returncode == 0, built.stderr[-2000:]
    photo = (demo_inputs / "astronaut.png").read_bytes()
    takedown = tmp_path / "takedown.txt"
    takedown.write_text(f"# ticket 17\n{hashlib.sha256(photo).hexdigest()}\n")

    removed = run_cli(["remove", str(out), "--sources", str(takedown), "--reason", "ticket 17"])
    assert removed.returncode == 0, removed.stderr[-2000:]
    assert "removed 2 samples" in removed.stderr  # astronaut.png and its byte copy
    index = pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet")))
    assert hashlib.sha256(photo).hexdigest() not in index.column("sha256").to_pylist()
    (record,) = [json.loads(p.read_text()) for p in (out / "removals").glob("*.json")]
    assert record["status"] == "done" and record["reason"] == "ticket 17"

    unknown = run_cli(["remove", str(out), "--identity", "cluster-nobody", "--reason", "t18"])
    assert unknown.returncode == 1 and "cluster-nobody" in unknown.stderr
    neither = run_cli(["remove", str(out), "--reason", "t19"])
    assert neither.returncode == 2 and "exactly one of --identity or --sources" in neither.stderr
