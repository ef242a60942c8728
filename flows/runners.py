"""Prefect task runners for the build flow: a thread pool, or Dask worker processes."""

from __future__ import annotations

import os
from collections.abc import Mapping

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fgid.config import BuildConfig

KINDS = ("threads", "dask")
LOCALHOST = "127.0.0.1"
# The scheduler always serves HTTP (health, metrics; the dashboard when bokeh is installed):
# keep it on loopback, on a free port rather than 8787, which another cluster may hold.
HTTP_ADDRESS = f"{LOCALHOST}:0"


def task_runner(
    kind: str = "threads",
    workers: int = 1,
    address: str | None = None,
    gpus: int | None = None,
) -> TaskRunner:
    """The task runner for `kind`: "threads", or "dask" on the scheduler at `address`.

    Without an address, "dask" starts a local cluster for the flow run: one worker process per
    GPU when there are GPUs (`gpus`: None = count them, 0 = none), else `workers` processes.
    Every Dask worker has one thread, so each process loads one model set and reuses it."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind != "dask":
        raise ValueError(f"unknown task runner {kind!r}; expected one of {', '.join(KINDS)}")
    from prefect_dask import DaskTaskRunner

    if address:
        if gpus:
            # The GPUs belong to the cluster's workers, which this process does not start.
            raise ValueError(
                "gpus cannot be set with a scheduler address: start one `dask worker "
                "--nthreads 1` per GPU, each with its own CUDA_VISIBLE_DEVICES"
            )
        return DaskTaskRunner(address=address)
    devices = gpu_ids(gpus)
    if devices:
        return DaskTaskRunner(
            cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster(devices)
        )
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": LOCALHOST,
            "dashboard_address": HTTP_ADDRESS,
        },
    )


def gpu_request(config: BuildConfig) -> int | None:
    """`gpus` for a build: None (one worker per GPU found) unless the models run on the CPU.

    The lite set is CPU only, and an explicit `cuda:N` pins every worker to that device."""
    device = config.models.device
    if config.models.set == "lite" or device == "cpu" or device.startswith("cuda:"):
        return 0
    return None


def gpu_ids(gpus: int | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The device ids to give the workers, one each: the first `gpus` visible devices.

    Ids come from CUDA_VISIBLE_DEVICES when it is set, so a build limited to some GPUs keeps
    to them, else 0..n-1. With `gpus` None, n is what torch finds, so a CUDA_VISIBLE_DEVICES
    left set on a machine without GPUs gives no GPU workers."""
    if gpus == 0:
        return []
    environ = os.environ if environ is None else environ
    count = gpus if gpus is not None else _cuda_device_count()
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    if count > len(ids):
        raise ValueError(f"{count} GPUs requested but CUDA_VISIBLE_DEVICES={visible!r}")
    return ids[:count]


def gpu_cluster(devices: list[str]) -> dict:
    """SpecCluster arguments: a scheduler and one single-thread worker per device.

    Each nanny sets CUDA_VISIBLE_DEVICES in its worker process before anything touches CUDA,
    so the worker sees only its GPU as cuda:0 and `models.device=auto` needs no change. This is
    what dask-cuda's LocalCUDACluster does, without requiring dask-cuda."""
    return {
        "scheduler": {
            "cls": "distributed.Scheduler",
            "options": {"host": LOCALHOST, "dashboard_address": HTTP_ADDRESS},
        },
        "workers": {
            f"gpu-{device}": {
                "cls": "distributed.Nanny",
                "options": {
                    "nthreads": 1,
                    "host": LOCALHOST,
                    "dashboard": False,
                    "env": {"CUDA_VISIBLE_DEVICES": device},
                },
            }
            for device in devices
        },
    }


def describe(runner: TaskRunner) -> str:
    """One line for logs: where the shards run."""
    if isinstance(runner, ThreadPoolTaskRunner):
        return f"threads: {runner._max_workers} in this process"
    address = getattr(runner, "address", None)
    if address:
        return f"dask: existing scheduler at {address}"
    kwargs = getattr(runner, "cluster_kwargs", {}) or {}
    if "workers" in kwargs:
        specs = kwargs["workers"].values()
        devices = [spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] for spec in specs]
        return f"dask: local cluster, one worker process per GPU ({', '.join(devices)})"
    if "n_workers" in kwargs:
        return f"dask: local cluster, {kwargs['n_workers']} worker processes x 1 thread"
    return type(runner).__name__


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()
