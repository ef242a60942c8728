"""Dataset card: OUT/card/README.md and its PNG plots, written beside the shards."""

from __future__ import annotations

import base64
import io
import json

# Figure without pyplot: no global backend state, safe in a worker thread (the finalize task).
from matplotlib.figure import Figure

import storage
from fgid.finalize import age_histogram, read_index
from fgid.report import in_pipeline_order, md_table, summary_table
from fgid.schema import REASONS, REGIONS, STATUS_OK

CARD_DIR = "card"
# File stem -> section title, in card order.
PLOTS = {
    "age_gender": "Age and gender (estimated)",
    "images_per_identity": "Images per identity",
    "rejection_reasons": "Rejection reasons",
    "regions": "Facial regions present",
    "throughput": "Stage throughput",
}
GENDER_COLORS = {"female": "#c44e52", "male": "#4c72b0", "unknown": "#9e9e9e"}
BAR = "#4c72b0"
FIGSIZE, DPI = (6.4, 3.6), 100  # 640 x 360 px


def age_by_gender(out_dir: str) -> dict[str, dict[str, int]]:
    """Age histogram per gender over kept samples (summary.json holds only the marginals)."""
    ages: dict[str, list[float]] = {}
    for row in read_index(out_dir).select(["status", "age", "gender"]).to_pylist():
        if row["status"] == STATUS_OK and row["age"] is not None:
            ages.setdefault(row["gender"] or "unknown", []).append(row["age"])
    return {gender: age_histogram(values) for gender, values in sorted(ages.items())}


def _figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_axis_off()


def plot_age_gender(summary: dict, joint: dict[str, dict[str, int]]) -> bytes:
    """Stacked bars per age bin, one colour per gender, as in the paper's Figure 4."""
    age = summary["age"]
    mean = f", mean {age['mean']:.1f} y" if age["mean"] is not None else ""
    fig, ax = _figure(f"Age and gender of kept samples (n = {summary['samples']}{mean})")
    bins = list(age["histogram"])
    if not joint:
        _no_data(ax, "no samples with an age estimate")
        return _png(fig)
    bottom = [0] * len(bins)
    for gender, hist in joint.items():
        counts = [hist[b] for b in bins]
        color = GENDER_COLORS.get(gender, "#55a868")
        ax.bar(bins, counts, bottom=bottom, label=f"{gender} ({sum(counts)})", color=color)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_xlabel("estimated age (years)")
    ax.set_ylabel("samples")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False)
    return _png(fig)


def plot_images_per_identity(summary: dict) -> bytes:
    ids = summary["identities"]
    fig, ax = _figure(
        f"Images per identity ({ids['total']} identities, {ids['recognizable']} with 2+)"
    )
    sizes = {int(k): v for k, v in ids["images_per_identity"].items()}
    if not sizes:
        _no_data(ax, "no identities")
        return _png(fig)
    bars = ax.bar(list(sizes), list(sizes.values()), color=BAR, width=0.8)
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("distinct images per identity (duplicates excluded)")
    ax.set_ylabel("identities")
    # Integer ticks only: a fraction of an image means nothing.
    ax.xaxis.get_major_locator().set_params(integer=True)
    if max(sizes.values()) > 50 * min(sizes.values()):
        # Real datasets have many singletons and a long tail; a linear axis hides the tail.
        ax.set_yscale("log")
        ax.set_ylabel("identities (log scale)")
    else:
        ax.yaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def _barh(ax, labels: list[str], values: list[float], fmt: str = "%g") -> None:
    bars = ax.barh(labels, values, color=BAR)
    ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
    ax.invert_yaxis()  # first label on top, as in the tables


def plot_rejection_reasons(summary: dict) -> bytes:
    reasons = summary["rejection_reasons"]
    total = summary["inputs"]["indexed"]
    fig, ax = _figure(f"Rejection reasons ({summary['rejected']} of {total} inputs)")
    if not reasons:
        _no_data(ax, "no input was rejected")
        return _png(fig)
    ordered = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    _barh(ax, [k for k, _ in ordered], [v for _, v in ordered])
    ax.set_xlabel("inputs")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def _regions(summary: dict) -> dict[str, int]:
    # ConsistentID's region order; summary.json stores them sorted by name.
    present = summary["regions_present"]
    return {k: present[k] for k in [*REGIONS, *sorted(set(present) - set(REGIONS))] if k in present}


def plot_regions(summary: dict) -> bytes:
    samples = summary["samples"]
    fig, ax = _figure(f"Facial regions present (of {samples} kept samples)")
    regions = _regions(summary)
    if not samples:
        _no_data(ax, "no kept samples")
        return _png(fig)
    bars = ax.bar(list(regions), list(regions.values()), color=BAR)
    ax.bar_label(bars, labels=[f"{v} ({v / samples:.0%})" for v in regions.values()], fontsize=8)
    ax.set_ylim(0, samples * 1.15)
    ax.set_ylabel("samples")
    return _png(fig)


