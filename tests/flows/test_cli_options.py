"""CLI refusals that must happen before any work starts."""

from __future__ import annotations

from typer.testing import CliRunner

from flows.cli import app


def test_dask_runner_needs_the_prefect_flow(tmp_path):
    result = CliRunner().invoke(
        app,
        ["build", str(tmp_path), "--out", str(tmp_path / "o"), "--runner", "dask", "--no-prefect"],
    )
    assert result.exit_code == 2 and "needs the Prefect flow" in result.output
    assert not (tmp_path / "o").exists()


def test_serve_refuses_two_schedules_before_serving(tmp_path):
    result = CliRunner().invoke(
        app, ["serve", str(tmp_path), "--out", str(tmp_path / "o"), "--cron", "0 2 * * *",
              "--interval", "60", "--models", "lite"],
    )  # fmt: skip
    assert result.exit_code == 2 and "cron" in result.output.lower()


def test_credentials_in_an_output_url_are_refused(tmp_path):
    result = CliRunner().invoke(
        app, ["build", str(tmp_path), "--out", "s3://AKIAEXAMPLE:s3cr3t@bucket/ds", "--no-prefect"]
    )
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert result.exit_code == 2 and "embedded credentials refused" in text
    assert "s3cr3t" not in result.output
