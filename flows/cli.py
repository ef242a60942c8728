"""The `fgid` command: build a dataset, inspect one, train and evaluate models on it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_common import (
    ConfigOpt,
    ModelsOpt,
    SetOpt,
    config_from,
    console,
    parse_overrides,
    prefect_session,
    run_cli,
)
from flows.cli_convert import convert_app
from flows.cli_models import models_app
from flows.cli_publish import publish_cmd
from flows.cli_server import server_app
from flows.cli_train import evaluate_cmd, evaluate_table_cmd, train_app

app = typer.Typer(
    help="Build FGID-style fine-grained face datasets (webdataset shards + Parquet index).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Options shared by `build` and `serve`: what to build and with which settings.
InputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Image folders or files, .txt lists of paths, URL tables (.csv .tsv .jsonl "
        ".parquet), Parquet image datasets, .zip/.tar archives or webdataset shards "
        "(shard-{000..009}.tar); local, s3:// or http(s)://."
    ),
]
ShardSizeOpt = Annotated[int | None, typer.Option(help="Inputs per shard; default 1000.")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="Images per model call; default 16.")]
WorkersOpt = Annotated[int | None, typer.Option(help="Shards built at once; default 1.")]
LabelsOpt = Annotated[
    str | None,
    typer.Option(help="Identity labels, '<file name> <identity>' lines (CelebA format)."),
]
UrlColumnOpt = Annotated[
    str | None, typer.Option(help="URL tables (CSV, TSV, JSONL, Parquet): the URL column; 'url'.")
]
CaptionColumnOpt = Annotated[
    str | None, typer.Option(help="Table column kept as each image's source caption.")
]
LabelColumnOpt = Annotated[
    str | None, typer.Option(help="Table column holding the identity label (as --labels).")
]
AppendOpt = Annotated[
    bool,
    typer.Option(
        help="Add the inputs the dataset at --out lacks as new shards; its shards and "
        "identities stay as they are."
    ),
]


def _build_config(config, set_, **flags):
    """YAML (if any), then --set overrides, then the explicit flags, validated."""
    from fgid.config import BuildConfig

    overrides = parse_overrides(set_)
    names = {
        "models": "models.set",
        "url_column": "inputs.url_column",
        "caption_column": "inputs.caption_column",
        "label_column": "inputs.label_column",
    }
    overrides.update({names.get(k, k): v for k, v in flags.items() if v is not None})
    return config_from(BuildConfig, config, overrides)


@app.command()
def build(
    inputs: InputsArg,
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="Output folder or s3:// URL (created; rerun to resume)."),
    ],
    models: ModelsOpt = None,
    shard_size: ShardSizeOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    labels: LabelsOpt = None,
    url_column: UrlColumnOpt = None,
    caption_column: CaptionColumnOpt = None,
    label_column: LabelColumnOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
    prefect: Annotated[
        bool, typer.Option(help="Run as a Prefect flow (a local server if none is set).")
    ] = True,
    runner: Annotated[
        str,
        typer.Option(help="Where shards run: 'threads' (this process) or 'dask' (a cluster)."),
    ] = "threads",
    dask_address: Annotated[
        str | None,
        typer.Option(help="Scheduler of an existing Dask cluster, tcp://HOST:PORT (implies dask)."),
    ] = None,
    append: AppendOpt = False,
) -> None:
    """Build an FGID dataset: decode, detect, align, parse, embed, caption, group, write shards."""
    columns = dict(url_column=url_column, caption_column=caption_column, label_column=label_column)
    cfg = _build_config(config, set_, models=models, shard_size=shard_size, batch_size=batch_size,
                        workers=workers, labels=labels, **columns)  # fmt: skip
    kind = "dask" if dask_address else runner
    if kind not in ("threads", "dask"):
        raise typer.BadParameter(
            f"expected 'threads' or 'dask', got {kind!r}", param_hint="--runner"
        )
    if kind != "threads" and not prefect:
        raise typer.BadParameter("--runner dask needs the Prefect flow (drop --no-prefect)")
    if cfg.workers > 1 and not prefect:
        raise typer.BadParameter(
            "--workers builds shards side by side as Prefect tasks; drop --no-prefect, "
            "or --workers",
            param_hint="--workers",
        )
    summary = _run_build(inputs, out, cfg, prefect, kind, dask_address, append)
    _print_summary(summary, out)
    if not summary["complete"]:
        raise typer.Exit(1)


def _run_build(
    inputs: list[str],
    out: str,
    cfg,
    use_prefect: bool,
    kind: str,
    address: str | None,
    append: bool = False,
) -> dict:
    from fgid.inputs import check_inputs, read_labels
    from flows.cli_progress import build_progress
    from flows.storage_secret import load_storage_secret
    from storage.credentials import check_url

    # Before anything reads s3:// or starts workers, so they all see the credentials; and a URL
    # carrying credentials is refused before Prefect could record it as a parameter.
    load_storage_secret()
    try:
        for url in [*inputs, out]:
            check_url(url)
    except ValueError as error:  # the message never repeats the URL
        raise typer.BadParameter(str(error), param_hint="INPUTS / --out") from None
    # Mistakes are refused before anything is written: missing inputs, no images, bad labels
    # (and, by planning, anything wrong further into a folder or bucket than its first image).
    check_inputs(inputs, exclude=[out], columns=cfg.inputs)
    read_labels(cfg.labels)
    named = ", ".join(map(str, inputs[:3])) + (
        f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
    )
    console.print(
        f"[bold]fgid build[/]: {escape(named)} -> {escape(str(out))} (models: {cfg.models.set})"
    )
    with _left_as_it_was(out):
        if not use_prefect:
            from fgid.pipeline import build as build_plain

            with build_progress(console):
                return build_plain(inputs, out, cfg, append=append)
        with prefect_session():
            from flows.build import build as build_flow
            from flows.runners import describe, gpu_request, task_runner

            runner = task_runner(kind, workers=cfg.workers, address=address, gpus=gpu_request(cfg))
            console.print(f"shards run on {describe(runner)}")
            with build_progress(console):
                return build_flow.with_options(task_runner=runner)(
                    inputs=[str(i) for i in inputs], out=str(out), config=cfg, append=append
                )


@contextlib.contextmanager
def _left_as_it_was(out: str):
    """A build refused as a usage error (inputs found bad while planning) leaves no empty output
    folder behind where there was none; anything in it stays."""
    from fgid.errors import UsageError
    from storage import is_remote

    existed = is_remote(out) or os.path.exists(out)
    try:
        yield
    except UsageError:
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise


def _print_summary(summary: dict, out: str) -> None:
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
    from fgid.dataset import Dataset, NotADataset

    ds = Dataset.open(dataset)
    try:
        summary = ds.summary()
    except NotADataset:
        raise NotADataset(
            f"{dataset} is an unfinished build: `fgid status {dataset}` shows where it stands"
        ) from None
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.markdown import Markdown

    from fgid.report import summary_markdown

    out = Console()
    out.print(Markdown(summary_markdown(summary, str(dataset))))
    from fgid.history import history_lines

    if ds.history():  # one line per build or --append: date, inputs, shards, samples added
        out.print("[bold]Builds[/]\n" + "\n".join(map(escape, history_lines(ds))), highlight=False)
    if samples:
        _print_samples(ds, samples, out)


def _print_samples(ds, count: int, out: Console) -> None:
    from fgid.schema import CAPTION, FACIAL, META

    for key, members in ds.first_samples(count):
        meta = json.loads(members[META])
        # Captions and file names are data: escape them so brackets are not read as markup.
        out.print(
            f"[bold]{key}[/] {escape(os.path.basename(str(meta.get('source', ''))))}: "
            f"{meta.get('gender')}, age {meta.get('age')}, "
            f"regions {meta.get('regions', {}).get('present')}"
        )
        for label, field in (("caption", CAPTION), ("facial", FACIAL)):
            text = members.get(field, b"").decode("utf-8", errors="replace")
            out.print(f"  {label}: {' ' * (7 - len(label))}{escape(text)}")


@app.command()
def status(
    dataset: Annotated[str, typer.Argument(help="An output folder or URL of 'fgid build'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Where a build stands: running, interrupted or finished; shards, inputs, rate, ETA."""
    from fgid.dataset import Dataset
    from fgid.status import build_status

    state = build_status(Dataset.open(dataset))
    if as_json:
        print(json.dumps(state, indent=2))
        return
    console.print(_status_lines(state), highlight=False)