def plot_throughput(summary: dict) -> bytes:
    fig, ax = _figure("Stage throughput (images per second of stage time)")
    stages = summary["stage_throughput"]
    rates = {k: stages[k]["images_per_s"] for k in in_pipeline_order(stages)}
    rates = {k: v for k, v in rates.items() if v}
    if not rates:
        _no_data(ax, "no stage timings")
        return _png(fig)
    _barh(ax, list(rates), list(rates.values()), fmt="%.1f")
    # Stages differ by orders of magnitude (a template caption vs a detector).
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log scale)")
    return _png(fig)


def render_plots(summary: dict, joint: dict[str, dict[str, int]]) -> dict[str, bytes]:
    """PNG bytes per plot stem, in PLOTS order."""
    return {
        "age_gender": plot_age_gender(summary, joint),
        "images_per_identity": plot_images_per_identity(summary),
        "rejection_reasons": plot_rejection_reasons(summary),
        "regions": plot_regions(summary),
        "throughput": plot_throughput(summary),
    }


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _section(stem: str, image: str, body: str) -> str:
    return f"## {PLOTS[stem]}\n\n![{PLOTS[stem]}]({image})\n\n{body}"


def card_markdown(
    summary: dict, joint: dict[str, dict[str, int]], images: dict[str, str], build: dict
) -> str:
    """The card; `images` maps each plot stem to its link (a file name or a data: URI)."""
    name, models = build.get("name", "dataset"), build.get("models", "?")
    age, ids = summary["age"], summary["identities"]
    genders = list(joint)
    key_rows = [(r["metric"], r["value"]) for r in summary_table(summary)]
    key_rows += [
        ("identities from source labels", ids["from_labels"]),
        ("mean / median age (estimated)", f"{age['mean']} / {age['median']}"),
        *((f"gender: {g}", n) for g, n in summary["gender"].items()),
        ("embedding dimension", summary["embedding_dim"]),
    ]
    age_rows = [
        (b, *(joint[g][b] for g in genders), n) for b, n in summary["age"]["histogram"].items()
    ]
    age_table = "\n".join(
        [
            "| years | " + " | ".join([*genders, "all"]) + " |",
            "|---|" + "---:|" * (len(genders) + 1),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in age_rows),
        ]
    )
    samples = summary["samples"] or 1
    throughput = summary["stage_throughput"]
    parts = [
        f"# Dataset card: `{name}`",
        ""
        if summary["complete"]
        else "**Incomplete: some shards are not done; rerun the build to resume.**",
        f"An FGID-style face dataset in webdataset shards, built with the `{models}` model set "
        f"(config hash `{summary['config_hash']}`). Age and gender are model estimates, "
        "not ground truth.",
        "## Key numbers",
        md_table(("metric", "value"), key_rows),
        _section("age_gender", images["age_gender"], age_table),
        _section(
            "images_per_identity",
            images["images_per_identity"],
            "An identity is recognizable when it has two or more distinct images.\n\n"
            + md_table(("images", "identities"), list(ids["images_per_identity"].items())),
        ),
        _section(
            "rejection_reasons",
            images["rejection_reasons"],
            "\n".join(
                ["| reason | inputs | meaning |", "|---|---:|---|"]
                + [
                    f"| {k} | {v} | {REASONS.get(k, '')} |"
                    for k, v in summary["rejection_reasons"].items()
                ]
            ),
        ),
        _section(
            "regions",
            images["regions"],
            md_table(
                ("region", "samples"),
                [(k, f"{v} ({v / samples:.0%})") for k, v in _regions(summary).items()],
            ),
        ),
        _section(
            "throughput",
            images["throughput"],
            "\n".join(
                ["| stage | images | seconds | images/s |", "|---|---:|---:|---:|"]
                + [
                    f"| {k} | {throughput[k]['images']} | {throughput[k]['seconds']} "
                    f"| {throughput[k]['images_per_s']} |"
                    for k in in_pipeline_order(throughput)
                ]
            ),
        ),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def _build_info(out_dir: str) -> dict:
    info = {"name": storage.name(out_dir)}
    path = storage.join(out_dir, "build.json")
    if storage.exists(path):
        info["models"] = json.loads(storage.read_text(path))["config"]["models"]["set"]
    return info


def write_card(out_dir: str, summary: dict) -> dict:
    """Write OUT/card/README.md and OUT/card/<plot>.png; return their URLs and the Markdown.

    `embedded_markdown` is the same card with the plots inlined as data: URIs, for viewers
    that cannot fetch files beside it (the Prefect UI renders those images).
    """
    out = str(out_dir)
    folder = storage.join(out, CARD_DIR)
    joint = age_by_gender(out)
    build = _build_info(out)
    pngs = render_plots(summary, joint)
    plots = {}
    for stem, data in pngs.items():
        plots[stem] = storage.join(folder, f"{stem}.png")
        storage.atomic_write_bytes(plots[stem], data)
    markdown = card_markdown(summary, joint, {s: f"{s}.png" for s in pngs}, build)
    readme = storage.join(folder, "README.md")
    # Written last: a README.md present means its plots are too.
    storage.atomic_write_text(readme, markdown)
    return {
        "readme": readme,
        "plots": plots,
        "markdown": markdown,
        "embedded_markdown": card_markdown(
            summary, joint, {s: data_uri(png) for s, png in pngs.items()}, build
        ),
    }
