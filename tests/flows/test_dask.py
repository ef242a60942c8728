"""The build flow on real Dask clusters equals a plain local build; runner choices."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.runners import describe, gpu_cluster, gpu_ids, gpu_request, task_runner

REPO = Path(__file__).resolve().parents[2]
SHARD_SIZE = 2  # the 10 demo inputs make 5 shards, enough to reach both workers


def dask_cli(*args: str, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args], env=env, cwd=REPO, stdout=out, stderr=out
        )


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def dask_scheduler(prefect_server, tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, as an operator runs them."""
    env = {**prefect_server.env, "PREFECT_HOME": str(tmp_path / "worker-prefect-home")}
    file = str(tmp_path / "scheduler.json")
    scheduler = ["scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file", file]
    scheduler += ["--dashboard-address", "127.0.0.1:0"]
    worker = ["worker", "--scheduler-file", file, "--host", "127.0.0.1", "--nthreads", "1"]
    # A worker serves HTTP (health, metrics) even with --no-dashboard: keep that on loopback too.
    worker += ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    procs = [dask_cli(*scheduler, env=env, log=tmp_path / "scheduler.log")]
    try:
        for i in range(2):
            procs.append(dask_cli(*worker, env=env, log=tmp_path / f"worker-{i}.log"))
        from distributed import Client

        deadline = time.monotonic() + 60
        while not os.path.exists(file) and time.monotonic() < deadline:
            time.sleep(0.2)
        with Client(scheduler_file=file, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            yield client.scheduler.address
    finally:
        stop(procs[1:])
        stop(procs[:1])


def install_probes(dask_worker) -> None:
    """Count model-set loads and record which model set built each shard, in this worker."""
    import logging

    import fgid.models
    import fgid.pipeline

    loads, shards = [], []
    real_load, real_process = fgid.models.load_model_set, fgid.pipeline.process_shard

    def counting_load(config):
        loads.append(config.models.set)
        return real_load(config)

    def recording_process(plan, out_dir, config, models):
        shards.append((plan.shard_id, id(models)))
        # A record of fgid's own, as a stage logs when it retries a batch sample by sample.
        logging.getLogger("fgid.stages.base").warning("probe: shard %05d", plan.shard_id)
        return real_process(plan, out_dir, config, models)

    # Patched where they are defined: the task function reaches a worker by value (cloudpickle),
    # its globals rebuilt from these modules when the task is unpickled there.
    fgid.models.load_model_set = counting_load
    fgid.pipeline.process_shard = recording_process
    dask_worker.fgid_probe = (loads, shards)


def read_probes(dask_worker) -> dict:
    import fgid.models

    loads, shards = dask_worker.fgid_probe
    idle = sum(len(sets) for sets in fgid.models._idle.values())
    return {"pid": os.getpid(), "loads": loads, "shards": shards, "idle": idle}


def output_files(out: Path) -> dict[str, bytes]:
    files = sorted(out.rglob("*.tar")) + sorted(out.rglob("*.parquet"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def reference(demo_inputs, tmp_path_factory):
    """A plain local build of the demo inputs: what every distributed build must equal."""
    from fgid.config import BuildConfig
    from fgid.pipeline import build

    config = BuildConfig(models={"set": "lite"}, shard_size=SHARD_SIZE)
    out = tmp_path_factory.mktemp("reference") / "out"
    build([str(demo_inputs)], out, config)
    return config, output_files(out)


async def run_logs(api_url: str, run_name: str, wanted: int) -> tuple[dict, set]:
    """Task run ids by name, and (task run id, message) of the named flow run's logs, once
    `wanted` probe records are in: each worker process sends its logs in its own batches."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, TaskRunFilter

    async with PrefectClient(api=api_url) as client:
        (run,) = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name={"any_": [run_name]})
        )
        ids = {"any_": [run.id]}
        deadline = time.monotonic() + 60
        while True:
            tasks = await client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=ids))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=ids))
            found = {(log.task_run_id, log.message) for log in logs}
            probes = [m for _, m in found if m.startswith("probe: ")]
            if len(probes) >= wanted or time.monotonic() > deadline:
                return {t.name: t.id for t in tasks}, found
            await asyncio.sleep(0.5)


def run_flow(runner, api_url: str, inputs: Path, out: Path, config) -> dict:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.build import build

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            return build.with_options(task_runner=runner)(
                inputs=[str(inputs)], out=str(out), config=config
            )
        finally:
            # Send the run's last logs and events now: once the shared test server stops, the
            # exit-time drain retries against a closed port for about a minute.
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)


@pytest.mark.slow
def test_build_on_an_existing_cluster_equals_local_build(
    dask_scheduler, prefect_server, demo_inputs, reference, tmp_path
):
    import cloudpickle
    from distributed import Client

    config, expected = reference
    out = tmp_path / "dask-out"
    # The probes are defined here, so the workers get them by value, not by module name.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with Client(dask_scheduler) as client:
            client.run(install_probes)
            runner = task_runner("dask", address=dask_scheduler)
            summary = run_flow(runner, prefect_server.api_url, demo_inputs, out, config)
            probes = list(client.run(read_probes).values())
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    assert summary["complete"]
    assert sum(name.endswith(".tar") for name in expected) == 5
    assert output_files(out) == expected
    busy = [p for p in probes if p["shards"]]
    assert len({p["pid"] for p in busy}) == 2 and os.getpid() not in {p["pid"] for p in probes}
    assert sorted(s for p in busy for s, _ in p["shards"]) == list(range(5))
    for probe in busy:
        # One load per worker process, the same model set for every shard it built.
        assert probe["loads"] == ["lite"] and probe["idle"] == 1
        assert len({models for _, models in probe["shards"]}) == 1
    # fgid's own records from the worker processes are in each shard's task-run logs.
    tasks, logs = asyncio.run(run_logs(prefect_server.api_url, "build-dask-out-lite", 5))
    for shard in range(5):
        task_run = tasks[f"dask-out shard {shard:05d}"]
        assert (task_run, f"probe: shard {shard:05d}") in logs


@pytest.mark.slow
def test_local_dask_cluster_equals_local_build(prefect_server, demo_inputs, reference, tmp_path):
    config, expected = reference
    out = tmp_path / "local-cluster-out"
    runner = task_runner("dask", workers=2, gpus=0)
    summary = run_flow(runner, prefect_server.api_url, demo_inputs, out, config)
    assert summary["complete"]
    assert output_files(out) == expected


def test_threads_runner():
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = task_runner("threads", workers=3)
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert describe(runner) == "threads: 3 in this process"


def test_unknown_runner_is_refused():
    with pytest.raises(ValueError, match="unknown task runner 'ray'"):
        task_runner("ray")


def test_dask_runner_with_an_address_connects_and_starts_nothing():
    runner = task_runner("dask", workers=8, address="tcp://10.0.0.5:8786")
    assert runner.address == "tcp://10.0.0.5:8786" and runner.cluster_class is None
    assert describe(runner) == "dask: existing scheduler at tcp://10.0.0.5:8786"
    with pytest.raises(ValueError, match="one `dask worker"):
        task_runner("dask", address="tcp://10.0.0.5:8786", gpus=2)


def test_dask_runner_without_gpus_starts_single_thread_processes_on_loopback():
    runner = task_runner("dask", workers=3, gpus=0)
    assert runner.cluster_class == "distributed.LocalCluster"
    assert runner.cluster_kwargs == {
        "n_workers": 3,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }
    assert describe(runner) == "dask: local cluster, 3 worker processes x 1 thread"


def test_dask_runner_with_gpus_starts_one_worker_per_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runner = task_runner("dask", workers=8, gpus=2)
    assert runner.cluster_class == "distributed.SpecCluster"
    assert runner.cluster_kwargs == gpu_cluster(["0", "1"])
    assert describe(runner) == "dask: local cluster, one worker process per GPU (0, 1)"


def test_gpu_cluster_gives_each_worker_only_its_device():
    spec = gpu_cluster(["2", "5"])
    assert spec["scheduler"]["options"]["host"] == "127.0.0.1"
    workers = spec["workers"]
    assert {name: w["options"]["env"] for name, w in workers.items()} == {
        "gpu-2": {"CUDA_VISIBLE_DEVICES": "2"},
        "gpu-5": {"CUDA_VISIBLE_DEVICES": "5"},
    }
    assert all(w["cls"] == "distributed.Nanny" for w in workers.values())
    assert all(w["options"]["nthreads"] == 1 for w in workers.values())
    assert all(w["options"]["host"] == "127.0.0.1" for w in workers.values())


@pytest.mark.slow
def test_gpu_cluster_workers_each_see_only_their_device():
    from distributed import Client, SpecCluster

    with SpecCluster(**gpu_cluster(["3", "5"])) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert len({pid for pid, _ in seen.values()}) == 2
    assert sorted(device for _, device in seen.values()) == ["3", "5"]


@pytest.mark.parametrize(
    ("gpus", "environ", "expected"),
    [
        (0, {"CUDA_VISIBLE_DEVICES": "0,1"}, []),
        (2, {}, ["0", "1"]),
        (1, {"CUDA_VISIBLE_DEVICES": "3,5"}, ["3"]),  # a build limited to some GPUs
        (2, {"CUDA_VISIBLE_DEVICES": "GPU-8f2c, GPU-91ab"}, ["GPU-8f2c", "GPU-91ab"]),
    ],
)
def test_gpu_ids(gpus, environ, expected):
    assert gpu_ids(gpus, environ) == expected


@pytest.mark.parametrize(
    ("found", "environ", "expected"),
    [
        (3, {}, ["0", "1", "2"]),
        (2, {"CUDA_VISIBLE_DEVICES": "3,5"}, ["3", "5"]),
        (0, {}, []),
        (0, {"CUDA_VISIBLE_DEVICES": "0"}, []),  # left set on a machine without GPUs
    ],
)
def test_gpu_ids_counts_devices_when_not_told(monkeypatch, found, environ, expected):
    import flows.runners

    monkeypatch.setattr(flows.runners, "_cuda_device_count", lambda: found)
    assert gpu_ids(None, environ) == expected


def test_more_gpus_than_visible_is_refused():
    with pytest.raises(ValueError, match="3 GPUs requested"):
        gpu_ids(3, {"CUDA_VISIBLE_DEVICES": "0,1"})


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"set": "lite"}, 0),
        ({"set": "full", "device": "cpu"}, 0),
        ({"set": "full", "device": "cuda:1"}, 0),  # pinned: every worker uses that device
        ({"set": "full", "device": "auto"}, None),
        ({"set": "full", "device": "cuda"}, None),
    ],
)
def test_gpu_request_follows_the_model_device(models, expected):
    from fgid.config import BuildConfig

    assert gpu_request(BuildConfig(models=models)) == expected
