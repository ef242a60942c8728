"""FIFOs, sockets, devices and folders named like photos: a row (or a one-line error) in seconds.

Each check runs in a child process whose address space is capped, so that a regression that
reads /dev/zero to the end fails the test with a MemoryError instead of taking the machine down,
and with a timeout, so that one that opens a FIFO and waits for a writer fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import jpeg_bytes
from tests.photos import astronaut

ROOT = Path(__file__).resolve().parents[1]
CAP = 2 << 30  # address space the child may add once its imports are done

PRELUDE = """
import json, resource, sys, time
args = json.loads(sys.argv[1])

def cap():
    with open("/proc/self/status") as status:
        size = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + args["cap"], size + args["cap"]))

def timed(fn, *a):
    started = time.monotonic()
    try:
        result = fn(*a)
    except Exception as error:
        result = f"{type(error).__name__}: {error}"
    return result, time.monotonic() - started
"""


def run_capped(code: str, timeout: float = 120, **args: object) -> dict:
    """Run PRELUDE + `code` in a child; return the JSON object it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, json.dumps({"cap": CAP, **args})],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def special_files(folder: Path) -> dict[str, str]:
    """A FIFO, a socket, a folder and links to /dev/zero, all named like images; name -> kind."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.jpg")
    path = folder / "sock.jpg"
    if len(os.fsencode(path)) >= 100:  # AF_UNIX paths are limited to about 108 bytes
        pytest.skip("temporary folder path too long for a unix socket")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
    (folder / "x.jpg").mkdir()
    os.symlink("/dev/zero", folder / "zero.jpg")
    return {
        "pipe.jpg": "a FIFO",
        "sock.jpg": "a socket",
        "x.jpg": "a directory",
        "zero.jpg": "a character device",
    }


READ_SOURCES = """
from fgid.stages.decode import Rejected, read_source
cap()
with open("/dev/zero", "rb") as zero:  # the cap is real: an unbounded read fails, not the machine
    control = timed(zero.read, 3 << 30)[0]
results = {}
for path in args["paths"]:
    try:
        read_source(path, max_bytes=100_000_000)
        results[path] = ["read", 0]
    except Rejected as rej:
        results[path] = [f"{rej.code}: {rej.detail}", 0]
print(json.dumps({"control": control, "results": results}))
"""


def test_special_files_are_rejected_unread(tmp_path):
    kinds = special_files(tmp_path)
    paths = {str(tmp_path / name): kind for name, kind in kinds.items()}
    paths["/dev/zero"] = "a character device"
    got = run_capped(READ_SOURCES, timeout=60, paths=list(paths))
    assert got["control"].startswith("MemoryError")
    assert {p: r[0] for p, r in got["results"].items()} == {
        p: f"not_regular_file: {kind}" for p, kind in paths.items()
    }


LIST_AND_LABELS = """
from fgid.inputs import collect_sources, read_labels
cap()
print(json.dumps({
    "lists": [timed(collect_sources, [path]) for path in args["lists"]],
    "labels": [timed(read_labels, path) for path in args["labels"]],
}))
"""


def test_list_and_labels_files_must_be_regular_files(tmp_path):
    special_files(tmp_path)
    os.symlink("/dev/zero", tmp_path / "zero.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    lists = [str(tmp_path / "zero.txt"), str(tmp_path / "fifo.txt")]
    labels = ["/dev/zero", str(tmp_path / "fifo.txt"), str(tmp_path / "pipe.jpg")]
    got = run_capped(LIST_AND_LABELS, timeout=60, lists=lists, labels=labels)
    assert [message for message, _ in got["lists"]] == [
        f"InputError: list file is a character device, not a regular file: {lists[0]}",
        f"InputError: list file is a FIFO, not a regular file: {lists[1]}",
    ]
    assert [message for message, _ in got["labels"]] == [
        "InputError: labels file is a character device, not a regular file: /dev/zero",
        f"InputError: labels file is a FIFO, not a regular file: {labels[1]}",
        f"InputError: labels file is a FIFO, not a regular file: {labels[2]}",
    ]
    assert max(seconds for _, seconds in got["lists"] + got["labels"]) < 5


BUILD = """
import pyarrow.parquet as pq
from pathlib import Path
from fgid.config import BuildConfig
from fgid.models import load_model_set
from fgid.pipeline import build
config = BuildConfig(models={"set": "lite"}, shard_size=4, batch_size=2)
models = load_model_set(config)
cap()
started = time.monotonic()
summary = build(args["inputs"], args["out"], config, models)
seconds = time.monotonic() - started
rows = [r for p in sorted(Path(args["out"], "shards").glob("*.parquet"))
        for r in pq.read_table(p).to_pylist()]
print(json.dumps({"seconds": seconds, "complete": summary["complete"],
                  "rows": {r["source"]: r["reason"] or r["status"] for r in rows}}))
"""


@pytest.mark.timeout(300)
def test_a_build_over_special_files_gives_each_a_row(tmp_path):
    photos = tmp_path / "in"
    kinds = special_files(photos)
    (photos / "astronaut.jpg").write_bytes(jpeg_bytes(astronaut()))
    listing = tmp_path / "more.txt"
    listing.write_text("/dev/zero\nin/x.jpg\n")
    inputs = [str(photos), str(listing)]
    got = run_capped(BUILD, timeout=240, inputs=inputs, out=str(tmp_path / "out"))
    assert got["complete"]
    expected = {str(photos / name): f"not_regular_file: {kind}" for name, kind in kinds.items()}
    expected["/dev/zero"] = "not_regular_file: a character device"
    expected[str(photos / "astronaut.jpg")] = "ok"
    assert got["rows"] == expected
    assert got["seconds"] < 60
