"""`fgid publish`: a finished build as a Hugging Face dataset repository, local or pushed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from flows.cli_common import console


def publish_cmd(
    dataset: Annotated[str, typer.Argument(help="A finished build (folder or s3:// URL).")],
    dest: Annotated[
        str,
        typer.Argument(
            help="A local folder to write the repository into, or a Hub dataset repository "
            "id (user/name, or hf://datasets/user/name) to push to; an existing path is a folder."
        ),
    ],
    public: Annotated[
        bool, typer.Option(help="Create a new Hub repository as public (default: private).")
    ] = False,
) -> None:
    """Write the shards, their Parquet index and the card as a Hugging Face dataset repository."""
    from fgid.publish import publish
    from flows.storage_secret import load_storage_secret
    from storage.credentials import check_url

    load_storage_secret()
    try:
        check_url(dataset)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="DATASET") from None
    result = publish(dataset, dest, private=not public)
    shards = sum(f.endswith(".tar") for f in result["files"])
    console.print(
        f"published {shards} shards ({len(result['files'])} files) to {escape(result['dest'])}"
    )
