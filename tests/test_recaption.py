"""Captioning a built dataset again: new captions and provenance, nothing else changed, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from fgid.captioning.captioners import load_captioner
from fgid.captioning.recaption import recaption
from fgid.captioning.run import DEFAULT_FIELDS, FieldExists, check_fields, fields_from_options
from fgid.config import BuildConfig
from fgid.finalize import finalize
from fgid.pipeline import build
from fgid.schema import FACIAL_PROMPT
from tests.tiny_full_models import build_tiny_llava

CUSTOM = "Describe the person's hair and headwear."
FIELDS = {"caption": CUSTOM, "skin": "Describe the person's skin."}
TEMPLATE = "fgid-template-captioner-v1"


@pytest.fixture(scope="module")
def built(lite_config, lite_models, demo_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("recaption") / "built"
    build([str(demo_inputs)], str(out), lite_config, lite_models)
    return out


@pytest.fixture()
def dataset(built, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(built, copy)
    return copy


@pytest.fixture(scope="module")
def llava_config(tmp_path_factory):
    llava = build_tiny_llava(tmp_path_factory.mktemp("llava"))
    return BuildConfig(
        models={"set": "full", "llava": str(llava), "device": "cpu"},
        caption={"max_new_tokens": 8, "batch_size": 2},
    )


@pytest.fixture(scope="module")
def llava(llava_config):
    return load_captioner(llava_config)


class Counting:
    """Passes calls to a captioner, remembering what it captioned; can fail on one call."""

    def __init__(self, inner, fail_on_call: int | None = None) -> None:
        self.inner, self.name, self.fail_on_call = inner, inner.name, fail_on_call
        self.batches: list[list[str]] = []  # pixel hashes of each call's images
        self.calls = 0

    def caption(self, images, prompt, hints):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("captioner crashed")
        self.batches.append([hashlib.sha256(image.tobytes()).hexdigest() for image in images])
        return self.inner.caption(images, prompt, hints)


def tar_members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def tars(folder) -> list:
    return sorted((folder / "shards").glob("*.tar"))


def test_llava_recaption_replaces_and_adds_fields(built, dataset, llava_config, llava):
    record = recaption(str(dataset), llava_config, FIELDS, replace=True, captioner=llava)
    assert record["status"] == "done" and record["models"] == [llava.name]
    assert record["fields"] == FIELDS and record["shards"]["captioned"] == [0, 1, 2]
    assert sorted(p.name for p in (dataset / "captions").iterdir()) == [f"{record['id']}.json"]
    prov = {
        name: {"model": llava.name, "prompt": p, "run": record["id"]} for name, p in FIELDS.items()
    }
    prov["facial"] = {"model": TEMPLATE, "prompt": FACIAL_PROMPT, "run": "build"}

    wanted: dict[str, dict[str, str]] = {}
    for old_tar, new_tar in zip(tars(built), tars(dataset), strict=True):
        # The model run directly on the pixels a webdataset reader decodes, batched as the run.
        reader = wds.WebDataset(str(old_tar), shardshuffle=False).decode("rgb8")
        old_samples = list(reader)
        expected: dict[str, dict[str, str]] = {s["__key__"]: {} for s in old_samples}
        for start in range(0, len(old_samples), llava_config.caption.batch_size):
            chunk = old_samples[start : start + llava_config.caption.batch_size]
            images = [np.asarray(s["jpg"]) for s in chunk]
            for name, prompt in FIELDS.items():
                texts = llava.caption(images, prompt, [{}] * len(chunk))
                for s, text in zip(chunk, texts, strict=True):
                    expected[s["__key__"]][name] = text
        wanted.update(expected)
        old = {m.name: data for m, data in tar_members(old_tar)}
        new = tar_members(new_tar)
        order = [
            n for k in expected for n in [*(x for x in old if x.startswith(k)), f"{k}.skin.txt"]
        ]
        assert [m.name for m, _ in new] == order  # a new field follows its sample's members
        for member, data in new:
            assert (member.mtime, member.mode, member.uid, member.uname) == (0, 0o644, 0, "")
            key, ext = member.name.split(".", 1)
            if ext in ("caption.txt", "skin.txt"):
                assert data.decode() == expected[key][ext[:-4]]
            elif ext == "json":
                meta, before = json.loads(data), json.loads(old[member.name])
                assert meta.pop("captions") == prov and meta == before
            else:
                assert data == old[member.name]  # image, mask, embedding, facial: untouched
        stats_path = new_tar.with_suffix(".stats.json")
        stats = json.loads(stats_path.read_text())
        before = json.loads((built / "shards" / stats_path.name).read_text())
        assert stats.pop("captions") == {
            n: {k: p[k] for k in ("model", "run")} for n, p in prov.items()
        }
        assert stats.pop("tar_bytes") == sum(len(d) for _, d in new)
        before.pop("tar_bytes")
        assert stats == before
        index = new_tar.with_suffix(".parquet").name
        assert (dataset / "shards" / index).read_bytes() == (built / "shards" / index).read_bytes()

    samples = list(wds.WebDataset([str(p) for p in tars(dataset)], shardshuffle=False).decode())
    assert {
        s["__key__"]: {"caption": s["caption.txt"], "skin": s["skin.txt"]} for s in samples
    } == wanted
    assert len({s["skin.txt"] for s in samples}) > 1  # the model looked at each image
    keys = pq.read_table([str(p) for p in (dataset / "shards").glob("*.parquet")])["key"]
    assert {s["__key__"] for s in samples} <= set(keys.to_pylist())


def test_build_rerun_and_finalize_accept_a_recaptioned_dataset(
    dataset, lite_config, lite_models, demo_inputs
):
    recaption(str(dataset), lite_config, DEFAULT_FIELDS, replace=True)
    before = {p.name: p.read_bytes() for p in tars(dataset)}
    summary = build([str(demo_inputs)], str(dataset), lite_config, lite_models)
    assert summary["complete"] and summary["samples"] == 8
    assert {p.name: p.read_bytes() for p in tars(dataset)} == before  # no shard rebuilt
    assert finalize(str(dataset), lite_config)["samples"] == 8


def test_template_recaption_rebuilds_the_same_captions_from_the_json(built, dataset, lite_config):
    template = Counting(load_captioner(lite_config))
    record = recaption(str(dataset), lite_config, DEFAULT_FIELDS, replace=True, captioner=template)
    for old_tar, new_tar in zip(tars(built), tars(dataset), strict=True):
        for (old, old_data), (new, data) in zip(
            tar_members(old_tar), tar_members(new_tar), strict=True
        ):
            assert old.name == new.name
            if new.name.endswith(".json"):
                runs = {p["run"] for p in json.loads(data)["captions"].values()}
                assert runs == {record["id"]}
            else:
                assert data == old_data  # the hints read back from the json give the same text
    assert sum(map(len, template.batches)) == 16
    again = Counting(template.inner)
    recaption(str(dataset), lite_config, DEFAULT_FIELDS, replace=True, captioner=again)
    assert again.calls == 0  # every shard already at this run: skipped


def test_existing_field_is_kept_without_replace(dataset, lite_config):
    before = {p.name: p.read_bytes() for p in (dataset / "shards").iterdir()}
    with pytest.raises(FieldExists, match="caption"):
        recaption(str(dataset), lite_config, {"caption": DEFAULT_FIELDS["caption"]})
    assert {p.name: p.read_bytes() for p in (dataset / "shards").iterdir()} == before
    assert not (dataset / "captions").exists()


def test_field_names_and_cli_pairs():
    for bad in ("bad.name", "Caption", "1st", "", "a-b"):
        with pytest.raises(ValueError):
            check_fields({bad: "prompt"})
    with pytest.raises(ValueError):
        check_fields({"empty": " "})
    assert fields_from_options([], []) == DEFAULT_FIELDS
    assert fields_from_options([], ["facial"]) == {"facial": FACIAL_PROMPT}
    assert fields_from_options([CUSTOM], ["hair"]) == {"hair": CUSTOM}
    for prompts, fields in (([], ["hair"]), ([CUSTOM], []), ([CUSTOM, CUSTOM], ["a", "a"])):
        with pytest.raises(ValueError):
            fields_from_options(prompts, fields)


def test_crash_mid_shard_resumes_per_sample(built, dataset, tmp_path, llava_config, llava):
    fields = {"hair": CUSTOM, "skin": FIELDS["skin"]}  # new fields: no replace needed
    reference = tmp_path / "reference"
    shutil.copytree(built, reference)
    recaption(str(reference), llava_config, fields, captioner=llava)

    crashing = Counting(llava, fail_on_call=3)  # shard 0, second batch of two, first field
    with pytest.raises(RuntimeError, match="captioner crashed"):
        recaption(str(dataset), llava_config, fields, captioner=crashing)
    shard0 = dataset / "shards" / "00000.tar"
    assert shard0.read_bytes() == (built / "shards" / "00000.tar").read_bytes()
    (journal,) = (dataset / "captions").glob("*.00000.jsonl")
    journaled = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert len(journaled) == 2
    with journal.open("a") as handle:
        handle.write('{"key": "cut-by-a-crash", "mod')  # a line a crash left half written
    record = json.loads(journal.with_name(journal.name.split(".")[0] + ".json").read_text())
    assert record["status"] == "running"

    resumed = Counting(llava)
    record = recaption(str(dataset), llava_config, fields, captioner=resumed)
    shard0_samples = wds.WebDataset(str(shard0), shardshuffle=False).decode("rgb8")
    pixels = {
        s["__key__"]: hashlib.sha256(np.asarray(s["jpg"]).tobytes()).hexdigest()
        for s in shard0_samples
    }
    assert list(pixels)[:2] == journaled
    # Shard 0 comes first: only its two unjournaled samples, one call per field; then 6 more.
    rest = [pixels[k] for k in list(pixels)[2:]]
    assert resumed.batches[:2] == [rest, rest]
    assert sum(map(len, resumed.batches)) == 2 * (8 - len(journaled))
    assert record["status"] == "done" and not list((dataset / "captions").glob("*.jsonl"))
    for path in sorted((reference / "shards").iterdir()):
        assert (dataset / "shards" / path.name).read_bytes() == path.read_bytes(), path.name


def test_crash_between_new_tar_and_stats_is_finished_by_a_rerun(
    built, dataset, tmp_path, lite_config, monkeypatch
):
    import storage

    reference = tmp_path / "reference"
    shutil.copytree(built, reference)
    recaption(str(reference), lite_config, DEFAULT_FIELDS, replace=True)
    real_write = storage.atomic_write_text

    def killed_at_commit(url, text):
        if str(url).endswith("00001.stats.json"):
            raise OSError(28, "No space left on device")
        real_write(url, text)

    monkeypatch.setattr(storage, "atomic_write_text", killed_at_commit)
    with pytest.raises(OSError):
        recaption(str(dataset), lite_config, DEFAULT_FIELDS, replace=True)
    monkeypatch.setattr(storage, "atomic_write_text", real_write)
    assert list((dataset / "captions").glob("*.00001.jsonl"))  # new tar in place, not committed
    again = Counting(load_captioner(lite_config))
    recaption(str(dataset), lite_config, DEFAULT_FIELDS, replace=True, captioner=again)
    # Shard 1 is finished from its journal; only shard 2 (one batch, two fields) is captioned.
    assert len(again.batches) == 2 and not list((dataset / "captions").glob("*.jsonl"))
    for path in sorted((reference / "shards").iterdir()):
        assert (dataset / "shards" / path.name).read_bytes() == path.read_bytes(), path.name
