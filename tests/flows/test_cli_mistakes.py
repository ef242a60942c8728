"""Every mistake a newcomer makes gets one line and exit code 2, and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.cli import app
from flows.cli_common import run_cli


@pytest.fixture()
def place(tmp_path, demo_inputs):
    """A working folder: photos, an empty folder, a non-dataset folder, bad config and labels."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a dataset\n")
    (tmp_path / "bad.yaml").write_text("shard_size: [1, 2\n")
    (tmp_path / "unknown.yaml").write_text("detcet:\n  min_face_size: 3\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "labels-bad.txt").write_text("astronaut.png 1\nthis line has three fields\n")
    return {"photos": str(demo_inputs), "tmp": str(tmp_path)}


B = ["build", "{photos}", "--out", "{tmp}/out", "--models", "lite", "--no-prefect"]
CASES = {
    "missing input folder": (["build", "{tmp}/phots", "--out", "{tmp}/out"], "input not found"),
    "typo in input folder": (["build", "{tmp}/emptyy", "--out", "{tmp}/out"], "did you mean"),
    "empty input folder": (["build", "{tmp}/empty", "--out", "{tmp}/out"], "no images found"),
    "zero shard size": ([*B, "--shard-size", "0"], "shard_size"),
    "negative shard size": ([*B, "--shard-size", "-1"], "shard_size"),
    "zero batch size": ([*B, "--batch-size", "0"], "batch_size"),
    "misspelled model set": ([*B, "--models", "ful"], "'lite' or 'full'"),
    "misspelled section": (
        [*B, "--set", "detct.min_face_size=64"], "did you mean detect.min_face_size?"
    ),
    "misspelled setting": ([*B, "--set", "shard_sise=5"], "did you mean shard_size?"),
    "setting with no value": ([*B, "--set", "shard_size"], "section.field=value"),
    "missing config": ([*B, "--config", "{tmp}/nope.yaml"], "config file not found"),
    "config that is not YAML": ([*B, "--config", "{tmp}/bad.yaml"], "not valid YAML"),
    "config with a misspelled section": ([*B, "--config", "{tmp}/unknown.yaml"], "detcet"),
    "config that is a list": ([*B, "--config", "{tmp}/list.yaml"], "mapping"),
    "missing labels": ([*B, "--labels", "{tmp}/labels.txt"], "labels file not found"),
    "malformed labels": ([*B, "--labels", "{tmp}/labels-bad.txt"], "labels-bad.txt:2:"),
    "labels from a device": ([*B, "--labels", "/dev/zero"], "not a regular file"),
    "workers without prefect": ([*B, "--workers", "2"], "--workers"),
    "unknown runner": ([*B[:-1], "--runner", "ray"], "'threads' or 'dask'"),
    "misspelled command": (["bild", "{photos}"], "Did you mean 'build'"),
    "missing --out": (["build", "{photos}"], "Missing option '--out'"),
    "inspect a plain folder": (["inspect", "{tmp}/plain"], "not an fgid build"),
    "status of a plain folder": (["status", "{tmp}/plain"], "not an fgid build"),
    "remove from a plain folder": (
        ["remove", "{tmp}/plain", "--identity", "x", "--reason", "t1"], "not a finished fgid build"
    ),
    "caption a missing folder": (
        ["caption", "{tmp}/nonexistent", "--no-prefect", "--models", "lite"], "no such folder"
    ),
    "status of a misspelled folder": (["status", "{tmp}/plian"], "did you mean"),
    "inspect a misspelled folder": (["inspect", "{tmp}/plian"], "plain?"),
    "export a plain folder": (
        ["export", "consistentid", "{tmp}/plain", "--out", "{tmp}/exp"], "not a finished"
    ),
    "train on a plain folder": (
        ["train", "consistentid", "--dataset", "{tmp}/plain", "--no-prefect",
         "--output-dir", "{tmp}/run"],
        "not a finished",
    ),
    "evaluate a plain folder": (
        ["evaluate", "{tmp}/plain", "--out", "{tmp}/eval", "--no-prefect"],
        "not a finished",
    ),
    "tabulate a plain folder": (
        ["evaluate-table", "{tmp}/plain", "--out", "{tmp}/table.md"],
        "not an fgid evaluate output",
    ),
}  # fmt: skip


def listing(root: str) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs
    }


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(case, place, capsys):
    args, expected = CASES[case]
    args = [a.format(**place) for a in args]
    before = listing(place["tmp"])
    code = run_cli(app, args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and "error:" in lines[0], err
    assert expected in lines[0], lines[0]
    assert listing(place["tmp"]) == before, "a refused command left files behind"
    assert not Path(place["tmp"], "nonexistent").exists()


def test_debug_shows_the_traceback(place):
    with pytest.raises(Exception, match="input not found"):
        run_cli(app, ["build", f"{place['tmp']}/phots", "--out", f"{place['tmp']}/o", "--debug"])


def test_a_rerun_with_other_inputs_says_what_changed_and_what_to_do(place, capsys):
    import shutil

    photos = Path(place["tmp"], "photos")
    shutil.copytree(place["photos"], photos)
    out = f"{place['tmp']}/built"
    args = ["build", str(photos), "--out", out, "--models", "lite", "--no-prefect"]
    assert run_cli(app, args) == 0, capsys.readouterr().err
    capsys.readouterr()
    shutil.copy(photos / "astronaut.png", photos / "astronaut again.png")
    (photos / "grace_hopper.jpg").unlink()
    before = listing(out)
    code = run_cli(app, args)
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, lines
    assert "1 input added, 1 missing since the first run" in lines[0]
    assert "use a new --out" in lines[0] and "--append" in lines[0]
    assert listing(out) == before