def _status_lines(state: dict) -> str:
    import datetime as dt

    colour = {"running": "yellow", "interrupted": "red", "finished": "green"}[state["state"]]
    lines = [f"[bold]{escape(state['dataset'])}[/]: [{colour}]{state['state']}[/]"]
    if state["holder"]:
        owner = state["holder"]
        lines.append(
            f"  by pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}"
        )
    lines.append(f"  shards  {state['shards_done']} of {state['shards_planned']} done")
    lines.append(f"  inputs  {state['inputs_done']} of {state['inputs_planned']} done, "
                 f"{state['rejected']} rejected")  # fmt: skip
    if state["inputs_per_second"]:
        rate = f"  rate    {state['inputs_per_second']:.2f} inputs/s"
        if state["eta_seconds"] is not None:
            rate += f", eta {dt.timedelta(seconds=round(state['eta_seconds']))}"
        lines.append(rate)
    if state["run_url"]:
        lines.append(f"  run     {state['run_url']}")
    if state["state"] == "interrupted":
        lines.append("  rerun the same fgid build command to resume")
    return "\n".join(lines)


@app.command()
def serve(
    inputs: InputsArg,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output folder; {date} or {datetime} are filled from each run's scheduled "
            "time, e.g. data/fgid-{date}. A fixed folder resumes, and refuses changed inputs "
            "unless --append.",
        ),
    ],
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule, e.g. '0 2 * * *' (02:00 every day).")
    ] = None,
    interval: Annotated[
        float | None, typer.Option(help="Seconds between runs, e.g. 86400.")
    ] = None,
    timezone: Annotated[
        str, typer.Option(help="Time zone of --cron and of {date}/{datetime}.")
    ] = "UTC",
    name: Annotated[
        str, typer.Option(help="Deployment name: fgid-scheduled-build/NAME.")
    ] = "fgid-build",
    models: ModelsOpt = None,
    shard_size: ShardSizeOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    labels: LabelsOpt = None,
    url_column: UrlColumnOpt = None,
    caption_column: CaptionColumnOpt = None,
    label_column: LabelColumnOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
    append: AppendOpt = False,
) -> None:
    """Serve a scheduled build on the Prefect server (PREFECT_API_URL) until Ctrl-C or SIGTERM."""
    from flows.serve import build_deployment, serve_build

    columns = dict(url_column=url_column, caption_column=caption_column, label_column=label_column)
    cfg = _build_config(config, set_, models=models, shard_size=shard_size, batch_size=batch_size,
                        workers=workers, labels=labels, **columns)  # fmt: skip
    schedule = dict(name=name, cron=cron, interval=interval, timezone=timezone, append=append)
    try:  # schedule, time zone and URLs are checked before any server is started
        build_deployment(inputs, out, cfg, **schedule)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    # Without PREFECT_API_URL the schedule lives on the local fgid server, which outlives this
    # process: the deployment and its past runs stay visible in its UI.
    with prefect_session():
        serve_build(inputs, out, cfg, **schedule)


