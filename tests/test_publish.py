"""`fgid publish` to a local folder, read back with the real `datasets` library; offline pushes
fail in one line."""

from __future__ import annotations

import json

import pytest
import typer
import yaml

from fgid.dataset import Dataset
from fgid.pipeline import build
from fgid.publish import hub_repo, publish
from flows.cli_common import run_cli
from flows.cli_publish import publish_cmd


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_inputs, lite_config, lite_models):
    out = tmp_path_factory.mktemp("built") / "ds"
    build([str(demo_inputs)], str(out), lite_config, lite_models)
    return out


def test_a_published_folder_loads_with_datasets(built, tmp_path):
    import datasets

    dest = tmp_path / "repo"
    result = publish(str(built), str(dest))
    kept = Dataset(str(built)).index(["status"]).to_pylist()
    ok = sum(r["status"] == "ok" for r in kept)
    assert (dest / "README.md").is_file() and (dest / "summary.json").is_file()
    assert not (dest / "build.json").exists()
    assert any(f.startswith("index/") for f in result["files"])

    # The card's front matter names data files that are there.
    front = yaml.safe_load((dest / "README.md").read_text().split("---")[1])
    [config] = front["configs"]
    [files] = config["data_files"]
    assert sorted(dest.glob(files["path"]))

    shards = datasets.load_dataset(
        "webdataset",
        data_files={"train": str(dest / files["path"])},
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(shards) == ok
    assert {"jpg", "json", "caption.txt"} <= set(shards.column_names)
    assert shards[0]["jpg"].size == (512, 512)
    meta = shards[0]["json"]
    assert (json.loads(meta) if isinstance(meta, str) else meta)["key"] == shards[0]["__key__"]

    index = datasets.load_dataset(
        "parquet",
        data_files={"train": str(dest / "index" / "*.parquet")},
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(index) == len(kept) and "source_caption" in index.column_names

    # Publishing again after a shard is gone removes its stale copies.
    (dest / "shards" / "99999.tar").write_bytes(b"stale")
    publish(str(built), str(dest))
    assert not (dest / "shards" / "99999.tar").exists()


def test_repo_ids_and_folders_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_repo("someone/faces") == "someone/faces"
    assert hub_repo("hf://datasets/someone/faces") == "someone/faces"
    (tmp_path / "someone" / "faces").mkdir(parents=True)
    assert hub_repo("someone/faces") is None  # an existing folder
    for folder in ("./someone/faces", "/tmp/x", "out", "a/b/c", "../x/y"):
        assert hub_repo(folder) is None


def test_pushing_offline_is_a_one_line_error(built, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("publish")(publish_cmd)
    code = run_cli(app, ["publish", str(built), "someone/faces"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot push to someone/faces: the Hub is offline" in err
    assert len(err.strip().splitlines()) == 1
