"""`fgid server`: the local Prefect server fgid starts when no PREFECT_API_URL is set."""

from __future__ import annotations

import typer

from flows.cli_common import console

server_app = typer.Typer(
    help="The local Prefect server fgid runs use when PREFECT_API_URL is not set.",
    no_args_is_help=True,
)


@server_app.command("start")
def start_cmd() -> None:
    """Start the local server now (fgid starts it by itself when a run needs it)."""
    from flows.local_server import ensure_server

    server = ensure_server(say=lambda line: console.print(line, highlight=False))
    console.print(f"Prefect UI: {server.ui_url} (pid {server.pid}, log {server.log})")


@server_app.command("status")
def status_cmd() -> None:
    """Say whether the local server runs, and where its UI is."""
    from flows.local_server import configured_api_url, prefect_home, running_server

    url = configured_api_url()
    if url:
        console.print(f"PREFECT_API_URL is set: fgid runs use {url}, not a local server")
    server = running_server(prefect_home())
    if server is None:
        console.print("no local fgid Prefect server is running (a run starts one when needed)")
        raise typer.Exit(1)
    console.print(f"running: Prefect UI {server.ui_url}, pid {server.pid}, log {server.log}")


@server_app.command("stop")
def stop_cmd() -> None:
    """Stop the local server; the next run starts it again (its run history is kept)."""
    from flows.local_server import stop_server

    server = stop_server()
    console.print(f"stopped the local Prefect server (pid {server.pid})" if server
                  else "no local fgid Prefect server was recorded")  # fmt: skip
