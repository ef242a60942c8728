"""The `fgid train` and `fgid evaluate` commands: typed configs from YAML, --set and flags."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_common import (
    ConfigOpt,
    ModelsOpt,
    PrefectOpt,
    SetOpt,
    config_from,
    console,
    parse_overrides,
    prefect_session,
)


def _typed_config(model_cls, config: Path | None, set_: list[str], **flags):
    """YAML (if any), then --set overrides, then the explicit flags, validated as `model_cls`.

    Flags are given as dotted names, e.g. train.max_steps; a None flag was not given."""
    overrides = parse_overrides(set_)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return config_from(model_cls, config, overrides)


train_app = typer.Typer(help="Train a model on a built dataset.", no_args_is_help=True)

DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", help="A built dataset: folder or s3:// URL.")
]
OutputDirOpt = Annotated[
    str | None,
    typer.Option(help="Checkpoints, metrics.jsonl and final/ (train.output_dir); rerun resumes."),
]
BaseModelOpt = Annotated[
    str | None, typer.Option(help="Diffusers base model: hub name or local folder.")
]
MaxStepsOpt = Annotated[int | None, typer.Option(help="Optimiser steps (train.max_steps).")]
TrainBatchOpt = Annotated[int | None, typer.Option(help="Samples per batch (loader.batch_size).")]


def _train(kind: str, cfg, prefect: bool) -> None:
    from flows.storage_secret import load_storage_secret
    from storage.credentials import check_url

    load_storage_secret()
    try:
        check_url(cfg.dataset_url)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--dataset") from None
    # Before a server starts or a model loads: the dataset it needs and every weight, at once.
    from training import preflight

    {"consistentid": preflight.check_consistentid, "faceclip": preflight.check_faceclip}[kind](cfg)
    console.print(
        f"[bold]fgid train {kind}[/]: {escape(cfg.dataset_url)} -> "
        f"{escape(str(cfg.train.output_dir))}, {cfg.train.max_steps} steps"
    )
    if prefect:
        with prefect_session():
            import flows.train as train_flows

            flow = {"consistentid": train_flows.train_consistentid,
                    "faceclip": train_flows.train_faceclip}[kind]  # fmt: skip
            report = flow(config=cfg)
    else:
        from flows.train import run_training  # plain Python: no flow run is started

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        report = run_training(kind, cfg)
    table = Table(title=f"fgid train {kind}", show_header=False)
    for row in report["rows"]:
        table.add_row(row["metric"], str(row["value"]))
    Console().print(table)


@train_app.command("consistentid")
def train_consistentid_cmd(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    base_model: BaseModelOpt = None,
    max_steps: MaxStepsOpt = None,
    batch_size: TrainBatchOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
    prefect: PrefectOpt = True,
) -> None:
    """Train ConsistentID (SD 1.5 or SDXL: --set variant=sdxl, or an SDXL base or released file;
    frozen UNet) on a built dataset; rerun to resume."""
    from training.consistentid.train import ConsistentIDTrainConfig, resolve_variant

    cfg = _typed_config(ConsistentIDTrainConfig, config, set_, dataset_url=dataset,
                        base_model=base_model, **{"train.output_dir": output_dir,
                        "train.max_steps": max_steps, "loader.batch_size": batch_size})  # fmt: skip
    # Decided here, where the settings given are still known from the defaults.
    _train("consistentid", resolve_variant(cfg), prefect)


@train_app.command("faceclip")
def train_faceclip_cmd(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    output_dir: OutputDirOpt = None,
    base_model: BaseModelOpt = None,
    max_steps: MaxStepsOpt = None,
    batch_size: TrainBatchOpt = None,
    stage: Annotated[
        str | None,
        typer.Option(help="'align' (encoder pre-training) or 'sdxl' (UNet fine-tune)."),
    ] = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
    prefect: PrefectOpt = True,
) -> None:
    """Train FaceCLIP: encoder pre-training ('align') or the SDXL fine-tune ('sdxl')."""
    from training.faceclip.train import FaceCLIPTrainConfig

    cfg = _typed_config(FaceCLIPTrainConfig, config, set_, dataset_url=dataset,
                        base_model=base_model, stage=stage, **{"train.output_dir": output_dir,
                        "train.max_steps": max_steps, "loader.batch_size": batch_size})  # fmt: skip
    _train("faceclip", cfg, prefect)


def evaluate_cmd(
    dataset: Annotated[str, typer.Argument(help="A built dataset: its identities are references.")],
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="Folder or s3:// URL for images and tables (resumes)."),
    ],
    generator: Annotated[
        str | None, typer.Option(help="'text-only' (default), 'consistentid' or 'faceclip'.")
    ] = None,
    base_model: BaseModelOpt = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Trained weights: an exported or checkpoint folder, or a release "
            "(ConsistentID-v1.bin; FaceCLIP's model/ folder or face_clip_encoder.pt)."
        ),
    ] = None,
    identities: Annotated[
        int | None, typer.Option(help="Evaluate this many identities; default all.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompt file (category<TAB>prompt); default the paper's 45.")
    ] = None,
    category: Annotated[
        list[str], typer.Option("--category", help="Only this prompt category (repeatable).")
    ] = [],  # noqa: B006 - typer needs a list default
    per_category: Annotated[
        int | None, typer.Option(help="Only the first N prompts of each category.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Generation seed; default 0.")] = None,
    models: ModelsOpt = None,
    clip: Annotated[
        str | None, typer.Option(help="CLIP for CLIP-T/CLIP-I: hub name or folder.")
    ] = None,
    dino: Annotated[
        str | None, typer.Option(help="DINO ViT for DINO/FGIS: hub name or folder.")
    ] = None,
    fid: Annotated[
        str | None, typer.Option(help="FID features: 'inception' (default), 'dino' or 'none'.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
    prefect: PrefectOpt = True,
) -> None:
    """Generate each identity once per evaluation prompt and score CLIP-T, CLIP-I, DINO, FaceSim,
    FGIS, FID and seconds per image; tables go to OUT as Parquet."""
    from flows.storage_secret import load_storage_secret
    from storage.credentials import check_url
    from training.evaluation.config import EvaluateConfig

    load_storage_secret()
    try:
        for url in (dataset, out):
            check_url(url)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="DATASET / --out") from None
    flags = {
        "dataset_url": dataset, "out_dir": out, "generator.kind": generator,
        "generator.base_model": base_model, "generator.weights": weights,
        "identities": identities, "prompts": str(prompts) if prompts else None,
        "categories": category or None, "per_category": per_category, "seed": seed,
        "metrics.faces.set": models, "metrics.clip": clip, "metrics.dino": dino,
        "metrics.fid": fid,
    }  # fmt: skip
    cfg = _typed_config(EvaluateConfig, config, set_, **flags)
    from training.preflight import check_evaluation

    check_evaluation(cfg)  # the dataset and every weight, before a server starts or a model loads
    console.print(
        f"[bold]fgid evaluate[/]: {cfg.generator.kind} on {escape(cfg.dataset_url)} -> "
        f"{escape(cfg.out_dir)}"
    )
    if prefect:
        with prefect_session():
            from flows.train import evaluate as evaluate_flow

            summary = evaluate_flow(config=cfg)["summary"]
    else:
        from training.evaluation.run import run_evaluation

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        result = run_evaluation(cfg)
        console.print(f"{result.generated} images generated, {result.reused} reused")
        summary = result.summary
    _print_evaluation(summary, cfg.out_dir)


def _print_evaluation(summary: list[dict], out: str) -> None:
    from training.evaluation.run import table_rows

    _print_table(table_rows(summary), f"Evaluation {out}")


def _print_table(rows: list[dict], title: str) -> None:
    table = Table(title=escape(title))
    for column in rows[0]:
        table.add_column(column, min_width=len(column))  # a metric's name is never cut
    for row in rows:
        table.add_row(*("n/a" if v is None else escape(str(v)) for v in row.values()))
    # Piped into a file or a log, the table keeps every column rather than 80 characters.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def evaluate_table_cmd(
    runs: Annotated[
        list[str],
        typer.Argument(help="Output folders of fgid evaluate (or s3:// URLs): one row each."),
    ],
    category: Annotated[
        str, typer.Option(help="Compare this prompt category's rows; default all prompts.")
    ] = "all",
    out: Annotated[
        str | None,
        typer.Option(
            "--out", "-o", help="Also write the table: FILE.md, FILE.csv or FILE.parquet."
        ),
    ] = None,
) -> None:
    """Put several evaluations side by side, one row per run (a model of ours, a release, the
    text-only baseline): CLIP-T, CLIP-I, DINO, FaceSim, FaceSim-ArcFace, FGIS, FID, s/image."""
    from flows.storage_secret import load_storage_secret
    from storage.credentials import check_url
    from training.evaluation.compare import LABELS, compare_runs, write_comparison
    from training.evaluation.run import table_rows

    load_storage_secret()
    try:
        for url in [*runs, *([out] if out else [])]:
            check_url(url)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="RUNS / --out") from None
    comparison = compare_runs(runs, category)
    if out:  # a wrong suffix is refused before anything is shown
        write_comparison(comparison, out)
    _print_table(table_rows(comparison.rows, LABELS), comparison.title)
    for note in comparison.notes:
        console.print(f"[yellow]not comparable:[/] {escape(note)}", highlight=False)
    if out:
        console.print(f"wrote {escape(out)}", highlight=False)
