"""The `fgid convert` commands: released checkpoints to this project's format and back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flows.cli_common import console

convert_app = typer.Typer(
    help="Convert between the released models' checkpoints and this project's.",
    no_args_is_help=True,
)


@convert_app.callback()
def _group() -> None:
    """Keeps `convert` a group with one command per model, however many there are."""


@convert_app.command("consistentid")
def consistentid(
    from_reference: Annotated[
        Path | None,
        typer.Option(
            "--from-reference", help="A released checkpoint (.bin/.pt/.safetensors) to read."
        ),
    ] = None,
    to_reference: Annotated[
        Path | None,
        typer.Option(
            "--to-reference", help="An export (final/) or checkpoint-{step} folder to read."
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="--from-reference: the folder to write; --to-reference: the file."
        ),
    ] = ...,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="--from-reference: the base recorded for the generator; default SD 1.5 or "
            "SDXL base 1.0, as the file's layers say."
        ),
    ] = None,
) -> None:
    """ConsistentID: `--from-reference FILE --out DIR` or `--to-reference DIR --out FILE`."""
    from training.consistentid.release import folder_to_release, release_to_folder

    _convert(
        from_reference, to_reference,
        lambda: release_to_folder(from_reference, out, base_model=base_model),
        lambda: folder_to_release(to_reference, out),
    )  # fmt: skip


@convert_app.command("faceclip")
def faceclip(
    from_reference: Annotated[
        Path | None,
        typer.Option(
            "--from-reference",
            help="A released face_clip_encoder.pt (or its folder, with unet.pt) to read.",
        ),
    ] = None,
    to_reference: Annotated[
        Path | None,
        typer.Option("--to-reference", help="An encoder export (final/ or final/encoder/)."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="--from-reference: the export folder to write; --to-reference: the .pt file.",
        ),
    ] = ...,
) -> None:
    """FaceCLIP encoder: `--from-reference FILE --out DIR` or `--to-reference DIR --out FILE`."""
    from training.faceclip.release import export_to_release, release_to_export

    _convert(
        from_reference, to_reference,
        lambda: release_to_export(from_reference, out),
        lambda: export_to_release(to_reference, out),
    )  # fmt: skip


def _convert(from_reference, to_reference, read_release, write_release) -> None:
    """Exactly one direction; a file that is not a checkpoint, or does not fit, is one line."""
    if (from_reference is None) == (to_reference is None):
        raise typer.BadParameter("give exactly one of --from-reference FILE or --to-reference DIR")
    try:
        written = read_release() if from_reference is not None else write_release()
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(
            str(error), param_hint="--from-reference / --to-reference"
        ) from None
    console.print(f"wrote {escape(str(written))}", soft_wrap=True)
