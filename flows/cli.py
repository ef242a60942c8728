"""The `fgid` command: build a dataset, inspect one, write demo photos."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Build FGID-style fine-grained face datasets (webdataset shards + Parquet index).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    import yaml

    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(
                f"expected section.field=value, got {pair!r}", param_hint="--set"
            )
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@app.command()
def build(
    inputs: Annotated[
        list[str], typer.Argument(help="Image folders, image files, or .txt lists of paths.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (created; rerun to resume).")
    ],
    models: Annotated[
        str | None,
        typer.Option(
            help="Model set: 'full' (InsightFace, BiSeNet, LLaVA; the default) "
            "or 'lite' (CPU, offline)."
        ),
    ] = None,
    shard_size: Annotated[int | None, typer.Option(help="Inputs per shard; default 1000.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per model call; default 16.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Shards built at once; default 1.")] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Identity labels, '<file name> <identity>' lines (CelebA format)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML config; flags and --set override it.")
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="Override any setting: --set detect.min_face_size=64")
    ] = [],  # noqa: B006 - typer needs a list default
    prefect: Annotated[
        bool, typer.Option(help="Run as a Prefect flow (a temporary local server if none is set).")
    ] = True,
) -> None:
    """Build an FGID dataset: decode, detect, align, parse, embed, caption, group, write shards."""
    from fgid.config import BuildConfig

    cfg = BuildConfig.from_yaml(config) if config else BuildConfig()
    overrides = _parse_overrides(set_)
    flags = {
        "models.set": models,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "workers": workers,
        "labels": str(labels) if labels else None,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg = cfg.with_overrides(**overrides)
    summary = _run_build(inputs, out, cfg, prefect)
    _print_summary(summary, out)
    if not summary["complete"]:
        raise typer.Exit(1)


def _run_build(inputs: list[str], out: Path, cfg, use_prefect: bool) -> dict:
    from fgid import progress
    from fgid.inputs import collect_sources

    total = len(collect_sources(inputs))
    console.print(
        f"[bold]fgid build[/]: {total} inputs -> {escape(str(out))} (models: {cfg.models.set})"
    )
    bar = Progress(
        TextColumn("shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("inputs"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    task = bar.add_task("build", total=total)
    unsubscribe = progress.subscribe(lambda stats: bar.advance(task, stats["inputs"]))
    try:
        with bar:
            if use_prefect:
                from prefect.task_runners import ThreadPoolTaskRunner

                from flows.build import build as build_flow

                runner = ThreadPoolTaskRunner(max_workers=cfg.workers)
                return build_flow.with_options(task_runner=runner)(
                    inputs=[str(i) for i in inputs], out=str(out), config=cfg
                )
            from fgid.pipeline import build as build_plain

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
            return build_plain(inputs, out, cfg)
    finally:
        unsubscribe()


def _print_summary(summary: dict, out: Path) -> None:
    from fgid.report import summary_table

    table = Table(title=f"FGID dataset {out}", show_header=False)
    for row in summary_table(summary):
        table.add_row(row["metric"], row["value"])
    Console().print(table)
    reasons = summary["rejection_reasons"]
    if reasons:
        Console().print("rejections: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))


@app.command()
def inspect(
    dataset: Annotated[str, typer.Argument(help="A folder or URL written by 'fgid build'.")],
    samples: Annotated[int, typer.Option(help="Show this many samples with their captions.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json as is.")] = False,
) -> None:
    """Summarize a built dataset: counts, identities, rejections, age and gender, samples."""
    import storage

    summary_path = storage.join(dataset, "summary.json")
    if not storage.exists(summary_path):
        console.print(
            f"[red]{escape(str(dataset))} has no summary.json: not a finished fgid build[/]"
        )
        raise typer.Exit(2)
    summary = json.loads(storage.read_text(summary_path))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.markdown import Markdown

    from fgid.report import summary_markdown

    out = Console()
    out.print(Markdown(summary_markdown(summary, str(dataset))))
    if samples:
        _print_samples(dataset, samples, out)


def _print_samples(dataset: str, count: int, out: Console) -> None:
    import webdataset as wds

    import storage

    shards = storage.list_files(storage.join(dataset, "shards"), "[0-9]*.tar")
    if not shards:
        return
    reader = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    for sample in reader.slice(count):
        meta = json.loads(sample["json"])
        # Captions and file names are data: escape them so brackets are not read as markup.
        out.print(
            f"[bold]{sample['__key__']}[/] {escape(os.path.basename(meta['source']))}: "
            f"{meta['gender']}, age {meta['age']}, regions {meta['regions']['present']}"
        )
        out.print(f"  caption: {escape(sample['caption.txt'].decode())}")
        out.print(f"  facial:  {escape(sample['facial.txt'].decode())}")


@app.command("samples")
def samples_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder to write the demo photos into.")],
) -> None:
    """Write demo photos from installed packages: real faces, a no-face image, a bad file."""
    from fgid.samples import write_samples

    files = write_samples(folder)
    console.print(f"wrote {len(files)} files to {folder}")


if __name__ == "__main__":
    app()
