"""The training and evaluation flows on a real Prefect server, and the commands that start them."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

slow = pytest.mark.slow  # a Prefect server, subprocesses, or a build

TINY_CONSISTENTID = {"lora_rank": 4, "id_depth": 1, "facial_depth": 1, "dim_head": 16}
# Small images and few steps: the tiny UNets are built for 16-32 px.
TINY_SAMPLING = {"steps": 2, "height": 32, "width": 32, "device": "cpu"}


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=600,
    )


def consistentid_config(dataset, base_model, out, max_steps=2) -> dict:
    return {
        "dataset_url": str(dataset),
        "base_model": str(base_model),
        "id_dim": 128,  # the lite build's dlib embeddings, on purpose
        "loader": {"batch_size": 2, "resolution": 32, "workers": 0, "shuffle_buffer": 4},
        "train": {
            "output_dir": str(out),
            "max_steps": max_steps,
            "mixed_precision": "no",
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "model": TINY_CONSISTENTID,
    }


def faceclip_config(dataset, tiny_sdxl, tiny_clip, out, stage="align", **extra):
    from training.faceclip.config import FaceViTConfig, TowerConfig
    from training.faceclip.train import FaceCLIPTrainConfig

    return FaceCLIPTrainConfig(
        stage=stage,
        dataset_url=str(dataset),
        base_model=str(tiny_sdxl),
        image_model=str(tiny_clip),
        face_vit=FaceViTConfig.tiny(),
        towers=[TowerConfig.tiny(32), TowerConfig.tiny(64)],
        loader={"batch_size": 2, "resolution": 32, "clip_size": 32, "workers": 0},
        train={"output_dir": str(out), "max_steps": 2, "mixed_precision": "no", "log_every": 1},
        **extra,
    )


def facenet_weights(out) -> Path:
    """FaceNet's file layout (facenet-pytorch's InceptionResnetV1 names) with random weights."""
    import torch

    from training.evaluation.facenet import InceptionResnetV1

    path = Path(out).parent / "facenet-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(InceptionResnetV1().state_dict(), path)
    return path


def evaluate_config(dataset, out, tiny_clip, tiny_dino, generator: dict, **extra):
    from training.evaluation.config import EvaluateConfig

    return EvaluateConfig(
        dataset_url=str(dataset),
        out_dir=str(out),
        generator=generator,
        metrics={
            "clip": str(tiny_clip),
            "dino": str(tiny_dino),
            "faces": {"set": "lite"},
            "facenet": str(facenet_weights(out)),
            "fid": "dino",
            "device": "cpu",
        },
        identities=2,
        categories=["clothing", "style"],
        per_category=1,
        **extra,
    )


async def server_report(api_url: str) -> tuple[list, dict]:
    """Every flow run, and the latest artifact of each key."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        runs = await client.read_flow_runs()
        artifacts = {}
        for artifact in await client.read_artifacts():
            if artifact.key:
                latest = artifacts.get(artifact.key)
                if latest is None or artifact.created > latest.created:
                    artifacts[artifact.key] = artifact
        return runs, artifacts


def table_rows(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def on_server(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url})


def test_evaluation_and_training_tasks_retry_only_what_can_clear_up():
    """As the shard tasks: a usage error (a bad setting, a missing file) fails at once."""
    from fgid.errors import UsageError
    from flows.retries import retry_transient, transient
    from flows.train import evaluate_generator, train_model

    for task in (evaluate_generator, train_model):
        assert task.retries >= 1 and task.retry_condition_fn is retry_transient
    assert not transient(UsageError("a base model of the other variant"))
    assert transient(ConnectionResetError())


@slow
def test_evaluate_flow_publishes_the_summary(
    prefect_server, built_dataset, tiny_sd15, tiny_clip, tiny_dino, tmp_path
):
    import storage
    from flows.train import evaluate

    out = tmp_path / "eval-text-only"
    generator = {"base_model": str(tiny_sd15), "options": {"steps": 2, "device": "cpu"}}
    config = evaluate_config(built_dataset, out, tiny_clip, tiny_dino, generator)
    with on_server(prefect_server):
        result = evaluate(config=config)
        again = evaluate(config=config)
    assert result["generated"] == 4 and again["generated"] == 0 and again["reused"] == 4
    assert [(r["category"], r["images"]) for r in result["summary"]] == [
        ("all", 4),
        ("clothing", 2),
        ("style", 2),
    ]
    assert (out / "per_image.parquet").is_file() and (out / "summary.parquet").is_file()

    runs, artifacts = asyncio.run(server_report(prefect_server.api_url))
    mine = [r for r in runs if r.name == "evaluate-text-only-eval-text-only"]
    assert len(mine) == 2 and all(r.state.is_completed() for r in mine)
    tags = {"fgid", "evaluate", "generator:text-only", f"dataset:{storage.name(built_dataset)}"}
    assert tags <= set(mine[0].tags)
    table = table_rows(artifacts["fgid-evaluation-table-eval-text-only"])
    assert [row["category"] for row in table] == ["all", "clothing", "style"]
    assert table[0]["CLIP-T"] == pytest.approx(result["summary"][0]["clip_t"], abs=0.01)
    assert table[0]["FaceSim"] == 0.0  # 16 px images from an untrained UNet hold no face
    markdown = artifacts["fgid-evaluation-eval-text-only"].data
    assert "| all | 4 |" in markdown and "per_image.parquet" in markdown


