"""Builds that read and write s3:// on a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from s3_server import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server, point_storage_at, running

import storage
from fgid.config import BuildConfig
from fgid.pipeline import build
from fgid.schema import SAMPLE_FIELDS

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 5  # the 10 demo inputs at --shard-size 2
CLI_ARGS = ["--models", "lite", "--shard-size", "2", "--batch-size", "2"]
# Timings and speeds differ between two runs of the same build; everything else must not.
TIMING_FIELDS = {
    "stage_throughput",
    "model_input_wait",
    "stages",
    "tar_write_seconds",
    "wall_seconds",
}


@pytest.fixture(scope="module")
def config():
    return BuildConfig(models={"set": "lite"}, shard_size=2, batch_size=2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as mp:
        point_storage_at(server, mp)
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_inputs, config, lite_models):
    """An uninterrupted local build of the demo photos: what every other build must equal."""
    out = str(tmp_path_factory.mktemp("reference") / "ds")
    build([str(demo_inputs)], out, config, lite_models)
    return out


@pytest.fixture(scope="module")
def s3_build(s3, demo_inputs, config, lite_models):
    out = f"s3://{BUCKET}/plain-ds"
    summary = build([str(demo_inputs)], out, config, lite_models)
    return out, summary


def dataset_files(root: str) -> dict[str, bytes]:
    """Every file of a build by its path under `root`, from a folder or a bucket."""
    base = storage.join(root, "")
    return {u[len(base) :].lstrip("/"): storage.read_bytes(u) for u in storage.walk_files(root)}


def without_timings(data: bytes) -> dict:
    return {k: v for k, v in json.loads(data).items() if k not in TIMING_FIELDS}


def assert_same_build(got_root: str, want_root: str) -> None:
    # The dataset card (plots, written by the Prefect flow) is a report, not dataset content;
    # so are the build records (builds/NNNN.json: when each build ran).
    reports = ("card/", "builds/")
    got, want = ({k: v for k, v in dataset_files(root).items() if not k.startswith(reports)}
                 for root in (got_root, want_root))  # fmt: skip
    assert sorted(got) == sorted(want)
    for rel, data in want.items():
        if rel.endswith(("summary.json", ".stats.json")):
            assert without_timings(got[rel]) == without_timings(data), rel
        else:
            assert got[rel] == data, rel  # tars, Parquet indexes, plan, identities, build.json


def assert_no_partial_objects(root: str) -> None:
    """Only finished files exist, and every tar is whole."""
    allowed = {"build.json", "plan.parquet", "identities.parquet", "summary.json"}
    for i in range(SHARDS):
        allowed |= {f"shards/{i:05d}.{ext}" for ext in ("tar", "parquet", "stats.json")}
    files = dataset_files(root)
    assert {rel for rel in files if not rel.startswith(("card/", "builds/"))} == allowed
    assert {rel for rel in files if rel.startswith("builds/")} == {"builds/0000.json"}
    for rel in (r for r in files if r.endswith(".tar")):
        with (
            storage.open_input(storage.join(root, rel)) as handle,
            tarfile.open(fileobj=handle) as tar,
        ):
            names = [m.name for m in tar.getmembers()]
        assert len(names) % len(SAMPLE_FIELDS) == 0, rel


def test_build_to_s3_equals_a_local_build(s3_build, reference):
    out, summary = s3_build
    assert summary["complete"] and summary["shards"] == {"planned": SHARDS, "done": SHARDS}
    assert_same_build(out, reference)
    assert_no_partial_objects(out)
    with storage.open_input(storage.join(out, "identities.parquet")) as handle:
        assert pq.read_table(handle).num_rows == summary["samples"] > 0
    assert json.loads(storage.read_text(storage.join(out, "summary.json")))["samples"] == 8


def test_training_stream_reads_every_sample_from_s3(s3_build):
    from training.stream import shard_urls, webdataset

    out, summary = s3_build
    assert shard_urls(out) == [f"{out}/shards/{i:05d}.tar" for i in range(SHARDS)]
    samples = list(webdataset(out).decode("rgb8"))
    ok_keys = [r["key"] for r in _index_rows(out) if r["status"] == "ok"]
    assert [s["__key__"] for s in samples] == ok_keys
    assert len(samples) == summary["samples"]
    for sample in samples:
        assert set(SAMPLE_FIELDS) <= set(sample)
        assert sample["jpg"].shape == (512, 512, 3)


def test_inputs_read_from_s3(s3, demo_inputs, reference, config, lite_models):
    photos = f"s3://{BUCKET}/photos"
    for path in sorted(demo_inputs.iterdir()):
        storage.atomic_write_bytes(storage.join(photos, path.name), path.read_bytes())
    out = f"s3://{BUCKET}/from-s3"
    summary = build([photos + "/"], out, config, lite_models)

    def by_name(root: str) -> dict[str, tuple]:
        rows = _index_rows(root)
        return {storage.name(r["source"]): (r["status"], r["reason"], r["sha256"]) for r in rows}

    got, want = by_name(out), by_name(reference)
    assert got == want and len(got) == 10  # same files, same verdicts, same bytes read
    assert all(u.startswith(photos + "/") for u in _sources(out))
    assert summary["samples"] == 8


def _index_rows(root: str) -> list[dict]:
    rows = []
    for url in storage.list_files(storage.join(root, "shards"), "[0-9]*.parquet"):
        with storage.open_input(url) as handle:
            rows += pq.read_table(handle).to_pylist()
    return rows


def _sources(root: str) -> list[str]:
    with storage.open_input(storage.join(root, "plan.parquet")) as handle:
        return pq.read_table(handle)["source"].to_pylist()


def _cli(out: str, demo_inputs: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "build", str(demo_inputs), "--out", out, *CLI_ARGS]


async def _everything_recorded(api_url: str) -> str:
    """Flow runs (with parameters), task runs, logs and artifacts on the server, as one text."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        parts = [r.model_dump_json() for r in await client.read_flow_runs()]
        parts += [t.model_dump_json() for t in await client.read_task_runs()]
        parts += [a.model_dump_json() for a in await client.read_artifacts()]
        offset = 0
        while logs := await client.read_logs(limit=200, offset=offset):
            parts += [log.model_dump_json() for log in logs]
            offset += len(logs)
    return "\n".join(parts)


