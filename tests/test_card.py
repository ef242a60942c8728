"""The dataset card of a real lite build: Hub front matter, sample grid, sections, plots and the
build report, all agreeing with summary.json and the shards."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

import storage
from fgid.card import PLOTS, SAMPLES, write_card
from fgid.card.build_report import PLOT as THROUGHPUT
from fgid.card.grid import pick_samples, read_tiles
from fgid.dataset import Dataset
from fgid.pipeline import build
from fgid.schema import CAPTION

FIGURES = [*PLOTS, THROUGHPUT]
SECTIONS = [
    "Dataset summary",
    "Sample faces",
    "Structure",
    "Sources",
    "Consent",
    "Licences",
    "Personal and sensitive information",
    "Bias and limitations",
    "How to request removal",
    "Citation",
]


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


def front_matter(markdown: str) -> dict:
    assert markdown.startswith("---\n")
    return yaml.safe_load(markdown.split("---\n", 2)[1])


def test_card_files_are_written_beside_the_shards(carded):
    out, _, card = carded
    folder = out / "card"
    pngs = [f"{stem}.png" for stem in [*FIGURES, SAMPLES]]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "build_report.md", *pngs]
    )
    assert card["readme"] == str(folder / "README.md")
    assert card["build_report"] == str(folder / "build_report.md")
    assert card["plots"] == {s: str(folder / f"{s}.png") for s in [*FIGURES, SAMPLES]}
    assert (folder / "README.md").read_text() == card["markdown"]


def test_front_matter_is_a_hub_dataset_card(carded):
    _, summary, card = carded
    meta = front_matter(card["markdown"])
    assert meta["license"] == "other"
    assert meta["size_categories"] == ["n<1K"] and summary["samples"] == 8
    assert {"text-to-image", "image-to-text"} <= set(meta["task_categories"])
    assert {"faces", "face-parsing", "identity", "fgid", "webdataset"} <= set(meta["tags"])
    assert meta["pretty_name"] == "FGID face dataset"
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}
    ]
    hub = pytest.importorskip("huggingface_hub")
    parsed = hub.DatasetCard(card["markdown"]).data.to_dict()
    assert parsed["license"] == "other" and parsed["size_categories"] == ["n<1K"]
    assert parsed["configs"] == meta["configs"]


def test_card_has_the_sections_a_face_dataset_needs(carded):
    _, _, card = carded
    markdown = card["markdown"]
    headings = re.findall(r"^## (.+)$", markdown, re.M)
    assert headings == SECTIONS
    # What the publisher must fill in is marked, not invented.
    for what in ["where the photos came from", "how the people shown agreed", "licence of every"]:
        assert what in markdown
    assert "biometric data" in markdown and "GDPR" in markdown and "BIPA" in markdown
    assert "fgid remove DATASET --sources" in markdown and "--identity" in markdown
    assert "`<contact: set contact in card.yaml>`" in markdown
    assert "arXiv:2404.16771" in markdown and "arXiv:2504.14202" in markdown
    assert "Portrait Generation with Multimodal Fine-Grained Identity Preserving" in markdown
    assert "](build_report.md)" in markdown
    assert "Stage throughput" not in markdown  # moved to the build report


def test_plots_are_real_images_of_sensible_size(carded):
    out, _, _ = carded
    for stem in FIGURES:
        image = Image.open(out / "card" / f"{stem}.png")
        image.load()
        assert image.format == "PNG"
        assert 400 <= image.width <= 1600 and 250 <= image.height <= 1200, (stem, image.size)
        pixels = np.asarray(image.convert("RGB"))
        # Something is drawn: not a blank canvas, and there are coloured (non-grey) bars.
        assert pixels.std() > 10, stem
        colour = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
        assert (colour > 60).sum() > 200, stem


def test_sample_grid_shows_one_face_per_identity_first(carded):
    out, summary, _ = carded
    dataset = Dataset(str(out))
    identities = dataset.identities().to_pylist()
    picks = pick_samples(dataset, 12)
    distinct = [r for r in identities if not r["duplicate_of"] and not r["near_duplicate_of"]]
    assert len(picks) == len(distinct) == 6  # 8 kept, an exact and a near duplicate left out
    by_key = {r["key"]: r["identity"] for r in identities}
    first = [by_key[k] for _, k in picks[: summary["identities"]["total"]]]
    assert len(set(first)) == summary["identities"]["total"]  # every identity before repeats
    assert pick_samples(dataset, 12) == picks and pick_samples(dataset, 3) == picks[:3]
    tiles = read_tiles(dataset, picks)
    assert [t.key for t in tiles] == [k for _, k in picks]
    captions = {key: m[CAPTION].decode() for s in range(3) for key, m in dataset.samples(s)}
    for tile in tiles:
        assert tile.caption == captions[tile.key].strip()
        assert tile.image.shape == (*tile.label_map.shape, 3)
    grid = Image.open(out / "card" / f"{SAMPLES}.png")
    assert grid.format == "PNG" and 800 <= grid.width <= 1600 and 400 <= grid.height <= 1400
    # The overlay half of the first tile differs from the face half where the face is.
    pixels = np.asarray(grid.convert("RGB")).astype(int)
    face, parsed = pixels[12 : 12 + 160, 12 : 12 + 160], pixels[12 : 12 + 160, 172 : 172 + 160]
    assert np.abs(face - parsed).mean() > 10


def test_key_numbers_match_summary_json(carded):
    _, summary, card = carded
    markdown = card["markdown"]
    assert "`lite` model set" in markdown and summary["config_hash"] in markdown
    key = dict(table_rows(markdown, "metric"))
    assert key["inputs"] == str(summary["inputs"]["indexed"]) == "10"
    assert key["samples kept"] == str(summary["samples"])
    assert key["rejected"] == str(summary["rejected"])
    assert key["identities"] == str(summary["identities"]["total"])
    assert key["recognizable identities (2+ images)"] == str(summary["identities"]["recognizable"])
    assert key["exact duplicates flagged"] == str(summary["duplicates"]["exact"])
    assert key["images per identity: mean / median / max"] == "1.5 / 1 / 2"
    for gender, n in summary["gender"].items():
        assert key[f"gender: {gender}"] == str(n)


def test_card_tables_match_summary_json(carded):
    _, summary, card = carded
    markdown = card["markdown"]
    for stem, title in PLOTS.items():
        assert f"### {title}\n\n![{title}]({stem}.png)" in markdown
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


def test_build_report_has_stage_timings_input_wait_and_rates(carded):
    out, summary, _ = carded
    report = (out / "card" / "build_report.md").read_text()
    assert f"![Stage throughput]({THROUGHPUT}.png)" in report and "](README.md)" in report
    stages = table_rows(report, "stage")
    assert [row[0] for row in stages] == [
        "decode",
        "detect",
        "align",
        "parse",
        "embed",
        "attributes",
        "caption",
    ]
    for name, images, _, rate, share in stages:
        assert int(images) == summary["stage_throughput"][name]["images"]
        assert float(rate) == summary["stage_throughput"][name]["images_per_s"]
        assert share.endswith("%")
    key = dict(table_rows(report, "metric"))
    assert key["inputs in finished shards"] == "10"
    assert key["model input wait (s)"] == str(summary["model_input_wait"]["seconds"])
    wall = sum(Dataset(str(out)).read_stats(s)["wall_seconds"] for s in range(3))
    assert float(key["inputs / s per worker"]) == pytest.approx(10 / wall, rel=0.01)
    slowest = table_rows(report, "shard")
    assert sorted(row[0] for row in slowest) == ["00000", "00001", "00002"]
    assert [float(row[2]) for row in slowest] == sorted(
        (float(r[2]) for r in slowest), reverse=True
    )
    assert dict(table_rows(report, "role"))["detector"].startswith("dlib")


def test_embedded_markdown_inlines_the_images_and_stays_small(carded):
    out, _, card = carded
    embedded = card["embedded_markdown"]
    assert not embedded.startswith("---")  # no YAML header in a Prefect artifact
    uris = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", embedded)
    assert len(uris) == len(FIGURES)
    for stem, data in zip(FIGURES, uris, strict=True):
        assert base64.b64decode(data) == (out / "card" / f"{stem}.png").read_bytes()
    jpeg = re.findall(r"\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", embedded)
    assert len(jpeg) == 1
    preview = Image.open(io.BytesIO(base64.b64decode(jpeg[0])))
    assert preview.format == "JPEG" and preview.width <= 640
    assert len(embedded) < 400_000


def test_card_yaml_sets_licence_contact_and_can_leave_faces_out(carded, tmp_path):
    source, summary, _ = carded
    out = tmp_path / "published"
    shutil.copytree(source, out)
    assert (out / "card" / f"{SAMPLES}.png").exists()
    (out / "card.yaml").write_text(
        "license: cc-by-4.0\npretty_name: My faces\ncontact: takedown@example.org\n"
        "sources: Photos of volunteers.\nsample_faces: 0\n"
    )
    card = write_card(str(out), summary)
    meta = front_matter(card["markdown"])
    assert (meta["license"], meta["pretty_name"]) == ("cc-by-4.0", "My faces")
    assert "contact takedown@example.org" in card["markdown"]
    assert "Photos of volunteers." in card["markdown"]
    assert "**To be filled in by the publisher**: the licence" not in card["markdown"]
    assert not (out / "card" / f"{SAMPLES}.png").exists()  # the earlier card's faces are gone
    assert "data:image/jpeg" not in card["embedded_markdown"]
    assert "sample_faces: 0" in card["markdown"]


def test_card_of_a_build_without_faces(tmp_path, demo_inputs, lite_config, lite_models):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(demo_inputs / "coffee (no face).png", photos)
    out = tmp_path / "no-faces"
    summary = build([str(photos)], out, lite_config, lite_models)
    card = write_card(str(out), summary)
    assert summary["samples"] == 0
    for stem in FIGURES:
        image = Image.open(io.BytesIO((out / "card" / f"{stem}.png").read_bytes()))
        assert image.size[0] >= 400
    assert not (out / "card" / f"{SAMPLES}.png").exists()
    assert "no kept samples" in card["markdown"]
    assert "| no_face | 1 |" in card["markdown"]
    assert "| samples kept | 0 |" in card["markdown"]
    assert front_matter(card["markdown"])["size_categories"] == ["n<1K"]


@pytest.mark.slow  # starts a SeaweedFS server
def test_card_is_written_to_object_storage(tmp_path, carded):
    from s3_server import BUCKET, point_storage_at, running

    local, summary, card = carded
    with running(tmp_path / "s3") as server, pytest.MonkeyPatch.context() as mp:
        point_storage_at(server, mp)
        url = f"s3://{BUCKET}/{local.name}"
        # The card reads the build's indexes, shards and build.json: the same build, now remote.
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