@slow
def test_training_flows_report_loss_throughput_and_loader_wait(
    prefect_server, built_dataset, tiny_sd15, tiny_sdxl, tiny_clip, tmp_path
):
    from flows.train import train_consistentid, train_faceclip
    from training.consistentid.pipeline import WEIGHTS
    from training.consistentid.train import ConsistentIDTrainConfig

    consistentid = ConsistentIDTrainConfig.model_validate(
        consistentid_config(built_dataset, tiny_sd15, tmp_path / "cid-run")
    )
    align = faceclip_config(built_dataset, tiny_sdxl, tiny_clip, tmp_path / "fc-align")
    with on_server(prefect_server):
        cid_report = train_consistentid(config=consistentid)
        fc_report = train_faceclip(config=align)
    for report in (cid_report, fc_report):
        assert report["step"] == 2 and report["start_step"] == 0
        assert math.isfinite(report["final_loss"]) and report["samples_per_second"] > 0
        assert 0 <= report["loader_wait_fraction"] <= 1
        assert Path(report["final_dir"]).is_dir()
    assert (Path(cid_report["final_dir"]) / WEIGHTS).is_file()

    runs, artifacts = asyncio.run(server_report(prefect_server.api_url))
    names = {r.name: r for r in runs}
    assert names["train-consistentid-cid-run"].state.is_completed()
    assert {"train", "model:consistentid"} <= set(names["train-consistentid-cid-run"].tags)
    assert "model:faceclip-align" in names["train-faceclip-align-fc-align"].tags
    rows = {
        r["metric"]: r["value"] for r in table_rows(artifacts["fgid-train-consistentid-cid-run"])
    }
    assert rows["final loss"] == cid_report["final_loss"]
    assert rows["samples/s"] == cid_report["samples_per_second"]
    assert rows["loader wait (fraction of wall time)"] == cid_report["loader_wait_fraction"]
    summary = artifacts["fgid-train-faceclip-align-summary-fc-align"].data
    assert "final loss" in summary and "samples/s" in summary


@slow
def test_build_train_evaluate_in_one_run(
    prefect_server, lite_config, tiny_sd15, tiny_sdxl, tiny_clip, tiny_dino, tmp_path
):
    from flows.train import build_train_evaluate
    from tests.corpus import make_identity_corpus
    from training.consistentid.train import ConsistentIDTrainConfig

    inputs = tmp_path / "photos"
    make_identity_corpus(inputs)
    out = tmp_path / "pipeline-ds"
    # dataset_url is a placeholder: the parent flow trains on what it builds.
    consistentid = ConsistentIDTrainConfig.model_validate(
        consistentid_config("unused", tiny_sd15, tmp_path / "pipeline-cid")
    )
    align = faceclip_config("unused", tiny_sdxl, tiny_clip, tmp_path / "pipeline-fc-align")
    sdxl = faceclip_config("unused", tiny_sdxl, tiny_clip, tmp_path / "pipeline-fc-sdxl", "sdxl")
    evaluation = evaluate_config("unused", tmp_path / "pipeline-eval", tiny_clip, tiny_dino, {})
    options = {
        "consistentid": {**TINY_SAMPLING, "merge_step": 1},
        "faceclip": TINY_SAMPLING,
        "text-only": {"steps": 2, "device": "cpu"},
    }
    with on_server(prefect_server):
        results = build_train_evaluate(
            inputs=[str(inputs)],
            out=str(out),
            build_config=lite_config,
            consistentid=consistentid,
            faceclip_align=align,
            faceclip_sdxl=sdxl,
            evaluation=evaluation,
            generator_options=options,
            evaluate_baseline=True,
        )
    assert results["build"]["samples"] >= 11
    assert results["consistentid"]["step"] == 2
    # The SDXL stage trained on the encoder the align stage had just exported.
    align_final = results["faceclip_align"]["final_dir"]
    sdxl_run = json.loads(
        (Path(results["faceclip_sdxl"]["final_dir"]) / "faceclip.json").read_text()
    )
    assert sdxl_run["stage"] == "sdxl" and sdxl_run["encoder_weights"] == align_final
    evaluated = {k: v for k, v in results.items() if k.startswith("evaluate_")}
    assert sorted(evaluated) == [
        "evaluate_consistentid",
        "evaluate_faceclip",
        "evaluate_text_only_baseline",
    ]
    for name, result in evaluated.items():
        assert result["generated"] == 4, name  # 2 identities x 2 prompts
        assert Path(result["out_dir"]).name == name.removeprefix("evaluate_").replace("_", "-")
    # Every generator drew the same identities with the same prompts.
    images = {tuple(r["images"] for r in result["summary"]) for result in evaluated.values()}
    assert images == {(4, 2, 2)}

    runs, artifacts = asyncio.run(server_report(prefect_server.api_url))
    by_name = {r.name: r for r in runs}
    parent = by_name["build-train-evaluate-pipeline-ds"]
    children = [
        "build-pipeline-ds-lite",
        "train-consistentid-pipeline-cid",
        "train-faceclip-align-pipeline-fc-align",
        "train-faceclip-sdxl-pipeline-fc-sdxl",
        "evaluate-consistentid-consistentid",
        "evaluate-faceclip-faceclip",
        "evaluate-text-only-text-only-baseline",
    ]
    for name in children:
        assert by_name[name].state.is_completed(), name
        assert by_name[name].parent_task_run_id is not None, name  # a subflow of the parent
    assert parent.state.is_completed()
    assert "fgid-evaluation-table-consistentid" in artifacts
    assert "fgid-summary-pipeline-ds" in artifacts  # the build's own artifacts