@app.command()
def caption(
    dataset: Annotated[str, typer.Argument(help="A folder or URL written by 'fgid build'.")],
    models: ModelsOpt = None,
    llava: Annotated[
        str | None,
        typer.Option(help="LLaVA hub id or local dir (models.llava): the VLM that captions."),
    ] = None,
    prompt: Annotated[
        list[str], typer.Option("--prompt", help="A prompt; give one --field NAME for each.")
    ] = [],  # noqa: B006 - typer needs a list default
    field: Annotated[
        list[str],
        typer.Option(
            "--field",
            help="Field written as {key}.NAME.txt (a-z, 0-9, _). Without --prompt: caption or "
            "facial with the spec prompt. Default: both.",
        ),
    ] = [],  # noqa: B006 - typer needs a list default
    replace: Annotated[
        bool, typer.Option(help="Overwrite fields the build or another caption run wrote.")
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per captioner call and journal entry; default 8.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a list default
    prefect: Annotated[
        bool, typer.Option(help="Run as a Prefect flow (a local server if none is set).")
    ] = True,
) -> None:
    """Add or replace captions in a built dataset with another captioner or prompt."""
    from fgid.captioning.run import FieldExists, fields_from_options
    from fgid.dataset import Dataset
    from flows.storage_secret import load_storage_secret
    from storage.credentials import check_url

    load_storage_secret()
    try:
        check_url(dataset)
        fields = fields_from_options(prompt, field)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="DATASET / --prompt / --field") from None
    Dataset.open(dataset, finished=True)  # before anything is written there
    overrides = {"models.llava": llava, "caption.batch_size": batch_size}
    cfg = _build_config(config, set_, models=models, **overrides)
    console.print(
        f"[bold]fgid caption[/]: {escape(dataset)} fields {', '.join(fields)} "
        f"(models: {cfg.models.set})"
    )
    try:
        if prefect:
            with prefect_session():
                from flows.caption import caption as caption_flow

                record = caption_flow(dataset=dataset, config=cfg, fields=fields, replace=replace)
        else:
            from fgid.captioning.recaption import recaption

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
            record = recaption(dataset, cfg, fields, replace)
    except FieldExists as error:
        raise typer.BadParameter(str(error), param_hint="--field") from None
    console.print(
        f"caption run {record['id']}: {record['status']}, "
        f"{len(record['shards']['captioned'])} shard(s) captioned by {', '.join(record['models'])}"
    )
    if record["status"] != "done":
        raise typer.Exit(1)


