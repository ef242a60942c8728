"""Dataset card: OUT/card/README.md (Hub front matter, samples, plots) and its build report."""

from __future__ import annotations

import storage
from fgid.card import build_report, grid, settings, text
from fgid.card.figures import data_uri
from fgid.card.plots import PLOTS, age_by_gender, render_plots
from fgid.dataset import Dataset

CARD_DIR = "card"
SAMPLES = "samples"  # OUT/card/samples.png

__all__ = ["CARD_DIR", "PLOTS", "SAMPLES", "card_markdown", "write_card"]


def _build_info(dataset: Dataset) -> dict:
    info = {}
    recorded = dataset.build_info()
    if recorded is not None:
        info["models"] = recorded["config"]["models"]["set"]
    return info


def card_markdown(
    summary: dict,
    joint: dict[str, dict[str, int]],
    images: dict[str, str],
    build: dict,
    card_settings: settings.CardSettings,
    models: dict[str, str],
) -> str:
    """The card without its front matter. `images` maps each plot stem and SAMPLES (when
    there is a sample grid) to its link: a file name or a data: URI."""
    parts = [
        f"# {card_settings.pretty_name}",
        text.summary_section(summary, joint, build, card_settings),
        text.samples_section(images.get(SAMPLES), card_settings),
        text.structure_section(),
        text.governance_sections(summary, card_settings, models),
        text.bias_section(summary, joint, images),
        text.removal_section(card_settings),
        text.citation_section(),
    ]
    return "\n\n".join(parts) + "\n"


def write_card(out_dir: str, summary: dict) -> dict:
    """Write OUT/card/: README.md, its PNGs, build_report.md; return their URLs and Markdown.

    `embedded_markdown` is the card and the build report with every image inlined as a data:
    URI, for viewers that cannot fetch files beside it (the Prefect UI renders those images);
    the sample grid is inlined as a small JPEG to keep it light.
    """
    dataset = Dataset(out_dir)
    folder = dataset.path(CARD_DIR)
    card_settings = settings.read_settings(dataset)
    joint = age_by_gender(dataset.root)
    build = _build_info(dataset)
    shards = list(dataset.all_stats().values())
    models = shards[0].get("models", {}) if shards else {}
    pngs = render_plots(summary, joint)
    pngs[build_report.PLOT] = build_report.plot_throughput(summary)
    faces = grid.sample_grid(dataset, card_settings.sample_faces)
    samples_url = storage.join(folder, f"{SAMPLES}.png")
    if faces is not None:
        pngs[SAMPLES] = faces
    else:
        storage.remove(samples_url)  # opted out since the last card: the faces must go too
    plots = {}
    for stem, data in pngs.items():
        plots[stem] = storage.join(folder, f"{stem}.png")
        storage.atomic_write_bytes(plots[stem], data)
    files = {stem: f"{stem}.png" for stem in pngs}
    report = build_report.report_markdown(summary, shards, files[build_report.PLOT])
    report_url = storage.join(folder, build_report.REPORT)
    storage.atomic_write_text(report_url, report)
    body = card_markdown(summary, joint, files, build, card_settings, models)
    markdown = settings.front_matter(summary, card_settings) + "\n" + body
    readme = storage.join(folder, "README.md")
    # Written last: a README.md present means its plots and report are too.
    storage.atomic_write_text(readme, markdown)
    inline = {stem: data_uri(data) for stem, data in pngs.items()}
    if faces is not None:
        inline[SAMPLES] = data_uri(grid.preview_jpeg(faces), "image/jpeg")
    embedded_report = build_report.report_markdown(summary, shards, inline[build_report.PLOT])
    return {
        "readme": readme,
        "build_report": report_url,
        "plots": plots,
        "markdown": markdown,
        "embedded_markdown": card_markdown(summary, joint, inline, build, card_settings, models)
        + "\n"
        + embedded_report,
    }