@pytest.mark.slow
def test_prefect_build_to_s3_keeps_credentials_out_of_runs_logs_and_artifacts(
    s3, prefect_server, demo_inputs, reference
):
    out = f"s3://{BUCKET}/flow-ds"
    env = {**prefect_server.env, **s3.env}
    done = subprocess.run(
        _cli(out, demo_inputs), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_build(out, reference)
    assert SECRET_KEY not in done.stdout + done.stderr

    recorded = ""
    for _ in range(20):  # the server stores logs and task runs asynchronously
        recorded = asyncio.run(_everything_recorded(prefect_server.api_url))
        if "build-flow-ds-lite" in recorded and "identities" in recorded:
            break
        time.sleep(0.5)
    assert out in recorded  # the flow's parameters and artifacts were read, not an empty list
    assert SECRET_KEY not in recorded
    assert ACCESS_KEY not in recorded


@pytest.mark.slow
def test_secret_block_supplies_the_credentials(s3, prefect_server, monkeypatch):
    """FGID_S3_SECRET_BLOCK names a Prefect Secret block; storage then reaches the bucket."""
    url = f"s3://{BUCKET}/secret-block/hello.txt"
    storage.atomic_write_text(url, "hello")
    block = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": s3.endpoint}
    env = {k: v for k, v in prefect_server.env.items() if not k.startswith(("AWS_", "FGID_S3"))}
    code = (
        "import json, sys\n"
        "from prefect.blocks.system import Secret\n"
        "Secret(value=json.loads(sys.argv[1])).save('fgid-s3-test', overwrite=True)\n"
        "import storage\n"
        "from flows.storage_secret import load_storage_secret\n"
        "assert load_storage_secret()\n"
        "print(storage.read_text(sys.argv[2]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(block), url],
        env={**env, "FGID_S3_SECRET_BLOCK": "fgid-s3-test"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "hello"
    assert SECRET_KEY not in done.stderr


@pytest.mark.slow
def test_prefect_build_survives_an_s3_server_restart(
    tmp_path, prefect_server, demo_inputs, reference, monkeypatch
):
    server = S3Server(tmp_path / "s3").start()
    try:
        point_storage_at(server, monkeypatch)
        out = f"s3://{BUCKET}/restart-ds"
        shards = storage.join(out, "shards")
        build_env = {**prefect_server.env, **server.env}
        proc = subprocess.Popen(
            _cli(out, demo_inputs),
            env=build_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        done_before = 0
        while proc.poll() is None and time.monotonic() < deadline and not done_before:
            done_before = len(storage.list_files(shards, "*.stats.json"))
            time.sleep(0.05)
        # A crash, not a clean shutdown: whatever upload is in flight is cut off.
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        assert proc.poll() is None, "the build ended before the server went down"
        assert 1 <= done_before < SHARDS
        time.sleep(3)
        server.start()
        output, _ = proc.communicate(timeout=300)
        log = output.decode(errors="replace")
        assert proc.returncode == 0, log[-4000:]
        assert_same_build(out, reference)
        assert_no_partial_objects(out)
    finally:
        server.stop()


def test_a_bad_line_deep_in_a_bucket_list_is_refused_by_planning(s3, tmp_path, capsys, monkeypatch):
    # A bucket input is checked only up to its first image before the build starts; what
    # planning finds past it is refused the same way, and the output is not left behind.
    import fgid.inputs
    from flows.cli import app
    from flows.cli_common import run_cli

    monkeypatch.setattr(fgid.inputs, "LINE_MAX_BYTES", 64)
    listing = f"s3://{BUCKET}/lists/long.txt"
    storage.atomic_write_bytes(listing, b"https://example.com/a.jpg\n" + b"x" * 65 + b".jpg\n")
    fgid.inputs.check_inputs([listing])  # its first image is there
    out = tmp_path / "out"
    code = run_cli(app, ["build", listing, "--out", str(out), "--models", "lite", "--no-prefect"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and "long.txt:2: a line longer than 64 bytes" in lines[0], err
    assert not out.exists()
