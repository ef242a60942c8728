"""Human-readable views of a build summary: Markdown for artifacts, rows for tables."""

from __future__ import annotations


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


def _md_table(header: tuple[str, str], items: list[tuple[object, object]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in items]
    return "\n".join(lines)


def summary_markdown(summary: dict, out_dir: str) -> str:
    parts = [
        f"# FGID build: `{out_dir}`",
        "" if summary["complete"] else "**Incomplete: some shards are not done; rerun to resume.**",
        _md_table(("metric", "value"), [(r["metric"], r["value"]) for r in summary_table(summary)]),
        "## Rejection reasons",
        _md_table(
            ("reason", "inputs"), list(summary["rejection_reasons"].items()) or [("none", 0)]
        ),
        "## Age (estimated)",
        _md_table(("years", "samples"), list(summary["age"]["histogram"].items())),
        "## Gender (estimated)",
        _md_table(("gender", "samples"), list(summary["gender"].items())),
        "## Facial regions present",
        _md_table(("region", "samples"), list(summary["regions_present"].items())),
        "## Images per identity",
        _md_table(
            ("images", "identities"), list(summary["identities"]["images_per_identity"].items())
        ),
        "## Stage throughput",
        _md_table(
            ("stage", "images/s"),
            [(k, v["images_per_s"]) for k, v in summary["stage_throughput"].items()],
        ),
    ]
    return "\n\n".join(p for p in parts if p)
