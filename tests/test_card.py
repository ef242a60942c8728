"""The dataset card of a real lite build: README.md and PNG plots that agree with summary.json."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import storage
from fgid.card import PLOTS, write_card
from fgid.pipeline import build


@pytest.fixture(scope="module")
def carded(tmp_path_factory, demo_inputs, lite_config, lite_models):
    out = tmp_path_factory.mktemp("carded") / "celeb-card"
    build([str(demo_inputs)], out, lite_config, lite_models)
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, write_card(str(out), summary)


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with `header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_card_files_are_written_beside_the_shards(carded):
    out, _, card = carded
    folder = out / "card"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", *(f"{stem}.png" for stem in PLOTS)]
    )
    assert card["readme"] == str(folder / "README.md")
    assert card["plots"] == {stem: str(folder / f"{stem}.png") for stem in PLOTS}
    assert (folder / "README.md").read_text() == card["markdown"]


def test_plots_are_real_images_of_sensible_size(carded):
    out, _, _ = carded
    for stem in PLOTS:
        image = Image.open(out / "card" / f"{stem}.png")
        image.load()
        assert image.format == "PNG"
        assert 400 <= image.width <= 1600 and 250 <= image.height <= 1200, (stem, image.size)
        pixels = np.asarray(image.convert("RGB"))
        # Something is drawn: not a blank canvas, and there are coloured (non-grey) bars.
        assert pixels.std() > 10, stem
        colour = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
        assert (colour > 60).sum() > 200, stem


def test_markdown_links_every_plot_and_has_the_key_counts(carded):
    _, summary, card = carded
    markdown = card["markdown"]
    for stem, title in PLOTS.items():
        assert f"## {title}" in markdown
        assert f"]({stem}.png)" in markdown
    assert "`lite` model set" in markdown and summary["config_hash"] in markdown
    key = dict(table_rows(markdown, "metric"))
    assert key["inputs"] == str(summary["inputs"]["indexed"]) == "10"
    assert key["samples kept"] == str(summary["samples"])
    assert key["rejected"] == str(summary["rejected"])
    assert key["identities"] == str(summary["identities"]["total"])
    assert key["recognizable identities (2+ images)"] == str(summary["identities"]["recognizable"])
    assert key["exact duplicates flagged"] == str(summary["duplicates"]["exact"])
    for gender, n in summary["gender"].items():
        assert key[f"gender: {gender}"] == str(n)


def test_card_tables_match_summary_json(carded):
    _, summary, card = carded
    markdown = card["markdown"]
    # Age by gender: the per-gender columns add up to summary.json's marginals both ways.
    header = next(line for line in markdown.splitlines() if line.startswith("| years |"))
    genders = [c.strip() for c in header.strip("|").split("|")][1:-1]
    ages = table_rows(markdown, "years")
    assert [row[0] for row in ages] == list(summary["age"]["histogram"])
    for row in ages:
        *per_gender, total = (int(c) for c in row[1:])
        assert sum(per_gender) == total == summary["age"]["histogram"][row[0]]
    for i, gender in enumerate(genders):
        assert sum(int(row[1 + i]) for row in ages) == summary["gender"][gender]

    reasons = {row[0]: int(row[1]) for row in table_rows(markdown, "reason")}
    assert reasons == summary["rejection_reasons"] == {"no_face": 1, "not_an_image": 1}
    per_identity = {row[0]: int(row[1]) for row in table_rows(markdown, "images")}
    assert per_identity == summary["identities"]["images_per_identity"]
    regions = {row[0]: int(row[1].split()[0]) for row in table_rows(markdown, "region")}
    assert regions == summary["regions_present"]
    assert list(regions) == ["face", "eyes", "ears", "nose", "mouth"]
    stages = table_rows(markdown, "stage")
    assert [row[0] for row in stages] == [
        "decode",
        "detect",
        "align",
        "parse",
        "embed",
        "attributes",
        "caption",
    ]
    for name, images, _, rate in stages:
        assert int(images) == summary["stage_throughput"][name]["images"]
        assert float(rate) == summary["stage_throughput"][name]["images_per_s"]


def test_embedded_markdown_inlines_the_same_plots(carded):
    out, _, card = carded
    uris = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", card["embedded_markdown"])
    assert len(uris) == len(PLOTS)
    for stem, data in zip(PLOTS, uris, strict=True):
        assert base64.b64decode(data) == (out / "card" / f"{stem}.png").read_bytes()
    stripped = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "X", card["embedded_markdown"])
    assert stripped == re.sub(r"\]\([a-z_]+\.png\)", "](X)", card["markdown"])


def test_card_of_a_build_without_faces(tmp_path, demo_inputs, lite_config, lite_models):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(demo_inputs / "coffee (no face).png", photos)
    out = tmp_path / "no-faces"
    summary = build([str(photos)], out, lite_config, lite_models)
    card = write_card(str(out), summary)
    assert summary["samples"] == 0
    for stem in PLOTS:
        image = Image.open(io.BytesIO((out / "card" / f"{stem}.png").read_bytes()))
        assert image.size[0] >= 400
    assert "| no_face | 1 |" in card["markdown"]
    assert "| samples kept | 0 |" in card["markdown"]


@pytest.mark.slow  # starts a SeaweedFS server
def test_card_is_written_to_object_storage(tmp_path, carded):
    from s3_server import BUCKET, point_storage_at, running

    local, summary, card = carded
    with running(tmp_path / "s3") as server, pytest.MonkeyPatch.context() as mp:
        point_storage_at(server, mp)
        url = f"s3://{BUCKET}/{local.name}"
        # The card reads the build's indexes and build.json: the same build, now in the bucket.
        for path in sorted(local.rglob("*")):
            if path.is_file() and "card" not in path.relative_to(local).parts:
                rel = path.relative_to(local).parts
                storage.atomic_write_bytes(storage.join(url, *rel), path.read_bytes())
        remote = write_card(url, summary)
        assert remote["readme"] == f"{url}/card/README.md"
        assert storage.read_text(remote["readme"]) == card["markdown"]
        assert storage.list_files(f"{url}/card", "*.png") == sorted(remote["plots"].values())
        for stem, plot in remote["plots"].items():
            image = Image.open(io.BytesIO(storage.read_bytes(plot)))
            assert image.format == "PNG" and image.size == Image.open(card["plots"][stem]).size
