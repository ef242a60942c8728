"""Merge the GPU check's step records and benchmark figures into one JSON, against the targets."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.gpu_bench import TARGET_CAPTIONS, TARGET_CHAIN
from bench.train_bench import H100_TARGET_SAMPLES_PER_S, LOADER_WAIT_TARGET

FIGURES = ("build_and_caption", "training", "runtime")


def test_counts(xml: Path) -> dict | None:
    """Totals of pytest's JUnit report: tests, failures, errors, skipped."""
    if not xml.is_file():
        return None
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def targets(figures: dict) -> dict:
    """Each issue target with the measured value and whether it is met (None: not measured)."""
    build = figures.get("build_and_caption") or {}
    train = figures.get("training") or {}
    chain = (build.get("read_ahead") or {}).get("chain_images_per_s")
    captions = (build.get("captions") or {}).get("images_per_s")
    samples, wait = train.get("samples_per_s"), train.get("loader_wait_fraction")

    def target(value: float | None, goal: float, higher: bool = True) -> dict:
        met = None if value is None else (value >= goal if higher else value < goal)
        return {"value": value, "target": goal, "met": met}

    return {
        "chain_images_per_s": target(chain, TARGET_CHAIN),
        "caption_images_per_s": target(captions, TARGET_CAPTIONS),
        "train_samples_per_s": target(samples, H100_TARGET_SAMPLES_PER_S),
        "train_loader_wait_fraction": target(wait, LOADER_WAIT_TARGET, higher=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path, help="the check's work folder")
    parser.add_argument("out", type=Path, help="the JSON to write")
    parser.add_argument("--device", required=True)
    parser.add_argument("--dry-run", type=int, default=0)
    parser.add_argument("--seconds", type=int)
    args = parser.parse_args()
    steps_file = args.work / "steps.jsonl"
    lines = steps_file.read_text().splitlines() if steps_file.is_file() else []
    steps = [json.loads(line) for line in lines]
    report: dict = {
        "device": args.device,
        "dry_run": bool(args.dry_run),
        "seconds": args.seconds,
        "steps": {s.pop("step"): s for s in steps},
        "gpu_tests": test_counts(args.work / "tests.xml"),
    }
    for name in FIGURES:
        path = args.work / f"{name}.json"
        report[name] = json.loads(path.read_text()) if path.is_file() else None
    report["targets"] = targets(report)
    args.out.write_text(json.dumps(report, indent=2))
    failed = [name for name, s in report["steps"].items() if s["rc"] != 0]
    print(f"gpu check: {len(steps)} steps in {args.seconds}s, failed: {failed or 'none'}")
    print(json.dumps({"gpu_tests": report["gpu_tests"], "targets": report["targets"]}, indent=2))
    print(f"figures: {args.out}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
