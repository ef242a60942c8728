"""`fgid caption` as users run it: refuses to overwrite without --replace, then re-captions."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.flows.test_build_flow import run_cli

pytestmark = pytest.mark.slow


def test_caption_needs_replace_to_overwrite(demo_inputs, tmp_path):
    out = tmp_path / "ds"
    built = run_cli(
        ["build", str(demo_inputs), "--out", str(out), "--models", "lite", "--no-prefect"]
    )
    assert built.returncode == 0, built.stderr[-2000:]
    before = (out / "shards" / "00000.tar").read_bytes()
    refused = run_cli(["caption", str(out), "--models", "lite", "--no-prefect"])
    assert refused.returncode == 2
    assert (out / "shards" / "00000.tar").read_bytes() == before
    again = run_cli(["caption", str(out), "--models", "lite", "--no-prefect", "--replace"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done" in again.stderr
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        metas = [
            json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")
        ]
    assert metas and all(
        m["captions"]["caption"]["model"].startswith("fgid-template") for m in metas
    )
