"""OUT/card/build_report.md: how fast the build ran (stage timings, input wait, inputs/s)."""

from __future__ import annotations

from fgid.card.figures import barh, figure, no_data, png
from fgid.card.text import left_table
from fgid.report import in_pipeline_order, md_table
from fgid.schema import shard_name

REPORT = "build_report.md"
PLOT = "throughput"  # OUT/card/throughput.png
SLOWEST = 5  # shards listed by name in the report


def plot_throughput(summary: dict) -> bytes:
    fig, ax = figure("Stage throughput (images per second of stage time)")
    stages = summary["stage_throughput"]
    rates = {k: stages[k]["images_per_s"] for k in in_pipeline_order(stages)}
    rates = {k: v for k, v in rates.items() if v}
    if not rates:
        no_data(ax, "no stage timings")
        return png(fig)
    barh(ax, list(rates), list(rates.values()), fmt="%.1f")
    # Stages differ by orders of magnitude (a template caption vs a detector).
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log scale)")
    return png(fig)


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:.2f}" if seconds else "n/a"


def report_markdown(summary: dict, shards: list[dict], image: str) -> str:
    """The report; `image` is the throughput plot's link (a file name or a data: URI)."""
    stages = summary["stage_throughput"]
    stage_seconds = sum(s["seconds"] for s in stages.values()) or 1.0
    wall = sum(s.get("wall_seconds", 0.0) for s in shards)
    inputs = sum(s.get("inputs", 0) for s in shards)
    wait = summary.get("model_input_wait", {})
    fraction = wait.get("fraction")
    models = shards[0].get("models", {}) if shards else {}
    slowest = sorted(shards, key=lambda s: -s.get("wall_seconds", 0.0))[:SLOWEST]
    stage_rows = [
        f"| {k} | {stages[k]['images']} | {stages[k]['seconds']} | {stages[k]['images_per_s']} "
        f"| {stages[k]['seconds'] / stage_seconds:.0%} |"
        for k in in_pipeline_order(stages)
    ]
    parts = [
        "# Build report",
        "How fast the build ran; the dataset itself is described in the "
        "[dataset card](README.md). Times are summed over shards (shard-seconds): with "
        "several workers the build took less wall-clock time.",
        md_table(
            ("metric", "value"),
            [
                (
                    "shards done / planned",
                    f"{summary['shards']['done']} / {summary['shards']['planned']}",
                ),
                ("inputs in finished shards", inputs),
                ("shard-seconds", round(wall, 2)),
                ("inputs / s per worker", _rate(inputs, wall)),
                ("kept samples / s per worker", _rate(summary["samples"], wall)),
                ("model input wait (s)", wait.get("seconds", "n/a")),
                (
                    "model input wait (share of model time)",
                    "n/a" if fraction is None else f"{fraction:.1%}",
                ),
                ("tar bytes written", sum(s.get("tar_bytes", 0) for s in shards)),
            ],
        ),
        "The input wait is the time the model stages spent waiting for decoded images; on a "
        "GPU it is the share of time the GPU sat idle. A large share means decoding (or "
        "storage) is the bottleneck: raise `decode_workers` or `prefetch_batches`.",
        "## Stage timings",
        f"![Stage throughput]({image})",
        "\n".join(
            [
                "| stage | images | seconds | images/s | share of stage time |",
                "|---|---:|---:|---:|---:|",
                *stage_rows,
            ]
        ),  # fmt: skip
        "## Slowest shards",
        "\n".join(
            ["| shard | inputs | seconds | inputs/s |", "|---|---:|---:|---:|"]
            + [
                f"| {shard_name(s['shard'])} | {s.get('inputs', 0)} | {s.get('wall_seconds', 0)} "
                f"| {_rate(s.get('inputs', 0), s.get('wall_seconds', 0))} |"
                for s in slowest
            ]
        ),
        "## Models",
        left_table(("role", "model"), sorted(models.items())) if models else "No shard finished.",
    ]
    return "\n\n".join(parts) + "\n"
