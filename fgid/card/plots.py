"""The card's plots of summary.json: age by gender, images per identity, rejections, regions."""

from __future__ import annotations

import pyarrow.compute as pc
from matplotlib.ticker import FuncFormatter, NullFormatter

from fgid.card.figures import BAR, barh, figure, no_data, png
from fgid.finalize import age_histogram, read_index
from fgid.schema import REGIONS, STATUS_OK

# File stem -> section title, in card order.
PLOTS = {
    "age_gender": "Age and gender (estimated)",
    "images_per_identity": "Images per identity",
    "rejection_reasons": "Rejection reasons",
    "regions": "Facial regions present",
}
GENDER_COLORS = {"female": "#c44e52", "male": "#4c72b0", "unknown": "#9e9e9e"}


def age_by_gender(out_dir: str) -> dict[str, dict[str, int]]:
    """Age histogram per gender over kept samples (summary.json holds only the marginals)."""
    index = read_index(out_dir, ["status", "age", "gender"])
    index = index.filter(pc.equal(index["status"], STATUS_OK))
    ages: dict[str, list[float]] = {}
    for age, gender in zip(index["age"].to_pylist(), index["gender"].to_pylist(), strict=True):
        if age is not None:
            ages.setdefault(gender or "unknown", []).append(age)
    return {gender: age_histogram(values) for gender, values in sorted(ages.items())}


def plot_age_gender(summary: dict, joint: dict[str, dict[str, int]]) -> bytes:
    """Stacked bars per age bin, one colour per gender, as in the paper's Figure 4."""
    age = summary["age"]
    mean = f", mean {age['mean']:.1f} y" if age["mean"] is not None else ""
    fig, ax = figure(f"Age and gender of kept samples (n = {summary['samples']}{mean})")
    bins = list(age["histogram"])
    if not joint:
        no_data(ax, "no samples with an age estimate")
        return png(fig)
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
    return png(fig)


def _bin_uppers(largest: int) -> list[int]:
    """Upper edges 1, 2, 3, 4, 5, then 10, 20, 50, 100, ...: O(log) bins however long the tail."""
    uppers, scale = [1, 2, 3, 4, 5], 10
    while uppers[-1] < largest:
        uppers += [m * scale for m in (1, 2, 5) if m * scale > uppers[-1]]
        scale *= 10
    return uppers[: next(i for i, u in enumerate(uppers) if u >= largest) + 1]


def identity_size_bins(images_per_identity: dict[str, int]) -> dict[str, int]:
    """Identities per images-per-identity bin ("1", ..., "6-10", "11-20", ...), empty bins kept."""
    sizes = {int(k): v for k, v in images_per_identity.items()}
    if not sizes:
        return {}
    bins, lower = {}, 1
    for upper in _bin_uppers(max(sizes)):
        label = str(upper) if upper == lower else f"{lower}-{upper}"
        bins[label] = sum(n for k, n in sizes.items() if lower <= k <= upper)
        lower = upper + 1
    return bins


def identity_stats(images_per_identity: dict[str, int]) -> dict[str, float | int | None]:
    sizes = sorted((int(k), v) for k, v in images_per_identity.items())
    total = sum(v for _, v in sizes)
    if not total:
        return {"mean": None, "median": None, "max": None}
    half, seen, median = (total + 1) // 2, 0, sizes[0][0]
    for k, v in sizes:
        seen += v
        if seen >= half:
            median = k
            break
    return {
        "mean": round(sum(k * v for k, v in sizes) / total, 2),
        "median": median,
        "max": sizes[-1][0],
    }


def plot_images_per_identity(summary: dict) -> bytes:
    return png(images_per_identity_figure(summary))


def images_per_identity_figure(summary: dict):
    """A histogram of identity sizes on a log count axis: readable for 10 or 100,000 identities."""
    ids = summary["identities"]
    fig, ax = figure(
        f"Images per identity ({ids['total']:,} identities, {ids['recognizable']:,} with 2+)"
    )
    bins = identity_size_bins(ids["images_per_identity"])
    if not bins:
        no_data(ax, "no identities")
        return fig
    bars = ax.bar(list(bins), list(bins.values()), color=BAR, width=0.8)
    ax.bar_label(bars, labels=[f"{v:,}" if v else "" for v in bins.values()], fontsize=8)
    ax.set_xlabel("distinct images per identity (duplicates excluded; bins widen to the right)")
    # Many singletons and a long tail: only a log axis shows both.
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(bins.values()) * 3)
    # Plain counts (1, 10, 1,000), not 10^3, and no labelled minor ticks crowding the axis.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("identities (log scale)")
    if len(bins) > 8:
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    return fig


def plot_rejection_reasons(summary: dict) -> bytes:
    reasons = summary["rejection_reasons"]
    total = summary["inputs"]["indexed"]
    fig, ax = figure(f"Rejection reasons ({summary['rejected']:,} of {total:,} inputs)")
    if not reasons:
        no_data(ax, "no input was rejected")
        return png(fig)
    ordered = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    barh(ax, [k for k, _ in ordered], [v for _, v in ordered])
    ax.set_xlabel("inputs")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return png(fig)


def regions_present(summary: dict) -> dict[str, int]:
    # ConsistentID's region order; summary.json stores them sorted by name.
    present = summary["regions_present"]
    return {k: present[k] for k in [*REGIONS, *sorted(set(present) - set(REGIONS))] if k in present}


def plot_regions(summary: dict) -> bytes:
    samples = summary["samples"]
    fig, ax = figure(f"Facial regions present (of {samples:,} kept samples)")
    regions = regions_present(summary)
    if not samples:
        no_data(ax, "no kept samples")
        return png(fig)
    bars = ax.bar(list(regions), list(regions.values()), color=BAR)
    ax.bar_label(bars, labels=[f"{v:,} ({v / samples:.0%})" for v in regions.values()], fontsize=8)
    ax.set_ylim(0, samples * 1.15)
    ax.set_ylabel("samples")
    return png(fig)


def render_plots(summary: dict, joint: dict[str, dict[str, int]]) -> dict[str, bytes]:
    """PNG bytes per plot stem, in PLOTS order."""
    return {
        "age_gender": plot_age_gender(summary, joint),
        "images_per_identity": plot_images_per_identity(summary),
        "rejection_reasons": plot_rejection_reasons(summary),
        "regions": plot_regions(summary),
    }
