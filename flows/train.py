"""Prefect flows for the models: train ConsistentID, train FaceCLIP, evaluate, and all of
build -> train -> evaluate in one run.

Only wiring lives here; training and evaluation are functions of `training/` that run the same
way without Prefect (`fgid train ... --no-prefect`, `fgid evaluate ... --no-prefect`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

import storage
from fgid.config import BuildConfig
from fgid.errors import FailureError
from flows.build import artifact_key, tag_flow_run
from flows.build import build as build_flow
from flows.retries import retry_transient
from flows.storage_secret import load_storage_secret
from training.checkpoints import FINAL_DIR
from training.consistentid.train import ConsistentIDTrainConfig, resolve_variant
from training.evaluation.config import EvaluateConfig, GeneratorConfig
from training.evaluation.run import PER_IMAGE, rounded, summary_markdown, table_rows
from training.faceclip.train import FaceCLIPTrainConfig
from training.loop import TrainResult
from training.preflight import CONSISTENTID_ID_DIM, DatasetUnusable, check_evaluation

# --- evaluation ------------------------------------------------------------------------------


# Evaluation resumes image by image (training/evaluation/run.py), so a retry after a lost
# worker or storage outage generates only what the failed try had not saved. As the shard
# tasks, only errors that can clear up are retried (flows/retries.py).
@task(
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    log_prints=False,
)
def evaluate_generator(config: EvaluateConfig) -> dict:
    from training.evaluation.run import run_evaluation

    result = run_evaluation(config)
    get_run_logger().info(
        "%d images scored (%d generated, %d from an earlier run) into %s",
        len(result.per_image),
        result.generated,
        result.reused,
        config.out_dir,
    )
    return {
        "out_dir": result.out_dir,
        "summary": result.summary,
        "generated": result.generated,
        "reused": result.reused,
    }


def _evaluate_run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    return f"evaluate-{config.generator.kind}-{storage.name(config.out_dir)}"


@flow(name="fgid-evaluate", flow_run_name=_evaluate_run_name, log_prints=False)
def evaluate(config: EvaluateConfig) -> dict:
    """Generate each reference identity once per prompt, score the images, publish the tables."""
    load_storage_secret()
    check_evaluation(config)  # a missing weight or unusable dataset, before any model loads
    dataset = storage.name(config.dataset_url)
    tag_flow_run(["fgid", "evaluate", f"dataset:{dataset}", f"generator:{config.generator.kind}"])
    name = storage.name(config.out_dir)
    result = evaluate_generator.with_options(task_run_name=f"evaluate-{name}")(config)
    title = f"Evaluation of {config.generator.kind} on {dataset}"
    create_table_artifact(
        table_rows(result["summary"]),
        key=artifact_key("evaluation-table", config.out_dir),
        description=title,
    )
    create_markdown_artifact(
        summary_markdown(result["summary"], title)
        + f"\nPer-image table: `{storage.join(config.out_dir, PER_IMAGE)}`\n",
        key=artifact_key("evaluation", config.out_dir),
        description=title,
    )
    return result


# --- training --------------------------------------------------------------------------------

LOSS_WINDOW = 10  # steps averaged for the reported "recent loss": one step's loss is noisy


def train_report(result: TrainResult) -> dict:
    """What a training run reports (flow artifacts, the CLI): JSON-safe values and table rows."""
    losses = result.losses
    recent = losses[-LOSS_WINDOW:]
    report = {
        "step": result.step,
        "start_step": result.start_step,
        "final_loss": rounded(losses[-1], 6) if losses else None,
        "recent_loss": rounded(sum(recent) / len(recent), 6) if recent else None,
        "samples_per_second": rounded(result.samples_per_second, 3),
        "loader_wait_fraction": rounded(result.loader_wait_fraction, 4),
        "seconds": rounded(result.seconds, 1),
        "final_dir": str(result.final_dir) if result.final_dir else None,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }
    labels = {
        "step": "optimiser steps",
        "start_step": "started at step",
        "final_loss": "final loss",
        "recent_loss": f"mean loss, last {len(recent)} steps",
        "samples_per_second": "samples/s",
        "loader_wait_fraction": "loader wait (fraction of wall time)",
        "seconds": "seconds",
        "final_dir": "exported weights",
    }
    report["rows"] = [{"metric": label, "value": report[k]} for k, label in labels.items()]
    return report


class NoFinalWeights(FailureError):
    """A training run ended without exported weights: nothing to evaluate or hand on."""


def run_training(kind: str, config: ConsistentIDTrainConfig | FaceCLIPTrainConfig) -> dict:
    """Train (or resume) in this process; the report always names existing final weights."""
    if kind == "consistentid":
        from training.consistentid.train import train_consistentid as run
    else:
        from training.faceclip.train import train_faceclip as run
    return require_final(kind, config, train_report(run(config)))


def require_final(kind: str, config, report: dict) -> dict:
    """`report`, if it names final weights; what follows a training must never get None."""
    if not report["final_dir"]:
        output = storage.join(str(config.train.output_dir), FINAL_DIR)
        raise NoFinalWeights(
            f"{kind} training stopped at step {report['step']} without writing {output}; "
            "rerun the same command to export it from the last checkpoint"
        )
    return report


# A retry resumes from the latest checkpoint when train.resume_from is "latest" (the default),
# so it repeats at most `checkpoint_every` steps of work, and writes a final export that a crash
# had stopped. Only errors that can clear up are retried.
@task(
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    log_prints=False,
)
def train_model(kind: str, config: ConsistentIDTrainConfig | FaceCLIPTrainConfig) -> dict:
    report = run_training(kind, config)
    get_run_logger().info(
        "%s: step %d, final loss %s, %.2f samples/s, loader wait %.1f%%",
        kind,
        report["step"],
        report["final_loss"],
        report["samples_per_second"] or 0.0,
        100 * (report["loader_wait_fraction"] or 0.0),
    )
    return report


def _report_training(kind: str, config, report: dict) -> None:
    output = str(config.train.output_dir)
    title = f"{kind} training on {storage.name(config.dataset_url)}"
    create_table_artifact(
        report["rows"], key=artifact_key(f"train-{kind}", output), description=title
    )
    lines = "\n".join(f"| {r['metric']} | {r['value']} |" for r in report["rows"])
    create_markdown_artifact(
        f"# {title}\n\n| metric | value |\n|---|---|\n{lines}\n\n"
        f"Checkpoints and `metrics.jsonl`: `{output}`\n",
        key=artifact_key(f"train-{kind}-summary", output),
        description=title,
    )


def _train(kind: str, config) -> dict:
    load_storage_secret()
    stage = f"-{config.stage}" if kind == "faceclip" else ""
    tag_flow_run(
        ["fgid", "train", f"model:{kind}{stage}", f"dataset:{storage.name(config.dataset_url)}"]
    )
    name = storage.name(str(config.train.output_dir))
    report = train_model.with_options(task_run_name=f"train-{kind}{stage}-{name}")(kind, config)
    _report_training(f"{kind}{stage}", config, report)
    return report


def _train_run_name(kind: str):
    def name() -> str:
        from prefect.runtime import flow_run

        config = flow_run.parameters["config"]
        stage = f"-{config.stage}" if kind == "faceclip" else ""
        return f"train-{kind}{stage}-{storage.name(str(config.train.output_dir))}"

    return name


@flow(name="fgid-train-consistentid", flow_run_name=_train_run_name("consistentid"))
def train_consistentid(config: ConsistentIDTrainConfig) -> dict:
    """Train ConsistentID on `config.dataset_url`; resumes from the latest checkpoint."""
    return _train("consistentid", config)


@flow(name="fgid-train-faceclip", flow_run_name=_train_run_name("faceclip"))
def train_faceclip(config: FaceCLIPTrainConfig) -> dict:
    """Train one FaceCLIP stage ('align' or 'sdxl') on `config.dataset_url`."""
    return _train("faceclip", config)


# --- build -> train -> evaluate ----------------------------------------------------------------


def _pipeline_run_name() -> str:
    from prefect.runtime import flow_run

    return f"build-train-evaluate-{storage.name(flow_run.parameters['out'])}"


@flow(name="fgid-build-train-evaluate", flow_run_name=_pipeline_run_name, log_prints=False)
def build_train_evaluate(
    inputs: list[str],
    out: str,
    build_config: BuildConfig | None = None,
    consistentid: ConsistentIDTrainConfig | None = None,
    faceclip_align: FaceCLIPTrainConfig | None = None,
    faceclip_sdxl: FaceCLIPTrainConfig | None = None,
    evaluation: EvaluateConfig | None = None,
    generator_options: dict[str, dict[str, Any]] | None = None,
    evaluate_baseline: bool = False,
) -> dict:
    """Build a dataset into `out`, train the models given a config, evaluate what was trained.

    - Every training config's dataset_url is replaced by `out`; faceclip_sdxl without
      encoder_weights takes the encoder that faceclip_align has just trained.
    - `evaluation` gives the prompts, metrics and root out_dir (one subfolder per model); its
      dataset_url and generator are replaced. `generator_options` holds each generator kind's
      from_pretrained options, e.g. {"consistentid": {"steps": 30}, "text-only": {...}}.
    - ConsistentID and FaceCLIP-SDXL are evaluated; an align-stage encoder alone is not (it would
      draw through an SDXL UNet never trained on it, which is no model to report).
    - `evaluate_baseline` adds ConsistentID's base model drawing the prompt alone
      (baseline.TextOnlyGenerator: SD 1.5 or SDXL, as the base) as the comparison row."""
    logger = get_run_logger()
    tag_flow_run(["fgid", "build-train-evaluate", f"dataset:{storage.name(out)}"])
    if consistentid is not None:  # SD 1.5 or SDXL, before the weights are checked
        consistentid = resolve_variant(consistentid)
    _check_before_build(build_config, consistentid, faceclip_align, faceclip_sdxl, evaluation)
    results: dict = {"build": build_flow(inputs=inputs, out=out, config=build_config)}
    trained: list[tuple[str, str, str]] = []  # (generator kind, base model, weights)
    if consistentid is not None:
        config = consistentid.model_copy(update={"dataset_url": out})
        results["consistentid"] = train_consistentid(config=config)
        trained.append(("consistentid", config.base_model, results["consistentid"]["final_dir"]))
    if faceclip_align is not None:
        config = faceclip_align.model_copy(update={"dataset_url": out, "stage": "align"})
        results["faceclip_align"] = train_faceclip(config=config)
    if faceclip_sdxl is not None:
        update = {"dataset_url": out, "stage": "sdxl"}
        if not faceclip_sdxl.encoder_weights and "faceclip_align" in results:
            update["encoder_weights"] = results["faceclip_align"]["final_dir"]
        config = faceclip_sdxl.model_copy(update=update)
        results["faceclip_sdxl"] = train_faceclip(config=config)
        trained.append(("faceclip", config.base_model, results["faceclip_sdxl"]["final_dir"]))
    if evaluation is None:
        return results
    runs = [GeneratorConfig(kind=k, base_model=b, weights=w) for k, b, w in trained]
    if evaluate_baseline:
        bases = dict.fromkeys(b for k, b, _ in trained if k == "consistentid")
        runs += [GeneratorConfig(kind="text-only", base_model=b) for b in bases]
    for generator in runs:
        options = (generator_options or {}).get(generator.kind, {})
        generator = generator.model_copy(update={"options": options})
        sub = generator.kind if generator.kind != "text-only" else "text-only-baseline"
        config = evaluation.model_copy(
            update={
                "dataset_url": out,
                "out_dir": storage.join(evaluation.out_dir, sub),
                "generator": generator,
            }
        )
        logger.info("evaluating %s into %s", generator.kind, config.out_dir)
        results[f"evaluate_{sub.replace('-', '_')}"] = evaluate(config=config)
    return results


def _check_before_build(build_config, consistentid, faceclip_align, faceclip_sdxl, evaluation):
    """What can be known before the build: every weight the later stages load (not those the
    run itself will write), and whether ConsistentID can use the set's embeddings."""
    from fgid.weights import MissingWeights, Weight
    from training import weights

    models = (build_config or BuildConfig()).models
    if consistentid is not None and consistentid.id_dim is None and models.set == "lite":
        raise DatasetUnusable(
            f"ConsistentID needs {CONSISTENTID_ID_DIM}-d ArcFace identity embeddings, which the "
            "lite set does not make: build with the full set, or set id_dim=128 in its config"
        )
    rows: list[Weight] = []
    if consistentid is not None:
        rows += weights.for_consistentid(consistentid)
    for config in (faceclip_align, faceclip_sdxl):
        if config is not None:
            rows += weights.faceclip_weights(
                config.stage, config.base_model, config.face_encoder, config.image_model, None,
                config.init_from_reference,
            )  # fmt: skip
    if evaluation is not None:
        m = evaluation.metrics
        kinds = {"consistentid": consistentid, "faceclip": faceclip_sdxl}
        for kind, trained in kinds.items():
            if trained is not None:
                sdxl = kind == "consistentid" and trained.variant == "sdxl"
                rows += weights.evaluation_weights(
                    kind, trained.base_model, None, m.clip, m.dino, m.fid, m.faces, sdxl=sdxl
                )
    missing = [w.missing() for w in weights.merged(rows) if not w.present and not w.note]
    if missing:
        raise MissingWeights(missing)
