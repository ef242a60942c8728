"""Human-readable views of a build summary: Markdown for artifacts, rows for tables."""

from __future__ import annotations

from fgid.stages import STAGES


def in_pipeline_order(names) -> list[str]:
    """Stage names in pipeline order; names this module does not know go last, sorted."""
    known = [n for n in STAGES if n in names]
    return known + sorted(set(names) - set(known))


def summary_table(summary: dict) -> list[dict]:
    ids = summary["identities"]
    rows = [
        ("inputs", summary["inputs"]["indexed"]),
        ("samples kept", summary["samples"]),
        ("rejected", summary["rejected"]),
        ("identities", ids["total"]),
        ("recognizable identities (2+ images)", ids["recognizable"]),
        ("images in recognizable identities", ids["images_in_recognizable"]),
        ("exact duplicates flagged", summary["duplicates"]["exact"]),
        ("near duplicates flagged", summary["duplicates"]["near"]),
        ("shards done / planned", f"{summary['shards']['done']} / {summary['shards']['planned']}"),
    ]
    return [{"metric": k, "value": str(v)} for k, v in rows]


def md_table(header: tuple[str, str], items: list[tuple[object, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in items]
    return "\n".join(lines)


def summary_markdown(summary: dict, out_dir: str) -> str:
    parts = [
        f"# FGID build: `{out_dir}`",
        "" if summary["complete"] else "**Incomplete: some shards are not done; rerun to resume.**",
        md_table(("metric", "value"), [(r["metric"], r["value"]) for r in summary_table(summary)]),
        "## Rejection reasons",
        md_table(("reason", "inputs"), list(summary["rejection_reasons"].items()) or [("none", 0)]),
        "## Age (estimated)",
        md_table(("years", "samples"), list(summary["age"]["histogram"].items())),
        "## Gender (estimated)",
        md_table(("gender", "samples"), list(summary["gender"].items())),
        "## Facial regions present",
        md_table(("region", "samples"), list(summary["regions_present"].items())),
        "## Images per identity",
        md_table(
            ("images", "identities"), list(summary["identities"]["images_per_identity"].items())
        ),
        "## Stage throughput",
        md_table(
            ("stage", "images/s"),
            [
                (k, summary["stage_throughput"][k]["images_per_s"])
                for k in in_pipeline_order(summary["stage_throughput"])
            ],
        ),
    ]
    return "\n\n".join(p for p in parts if p)
