"""A shard that fails on a passing condition is retried by Prefect; the retried shard equals an
unfailed one. (Conditions that cannot pass are not retried: tests/flows/test_build_failures.py.)"""

from __future__ import annotations

import asyncio
import errno

import pytest

pytestmark = pytest.mark.slow


def test_failed_shard_is_retried_and_output_is_unchanged(
    prefect_server, demo_inputs, tmp_path, monkeypatch
):
    from prefect.client.orchestration import PrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.build as flow_module
    from fgid.config import BuildConfig
    from fgid.pipeline import build as build_plain

    config = BuildConfig(models={"set": "lite"}, shard_size=4)
    real_process_shard = flow_module.process_shard
    attempts = []

    def throttled_once(plan, out_dir, cfg, models):
        attempts.append(plan.shard_id)
        if plan.shard_id == 1 and attempts.count(1) == 1:
            # What s3fs raises when the object store answers SlowDown (503).
            raise OSError(errno.EBUSY, "Please reduce your request rate.")
        return real_process_shard(plan, out_dir, cfg, models)

    monkeypatch.setattr(flow_module, "process_shard", throttled_once)
    out = tmp_path / "retried"
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        flow = flow_module.build.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
        summary = flow(inputs=[str(demo_inputs)], out=str(out), config=config)
    assert summary["complete"] and attempts.count(1) == 2

    async def shard_one_runs():
        async with PrefectClient(api=prefect_server.api_url) as client:
            runs = await client.read_task_runs()
            return [r for r in runs if r.name == flow_module.shard_run_name("retried", 1)]

    (run,) = [r for r in asyncio.run(shard_one_runs()) if r.run_count == 2]
    assert run.state.is_completed()

    reference = tmp_path / "reference"
    build_plain([str(demo_inputs)], reference, config)
    for path in sorted((reference / "shards").glob("*.tar")):
        assert (out / "shards" / path.name).read_bytes() == path.read_bytes()
