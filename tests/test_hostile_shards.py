"""Every reader and command against a hostile shard: a skip or a clean error, never code run,
never a file outside the output, and peak memory under MEMORY_BOUND."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from hostile import hostile_dataset, poison_identities

from fgid import shardtar
from fgid.dataset import Dataset
from fgid.shardtar import UnsafeSample
from training.reference import Reference, decode_sample, load_references
from training.stream import tar_samples, webdataset
from training.tarindex import ShardReader

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BOUND = 1536 * 2**20  # bytes of peak RSS for every reader and command together
CHILD_ADDRESS_LIMIT = 16 * 2**30  # a runaway child fails alone instead of taking the machine


@pytest.fixture(scope="module")
def hostile(built_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker, outside = root / "code-ran", root / "outside"
    dataset = hostile_dataset(built_dataset, root / "ds", marker, outside)
    return {"root": root, "ds": dataset, "marker": marker, "outside": outside}


def test_reader_skips_each_hostile_member_with_its_reason(hostile):
    skipped: list[tuple[str, str]] = []
    url = str(hostile["ds"] / "shards" / "00000.tar")
    with shardtar.open_samples(url, on_skip=lambda n, r: skipped.append((n, r))) as samples:
        keys = [key for key, _ in samples]
    assert "bomb0" in keys and all(shardtar.is_key(k) for k in keys)
    reasons = dict(skipped)
    assert reasons["k8.jpg"] == "sparse_member"
    assert reasons["k7.jpg"] == "member_too_large"
    assert reasons["../../outside/k0.jpg"] == "bad_name"
    assert reasons[f"{hostile['outside']}/k1.jpg"] == "bad_name"
    assert reasons["a" * 200 + ".jpg"] == "bad_name"
    assert {reasons[f"k{i}.jpg"] for i in (3, 4, 5, 6)} == {"not_a_file"}


def test_stream_decodes_nothing_it_should_not(hostile):
    seen = {}
    stream = webdataset(str(hostile["ds"])).decode("rgb8", handler=wds.warn_and_continue)
    for sample in stream:
        seen[sample["__key__"]] = sample
    assert not hostile["marker"].exists()
    first = next(s for s in seen.values() if "pyd" in s)
    assert all(isinstance(first[ext], bytes) for ext in ("pyd", "pickle", "pth"))
    assert "bomb0" not in seen  # refused by the pixel cap before decoding, then skipped
    assert first["jpg"].shape[2] == 3


def test_training_decode_refuses_pixel_bombs_and_bad_keys(hostile):
    raw = {
        s["__key__"]: s for s in tar_samples([{"url": str(hostile["ds"] / "shards" / "00000.tar")}])
    }
    bomb = {k: v for k, v in raw["bomb0"].items() if not k.startswith("__")}
    with pytest.raises(UnsafeSample, match="too_large"):
        decode_sample(bomb, "bomb0", "-")
    good = next(k for k in raw if k != "bomb0")
    members = {k: v for k, v in raw[good].items() if not k.startswith("__")}
    assert decode_sample(members, good, "-").image.ndim == 3
    with pytest.raises(UnsafeSample, match="bad_key"):
        decode_sample(members, "../../outside/k0", "-")
    assert not hostile["marker"].exists()


def test_random_access_reads_only_good_samples(hostile):
    url = str(hostile["ds"] / "shards" / "00000.tar")
    reader = ShardReader()
    keys = [str(k) for k in reader.index(url).keys]
    assert all(shardtar.is_key(k) for k in keys) and "k7" not in keys
    good = next(k for k in keys if k != "bomb0")
    assert "jpg" in reader.read(url, good)
    with pytest.raises(UnsafeSample):
        reader.read(url, "../../outside/k0")


def test_identity_keys_that_name_paths_are_refused(hostile, tmp_path):
    poisoned = tmp_path / "ds"
    import shutil

    shutil.copytree(hostile["ds"], poisoned)
    poison_identities(poisoned, hostile["outside"])
    with pytest.raises(UnsafeSample, match="bad_key"):
        load_references(str(poisoned))
    from fgid.export import export_consistentid

    with pytest.raises(UnsafeSample, match="bad_key"):
        export_consistentid(str(poisoned), str(tmp_path / "out"), allow_any_dim=True)
    from training.evaluation.prompts import Prompt
    from training.evaluation.run import image_path

    evil = Reference("../../../outside/k0", "x", None, None, None, None, "", "", None, None)
    with pytest.raises(UnsafeSample, match="bad_key"):
        image_path(str(tmp_path / "eval"), evil, Prompt(0, "accessory", "a {class_word}"))
    assert not hostile["outside"].exists()


CHILD = """
import json, sys
from fgid.config import BuildConfig
from fgid.dataset import Dataset
from fgid.shardtar import UnsafeSample
import webdataset as wds

ds, out = sys.argv[1], sys.argv[2]
done = {}
done["inspect"] = len(list(Dataset.open(ds).first_samples(100)))
from training.stream import webdataset
stream = webdataset(ds).decode("rgb8", handler=wds.warn_and_continue)
done["stream"] = sum(1 for _ in stream)
from fgid.export import export_consistentid
done["export"] = export_consistentid(ds, out, allow_any_dim=True)["samples"]
from fgid.captioning.recaption import recaption
config = BuildConfig(models={"set": "lite"})
try:
    recaption(ds, config, {"extra": "Describe the face."})
    done["caption"] = "ran"
except UnsafeSample as error:
    done["caption"] = error.reason
from fgid.removal import remove_samples
first = Dataset(ds).index(["sha256", "status"]).to_pylist()
sha = next(r["sha256"] for r in first if r["status"] == "ok")
done["remove"] = len(remove_samples(ds, sources=[sha], reason="ticket 1")["samples"])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report the peak of the
# pytest process that started this one.
with open("/proc/self/status") as status:
    hwm = next(line for line in status if line.startswith("VmHWM:"))
done["maxrss"] = int(hwm.split()[1]) * 1024
print(json.dumps(done))
"""


def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_LIMIT, CHILD_ADDRESS_LIMIT))


def test_every_command_in_bounded_memory_writes_nothing_outside(hostile, tmp_path):
    import shutil

    dataset = tmp_path / "ds"
    shutil.copytree(hostile["ds"], dataset)
    before = {p for p in hostile["root"].rglob("*")}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(dataset), str(tmp_path / "export")],
        capture_output=True, text=True, cwd=tmp_path, env=env, preexec_fn=_limit_address_space,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    done = json.loads(run.stdout.strip().splitlines()[-1])
    assert done["inspect"] >= 2 and done["stream"] >= 2 and done["export"] >= 1
    assert done["caption"] == "too_large"  # the bomb's image is refused: a clean error
    assert done["remove"] == 1
    assert done["maxrss"] < MEMORY_BOUND, done["maxrss"]
    assert not hostile["marker"].exists()
    assert {p for p in hostile["root"].rglob("*")} == before
    assert not hostile["outside"].exists()
    # Nothing but what the commands own appeared in their working folder.
    assert {p.name for p in tmp_path.iterdir()} == {"ds", "export"}
    # The takedown's rewrite carried only members a reader accepts.
    names = subprocess.run(["tar", "-tf", str(dataset / "shards" / "00000.tar")],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert names and all(shardtar.split_name(n) for n in names)
    assert Dataset.open(str(dataset)).shard_done(0)
