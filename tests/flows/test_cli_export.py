"""`fgid export consistentid` as users run it: a lite build is refused unless asked for."""

from __future__ import annotations

import json

import pytest

from tests.flows.test_build_flow import run_cli

pytestmark = pytest.mark.slow


def test_export_refuses_lite_embeddings_then_writes_when_allowed(demo_inputs, tmp_path):
    out = tmp_path / "ds"
    built = run_cli(
        ["build", str(demo_inputs), "--out", str(out), "--models", "lite", "--no-prefect"]
    )
    assert built.returncode == 0, built.stderr[-2000:]
    target = tmp_path / "cid"
    refused = run_cli(["export", "consistentid", str(out), "--out", str(target)])
    assert refused.returncode == 1 and "128-d" in refused.stderr
    assert not (target / "fgid_consistentid.json").exists()
    allowed = run_cli(["export", "consistentid", str(out), "--out", str(target), "--allow-any-dim"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    records = json.loads((target / "fgid_consistentid.json").read_text())
    assert len(records) == 7  # 8 kept samples, one exact duplicate left out
    assert "expects (1, 512)" in allowed.stderr