@app.command()
def remove(
    dataset: Annotated[str, typer.Argument(help="A folder or URL written by 'fgid build'.")],
    reason: Annotated[str, typer.Option(help="Why, for the record: a ticket number, not a name.")],
    identity: Annotated[
        str | None, typer.Option(help="Remove every sample of this identity (identities.parquet).")
    ] = None,
    sources: Annotated[
        Path | None,
        typer.Option(
            help="File of source paths or content sha256s (of the requester's photo), one per line."
        ),
    ] = None,
) -> None:
    """Take an identity or source files out of every shard, index and the plan, with a record."""
    from fgid.dataset import Dataset
    from fgid.inputs import read_lines
    from fgid.removal import remove_samples

    if (identity is None) == (sources is None):
        raise typer.BadParameter("give exactly one of --identity or --sources")
    Dataset.open(dataset, finished=True)
    entries = None
    if sources is not None:
        lines = read_lines(str(sources), "sources file")
        entries = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    record = remove_samples(dataset, identity=identity, sources=entries, reason=reason)
    shards = record["shards"]
    console.print(
        f"removed {len(record['samples'])} samples (record removals/{record['id']}.json); "
        f"shards rewritten {shards.get('rewritten', [])}, deleted {shards.get('deleted', [])}"
    )


export_app = typer.Typer(
    help="Write a built dataset in another project's layout.", no_args_is_help=True
)
app.add_typer(export_app, name="export")


@export_app.command("consistentid")
def export_consistentid_cmd(
    dataset: Annotated[str, typer.Argument(help="A folder or URL written by 'fgid build'.")],
    out: Annotated[str, typer.Option(help="Folder or s3:// prefix to write the layout into.")],
    include_duplicates: Annotated[
        bool, typer.Option(help="Also export exact duplicates (identities.parquet duplicate_of).")
    ] = False,
    allow_any_dim: Annotated[
        bool,
        typer.Option(help="Export non-512-d embeddings (lite: 128-d) as (1, dim) tensors anyway."),
    ] = False,
) -> None:
    """Write the ConsistentID reference trainer's layout: images, masks, embeddings, JSON."""
    from fgid.dataset import Dataset
    from fgid.export import export_consistentid

    Dataset.open(dataset, finished=True)
    summary = export_consistentid(
        dataset, out, include_duplicates=include_duplicates, allow_any_dim=allow_any_dim
    )
    console.print(
        f"exported {summary['samples']} samples to {escape(summary['json'])} "
        f"({summary['skipped_duplicates']} duplicates skipped, {summary['written']} files written, "
        f"{summary['pruned']} stale files deleted)"
    )
    if not summary["reference_compatible"]:
        console.print(
            f"[yellow]embeddings are {summary['embedding_dim']}-d: the reference trainer "
            "expects (1, 512)[/]"
        )


@app.command("samples")
def samples_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder to write the demo photos into.")],
) -> None:
    """Write demo photos from installed packages: real faces, a no-face image, a bad file."""
    from fgid.samples import write_samples

    files = write_samples(folder)
    console.print(f"wrote {len(files)} files to {folder}")


app.add_typer(train_app, name="train")
app.add_typer(server_app, name="server")
app.add_typer(models_app, name="models")
app.add_typer(convert_app, name="convert")
app.command("publish")(publish_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("evaluate-table")(evaluate_table_cmd)


def main() -> None:
    """The `fgid` console script."""
    raise SystemExit(run_cli(app))


if __name__ == "__main__":
    main()
