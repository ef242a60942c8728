"""A build whose shard cannot be written: no retries, the cause in the UI, a resume that works."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time

import pytest

from fgid.errors import FailureError, UsageError
from flows.build_artifacts import dataset_name, resume_command
from flows.retries import transient


class ClientError(Exception):
    """Shaped as botocore's: what s3fs raises from when an object store pushes back."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
        (UsageError("bad setting"), False),
        (FailureError("model file missing"), False),
        (ValueError("a bug"), False),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),  # s3fs's translation of a throttled request
        (OSError(errno.EIO, "Input/output error"), True),  # e.g. a FUSE-mounted bucket
        (raised_from(OSError(errno.EIO, "x"), ClientError("SlowDown", 503)), True),
        (raised_from(OSError(errno.EIO, "x"), ClientError("InternalError", 500)), True),
        (raised_from(OSError(errno.EIO, "x"), ClientError("AccessDenied", 403)), False),
        (raised_from(RuntimeError("stage failed"), ConnectionRefusedError()), True),
    ],
)
def test_only_errors_that_can_clear_up_are_retried(error, retried):
    assert transient(error) is retried


def test_dataset_name_drops_the_scheduled_date():
    assert dataset_name("data/fgid-2026-11-03") == "fgid"
    assert dataset_name("s3://b/faces_2026-11-03_020000") == "faces"
    assert dataset_name("data/nightly/2026-11-03") == "nightly"
    assert dataset_name("out/celeb-demo") == "celeb-demo"
    assert dataset_name("data/fgid-{date}") == dataset_name("data/fgid-{datetime}") == "fgid"


def test_resume_command_repeats_the_settings(lite_config):
    command = resume_command(["in dir", "more"], "s3://b/out", lite_config)
    assert command.startswith("fgid build 'in dir' more --out s3://b/out --shard-size 4 ")
    assert "--set batch_size=4" in command and "--models lite" in command


async def run_report(api_url: str, run_name_prefix: str):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        FlowRunFilter,
        LogFilter,
        TaskRunFilter,
    )

    async with PrefectClient(api=api_url) as client:
        runs = [
            r
            for r in await client.read_flow_runs(flow_run_filter=FlowRunFilter())
            if r.name.startswith(run_name_prefix)
        ]
        ids = {"any_": [r.id for r in runs]}
        deadline = time.monotonic() + 60
        while True:  # the server records task runs, artifacts and logs asynchronously
            tasks = await client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=ids))
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ids))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=ids))
            if all(t.state.is_final() for t in tasks) and len(artifacts) >= 6:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        return runs, tasks, artifacts, logs


@pytest.mark.slow
def test_a_shard_that_cannot_be_written_fails_the_run_with_its_cause(
    prefect_server, demo_inputs, tmp_path, lite_config, monkeypatch
):
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.build as flow_module

    out = tmp_path / "broken"
    # A directory where shard 00001's tar must go: its rename fails (EISDIR), as root too.
    (out / "shards" / "00001.tar").mkdir(parents=True)
    real_process_shard = flow_module.process_shard

    def warn_then_process(plan, out_dir, config, models):
        # A record of fgid's own, as a stage logs when it retries a batch sample by sample.
        logging.getLogger("fgid.stages.base").warning(
            "probe warning from shard %05d", plan.shard_id
        )
        return real_process_shard(plan, out_dir, config, models)

    monkeypatch.setattr(flow_module, "process_shard", warn_then_process)
    flow = flow_module.build.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        started = time.monotonic()
        with pytest.raises(flow_module.ShardsFailed) as failed:
            flow(inputs=[str(demo_inputs)], out=str(out), config=lite_config)
        seconds = time.monotonic() - started
        APILogWorker.drain_all(timeout=30)
    assert "1 of 3 shard(s) failed" in str(failed.value)
    assert "00001: IsADirectoryError" in str(failed.value)
    # Not retried: the 2 + 10 + 30 s of retry delays would show.
    assert seconds < 40, seconds

    runs, tasks, artifacts, logs = asyncio.run(run_report(prefect_server.api_url, "build-broken"))
    (run,) = runs
    assert run.state.is_failed() and "IsADirectoryError" in run.state.message
    by_name = {t.name: t for t in tasks}
    assert by_name["broken shard 00001"].state.is_failed()
    assert by_name["broken shard 00001"].run_count == 1
    assert by_name["broken shard 00000"].state.is_completed()
    assert {"fgid", "build", "dataset:broken", "models:lite"} <= set(run.tags)
    shown = [a for a in artifacts if a.type]  # untyped ones are Prefect's result records
    keyed = {a.key: a for a in shown}
    assert all(a.key for a in shown)
    assert all(a.task_run_id is None for a in shown)  # on the flow run itself
    failure = keyed["fgid-failure-broken"].data
    assert "| 00001 | IsADirectoryError: [Errno 21] Is a directory: " in failure
    assert f"fgid build {demo_inputs} --out {out} --shard-size 4" in failure
    summary = keyed["fgid-summary-broken"].data
    assert "2 of 3 shards, 6 of 10 planned inputs" in summary
    assert "fgid-card-broken" not in keyed  # no card for a partial dataset
    bar = keyed["fgid-progress-broken"]
    assert bar.data == 60.0 and bar.description.startswith("failed: 2 of 3 shards, 6 of 10 inputs")
    shards = {row["shard"]: row for row in json.loads(keyed["fgid-shards-broken"].data)}
    assert shards["00001"]["state"] == "failed" and shards["00000"]["kept"] == 4
    assert keyed["fgid-output-broken"].data.endswith(f"]({out.as_uri()})")
    messages = [(log.task_run_id, log.message) for log in logs]
    probe = [task for task, m in messages if m == "probe warning from shard 00000"]
    assert probe == [by_name["broken shard 00000"].id]
    assert any(
        "not retried, it cannot clear up by itself: IsADirectoryError" in m for _, m in messages
    )

    # Fixed, the same command resumes: a run named as a resume builds only the failed shard.
    (out / "shards" / "00001.tar").rmdir()
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        summary = flow(inputs=[str(demo_inputs)], out=str(out), config=lite_config)
    assert summary["complete"]
    runs, tasks, artifacts, _ = asyncio.run(
        run_report(prefect_server.api_url, "build-broken-lite-resume")
    )
    (resumed,) = runs
    assert resumed.state.is_completed() and "resume" in resumed.tags
    assert sorted(t.name for t in tasks) == ["broken shard 00001", "finalize-broken"]
    status = next(a for a in artifacts if a.key == "fgid-status-broken").data
    assert "Resumed: 2 shard(s) done before this run (00000, 00002)" in status
