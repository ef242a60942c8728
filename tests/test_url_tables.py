"""URL tables (CSV, TSV, JSONL, Parquet) built end to end against a real HTTP server on
127.0.0.1: every URL ends as a row with its reason, table columns travel to the index and json."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_server import serving

from fgid.dataset import Dataset
from fgid.inputs import InputError, plan_shards
from fgid.pipeline import build
from fgid.schema import REASONS, reason_code
from fgid.shardtar import decode_meta
from fgid.sources import BAD_URL
from tests.corpus import jpeg_bytes
from tests.photos import astronaut, grace_hopper

# path on the server -> (caption, identity, the reason its row must have or "ok")
ROWS = {
    "photos/astronaut.jpg": ("an astronaut", "eileen", "ok"),
    "redirect/hopper.jpg": ("an admiral", "grace", "ok"),
    "missing.jpg": ("gone", None, "http_404"),
    "slow/astronaut.jpg": ("too slow", None, "timeout"),
    "html/page.jpg": ("a web page", None, "not_an_image"),
    "huge/blob.jpg": ("too big", None, "file_too_large"),
    f"optout/{quote('noai', safe='')}/astronaut.jpg": ("opted out", "eileen", "opted_out"),
    "status/503": ("server down", None, "http_503"),
}


@pytest.fixture(scope="module")
def server():
    photos = {"astronaut.jpg": jpeg_bytes(astronaut()), "hopper.jpg": grace_hopper().read_bytes()}
    with serving(photos, slow_seconds=3.0) as running:
        yield running


@pytest.fixture(scope="module")
def config(lite_config):
    return lite_config.model_copy(
        update={
            "shard_size": 4,
            "inputs": lite_config.inputs.model_copy(
                update={
                    "caption_column": "text",
                    "label_column": "person",
                    "license_column": "license",
                }  # fmt: skip
            ),
            "download": lite_config.download.model_copy(
                update={
                    "timeout": 0.5,
                    "retries": 1,
                    "backoff": 0.01,
                    "max_bytes": 4 << 20,
                    "private_addresses": True,  # the test server is on 127.0.0.1
                }
            ),
        }
    )


def table_rows(server) -> list[dict]:
    rows = [
        {"url": server.url(path), "text": caption, "person": person, "license": "cc-by-4.0"}
        for path, (caption, person, _) in ROWS.items()
    ]
    rows.append({"url": "file:///etc/hostname", "text": "not http", "person": None,
                 "license": None})  # fmt: skip
    rows.append({"url": None, "text": "no url at all", "person": None, "license": None})
    return rows


def write_table(rows: list[dict], path: Path) -> Path:
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow.csv as pcsv

        delimiter = "\t" if path.suffix == ".tsv" else ","
        pcsv.write_csv(table, path, pcsv.WriteOptions(delimiter=delimiter))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_table_format_plans_the_same_items(server, config, tmp_path, suffix):
    table = write_table(table_rows(server), tmp_path / f"urls{suffix}")
    items = [it for p in plan_shards([str(table)], 100, columns=config.inputs) for it in p.items]
    by_source = {it.source: it for it in items}
    assert len(items) == len(ROWS) + 1  # the empty URL names nothing
    astronaut_item = by_source[server.url("photos/astronaut.jpg")]
    assert (astronaut_item.caption, astronaut_item.label, astronaut_item.license) == (
        "an astronaut", "eileen", "cc-by-4.0"
    )  # fmt: skip
    assert astronaut_item.source_url == astronaut_item.source
    assert by_source[BAD_URL + "file:///etc/hostname"].caption == "not http"


def test_a_missing_column_or_a_url_with_credentials_is_refused_before_planning(
    server, config, tmp_path
):
    table = write_table(table_rows(server), tmp_path / "urls.csv")
    renamed = config.inputs.model_copy(update={"url_column": "URL"})
    with pytest.raises(InputError, match=r"no column 'URL' \(columns: url, text"):
        plan_shards([str(table)], 10, columns=renamed)
    secret = [{"url": "http://me:hunter2@127.0.0.1/a.jpg"}]
    with pytest.raises(InputError, match="row 1: .*credentials refused") as caught:
        plan_shards([str(write_table(secret, tmp_path / "secret.csv"))], 10)
    assert "hunter2" not in str(caught.value)


def test_a_url_table_builds_with_a_reason_for_every_row(server, config, lite_models, tmp_path):
    table = write_table(table_rows(server), tmp_path / "urls.parquet")
    out = tmp_path / "ds"
    build([str(table)], str(out), config, lite_models)
    index = Dataset(str(out)).index().to_pylist()
    by_source = {row["source"]: row for row in index}
    for path, (caption, person, outcome) in ROWS.items():
        row = by_source[server.url(path)]
        got = row["status"] if outcome == "ok" else reason_code(row["reason"])
        assert got == outcome, (path, row["reason"])
        assert row["source_caption"] == caption and row["label"] == person
        assert row["source_license"] == "cc-by-4.0" and row["source_url"] == server.url(path)
    assert reason_code(by_source[BAD_URL + "file:///etc/hostname"]["reason"]) == "bad_url"
    assert all(reason_code(r["reason"]) in REASONS for r in index if r["reason"])
    # The kept samples' json carries what the table said.
    metas = [decode_meta(m["json"]) for _, m in Dataset(str(out)).first_samples(10)]
    assert {m["source_info"]["provenance"]["caption"] for m in metas} == {"an astronaut",
                                                                          "an admiral"}  # fmt: skip
    assert all(m["source_info"]["format"] == "JPEG" for m in metas)

    # A rerun downloads nothing: every shard is done.
    hits = sum(server.hits.values())
    build([str(table)], str(out), config, lite_models)
    assert sum(server.hits.values()) == hits
    # A fresh build of the same table writes the same bytes.
    again = tmp_path / "again"
    build([str(table)], str(again), config, lite_models)
    for tar in sorted((out / "shards").glob("*.tar")):
        assert tar.read_bytes() == (again / "shards" / tar.name).read_bytes()


def test_the_build_command_takes_the_column_options(server, tmp_path):
    from flows.cli import app
    from flows.cli_common import run_cli

    rows = [
        {"link": server.url("photos/astronaut.jpg"), "words": "an astronaut", "who": "eileen"},
        {"link": server.url("missing.jpg"), "words": "gone", "who": "nobody"},
    ]
    table = write_table(rows, tmp_path / "links.csv")
    out = tmp_path / "ds"
    args = ["build", str(table), "--out", str(out), "--models", "lite", "--no-prefect",
            "--url-column", "link", "--caption-column", "words", "--label-column", "who",
            "--set", "download.timeout=2", "--set", "download.private_addresses=true"]  # fmt: skip
    assert run_cli(app, args) == 0
    rows = {r["source"]: r for r in Dataset(str(out)).index().to_pylist()}
    kept = rows[server.url("photos/astronaut.jpg")]
    assert (kept["status"], kept["label"], kept["source_caption"]) == ("ok", "eileen",
                                                                      "an astronaut")  # fmt: skip
    assert reason_code(rows[server.url("missing.jpg")]["reason"]) == "http_404"