@slow
def test_train_and_evaluate_commands(
    prefect_server, built_dataset, tiny_sd15, tiny_clip, tiny_dino, tmp_path
):
    config_file = tmp_path / "consistentid.yaml"
    config = consistentid_config("set-below", tiny_sd15, "set-below", max_steps=5)
    config_file.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "cli-cid"
    trained = run_cli(
        ["train", "consistentid", "--config", str(config_file), "--dataset", str(built_dataset),
         "--output-dir", str(run_dir), "--max-steps", "2", "--set", "train.learning_rate=0.001",
         "--no-prefect"]
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "final loss" in trained.stdout and "loader wait" in trained.stdout
    assert (run_dir / "final").is_dir() and (run_dir / "metrics.jsonl").is_file()
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]  # --max-steps overrode the file's 5

    out = tmp_path / "cli-eval"
    sampling = {**TINY_SAMPLING, "merge_step": 1}
    args = [
        "evaluate", str(built_dataset), "--out", str(out), "--generator", "consistentid",
        "--base-model", str(tiny_sd15), "--weights", str(run_dir / "final"), "--identities", "1",
        "--category", "style", "--per-category", "2", "--models", "lite", "--clip", str(tiny_clip),
        "--dino", str(tiny_dino), "--fid", "dino",
        *(f"--set=generator.options.{k}={v}" for k, v in sampling.items()),
    ]  # fmt: skip
    plain = run_cli([*args, "--no-prefect"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "2 images generated, 0 reused" in plain.stderr
    assert "CLIP-T" in plain.stdout and "style" in plain.stdout
    # The same command as a flow finds both images and only scores them again.
    flowed = run_cli(args, env=prefect_server.env)
    assert flowed.returncode == 0, flowed.stderr[-3000:]
    assert "0 generated, 2 from an earlier run" in flowed.stderr + flowed.stdout


def test_commands_refuse_bad_settings_before_any_work(tmp_path, capsys):
    from flows.cli import app
    from flows.cli_common import run_cli

    def refused(args: list[str]) -> str:
        code = run_cli(app, args)
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
        return err

    # No loader or train section and no YAML: the config does not validate.
    text = refused(["train", "faceclip", "--dataset", str(tmp_path), "--no-prefect"])
    assert "train" in text and "Field required" in text
    text = refused(
        ["train", "consistentid", "--dataset", str(tmp_path), "--set", "train.max_steps=3",
         "--set", "train.max_steps.every=1"]
    )  # fmt: skip
    assert "unknown setting train.max_steps.every: train.max_steps is a value" in text
    out = tmp_path / "eval"
    text = refused(["evaluate", str(tmp_path), "--out", str(out), "--fid", "kid", "--no-prefect"])
    assert "fid" in text and not out.exists()
    text = refused(["evaluate", str(tmp_path), "--out", "s3://AKIAEXAMPLE:s3cr3t@b/e"])
    assert "embedded credentials refused" in text and "s3cr3t" not in text


def test_a_training_without_final_weights_is_never_passed_on(tmp_path):
    """What follows a training (evaluation, the SDXL stage) gets final weights or an error."""
    import torch

    from flows.train import NoFinalWeights, require_final, train_report
    from training.consistentid.train import ConsistentIDTrainConfig
    from training.loop import TrainConfig, train

    model = torch.nn.Linear(2, 1)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, mixed_precision="no")

    def batches(start):
        while True:
            yield {"x": torch.ones(4, 2)}

    result = train(model, lambda m, b: (m(b["x"]).pow(2).mean(), {}), batches, config)
    report = train_report(result)  # no exporter: the run has checkpoints but no final/
    assert report["final_dir"] is None
    run = ConsistentIDTrainConfig(dataset_url=str(tmp_path), train=config)
    with pytest.raises(NoFinalWeights, match=f"without writing {tmp_path / 'final'}; rerun"):
        require_final("consistentid", run, report)
