"""An evaluation run end to end: the text-only baseline on a tiny SD 1.5 over references from a real
lite build; tables written, reruns resume image by image. Files in the released ConsistentID and
FaceCLIP-SDXL formats evaluated as they are, and runs put side by side in one table."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting:
    """A real generator, recording which images it was asked to make."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.calls = inner, inner.name, []

    def generate(self, reference, prompt, seed):
        self.calls.append((reference.key, prompt))
        return self.inner.generate(reference, prompt, seed)


@pytest.fixture(scope="module")
def baseline(tiny_sd15):
    from training.evaluation.baseline import TextOnlyGenerator

    return TextOnlyGenerator.from_pretrained(str(tiny_sd15), device="cpu", steps=2)


@pytest.fixture(scope="module")
def metric_models(tiny_clip, tiny_dino, lite_models):
    from training.evaluation.backbones import ClipScorer, DinoScorer
    from training.evaluation.facenet import FaceNetScorer, load_facenet
    from training.evaluation.faces import FaceAnalyzer
    from training.evaluation.fid import DinoFeatures
    from training.evaluation.metrics import MetricModels

    dino = DinoScorer.from_pretrained(str(tiny_dino), device="cpu")
    clip = ClipScorer.from_pretrained(str(tiny_clip), device="cpu")
    return MetricModels(
        clip, dino, FaceAnalyzer(lite_models), DinoFeatures(dino), FaceNetScorer(load_facenet(None))
    )


def test_baseline_implements_the_generator_protocol(baseline, built_dataset):
    from training.evaluation.protocols import Generator
    from training.reference import load_references

    assert isinstance(baseline, Generator)
    (ref,) = load_references(str(built_dataset), identities=1)
    first = baseline.generate(ref, "a woman on the beach", seed=3)
    assert first.size == (16, 16)  # tiny UNet sample size 8 x VAE factor 2
    assert first.tobytes() == baseline.generate(ref, "a woman on the beach", seed=3).tobytes()
    assert first.tobytes() != baseline.generate(ref, "a woman on the beach", seed=4).tobytes()


def test_evaluate_writes_tables_and_resumes(baseline, metric_models, built_dataset, tmp_path):
    from training.evaluation.prompts import class_word, load_prompts
    from training.evaluation.run import ImageRecordMismatch, evaluate
    from training.reference import load_references

    references = load_references(str(built_dataset), identities=2)
    prompts = load_prompts(categories=["clothing", "style"], per_category=1)
    out = tmp_path / "eval"
    generator = Counting(baseline)
    result = evaluate(generator, references, prompts, metric_models, str(out), batch_size=3)

    assert result.generated == 4 and result.reused == 0
    assert sorted(generator.calls) == sorted(
        (r.key, p.text(class_word(r.gender))) for r in references for p in prompts
    )
    rows = pq.read_table(out / "per_image.parquet").to_pylist()
    assert [(r["key"], r["prompt_index"]) for r in rows] == [
        (ref.key, p.index) for ref in references for p in prompts
    ]
    pairs = [(ref, p) for ref in references for p in prompts]
    for row, (ref, prompt) in zip(rows, pairs, strict=True):
        assert row["identity"] == ref.identity and row["generator"] == "sd-text-only"
        assert row["class_word"] == class_word(ref.gender) in ("man", "woman")
        assert (
            row["prompt"] == prompt.text(row["class_word"]) and row["category"] == prompt.category
        )
        assert (out / row["image"]).is_file() and row["seconds"] > 0
        # 16x16 images from an untrained UNet hold no face: identity scores are 0 by rule.
        assert not row["face_found"] and row["face_sim"] == 0 and row["fgis"] == 0
        assert -100 <= row["clip_t"] <= 100 and -100 <= row["clip_i"] <= 100
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert [(s["category"], s["images"]) for s in summary] == [
        ("all", 4),
        ("clothing", 2),
        ("style", 2),
    ]
    overall = summary[0]
    assert overall["clip_t"] == pytest.approx(sum(r["clip_t"] for r in rows) / 4)
    assert overall["seconds_per_image"] == pytest.approx(sum(r["seconds"] for r in rows) / 4)
    assert math.isfinite(overall["fid"]) and overall["fid"] > 0
    assert "| all | 4 |" in (out / "summary.md").read_text()

    # A rerun generates nothing and reproduces the tables.
    again_gen = Counting(baseline)
    again = evaluate(again_gen, references, prompts, metric_models, str(out), batch_size=3)
    assert again_gen.calls == [] and again.reused == 4 and again.generated == 0
    assert pq.read_table(out / "per_image.parquet").to_pylist() == rows

    # An image whose record was lost (a crash between image and record) is made again, and
    # the same seed makes the same image.
    lost = out / rows[1]["image"]
    before = lost.read_bytes()
    lost.with_suffix(".json").unlink()
    third = Counting(baseline)
    evaluate(third, references, prompts, metric_models, str(out), batch_size=3)
    assert third.calls == [(rows[1]["key"], rows[1]["prompt"])]
    assert lost.read_bytes() == before

    # Another seed into the same folder would mix two runs: refused.
    with pytest.raises(ImageRecordMismatch, match="another folder"):
        evaluate(Counting(baseline), references, prompts, metric_models, str(out), seed=1)


def test_run_evaluation_from_a_config(built_dataset, tiny_sd15, tiny_clip, tiny_dino, tmp_path):
    from training.evaluation.config import EvaluateConfig
    from training.evaluation.run import read_summary, run_evaluation

    config = EvaluateConfig(
        dataset_url=str(built_dataset),
        out_dir=str(tmp_path / "run"),
        generator={"base_model": str(tiny_sd15), "options": {"device": "cpu", "steps": 1}},
        metrics={
            "clip": str(tiny_clip),
            "dino": str(tiny_dino),
            "faces": {"set": "lite"},
            "fid": "dino",
            "device": "cpu",
        },
        identities=1,
        categories=["background"],
        per_category=2,
    )
    result = run_evaluation(config)
    assert [r["prompt_index"] for r in result.per_image] == [10, 11]
    assert repr(read_summary(config.out_dir)) == repr(result.summary)  # NaN FID: one reference
    assert [s["category"] for s in result.summary] == ["all", "background"]


# -- a released checkpoint evaluated directly, and several runs in one table ------------------

SAMPLING = {"device": "cpu", "steps": 2, "merge_step": 1, "height": 32, "width": 32}


def _config(dataset, out, **generator):
    from training.evaluation.config import EvaluateConfig

    return EvaluateConfig(
        dataset_url=str(dataset),
        out_dir=str(out),
        generator=generator,
        identities=2,
        categories=["clothing", "style"],
        per_category=1,
    )


@pytest.fixture(scope="module")
def released(tiny_sd15, built_dataset, metric_models, tmp_path_factory):
    """A tiny ConsistentID written as the released dict (image_proj, adapter_modules,
    FacialEncoder) and evaluated from that file: (model, generator, result)."""
    import torch

    from training.consistentid.config import ModelOptions
    from training.consistentid.convert import to_reference
    from training.consistentid.model import ConsistentID
    from training.evaluation.config import load_generator
    from training.evaluation.run import run_evaluation

    torch.manual_seed(0)
    # dim_head stays the release's 64, which its shapes do not record; id_dim is the build's.
    options = ModelOptions(lora_rank=4, id_depth=1, facial_depth=1)
    model = ConsistentID.from_pretrained(str(tiny_sd15), 128, options=options)
    with torch.no_grad():  # LoRA ups start at zero: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("released")
    torch.save(to_reference(model.state_dict()), folder / "ConsistentID-v1.bin")
    config = _config(
        built_dataset, folder / "eval-cid-release", kind="consistentid",
        base_model=str(tiny_sd15), weights=str(folder / "ConsistentID-v1.bin"), options=SAMPLING,
    )  # fmt: skip
    generator = load_generator(config.generator)
    return model, generator, run_evaluation(config, generator, metric_models)


@pytest.fixture(scope="module")
def baseline_run(baseline, built_dataset, metric_models, tmp_path_factory):
    from training.evaluation.run import run_evaluation

    out = tmp_path_factory.mktemp("eval") / "eval-text-only"
    return run_evaluation(_config(built_dataset, out), baseline, metric_models)


def assert_same_weights(loaded: dict, expected: dict) -> None:
    import torch

    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def assert_evaluated_release(result, name: str) -> None:
    """Four images drawn (two prompt categories, two people), all by `name`, CLIP-T in range."""
    assert result.generated == 4 and result.reused == 0
    assert {r["generator"] for r in result.per_image} == {name}
    assert [(s["category"], s["images"]) for s in result.summary] == [
        ("all", 4),
        ("clothing", 2),
        ("style", 2),
    ]
    for row in result.per_image:
        assert -100 <= row["clip_t"] <= 100 and row["seconds"] > 0


def test_a_released_consistentid_file_is_evaluated_as_it_is(released):
    model, generator, result = released
    assert generator.name == "consistentid-release"
    assert_same_weights(generator.model.state_dict(), model.state_dict())  # the file's weights
    assert_evaluated_release(result, "consistentid-release")


def assert_side_by_side(release, ours, named: tuple[str, str]) -> None:
    """compare_runs puts a release's run (folder and generator `named`) and the text-only one
    in one table, each row with its run's own summary values."""
    from training.evaluation.compare import compare_runs
    from training.evaluation.run import SUMMARY_COLUMNS

    table = compare_runs([release.out_dir, ours.out_dir])
    assert table.notes == []  # the same references, prompts, seed and metric models
    assert [(r["run"], r["generator"], r["images"]) for r in table.rows] == [
        (*named, 4),
        ("eval-text-only", "sd-text-only", 4),
    ]
    for row, run in zip(table.rows, (release, ours), strict=True):
        assert repr([row[c] for c in SUMMARY_COLUMNS]) == repr(
            [run.row()[c] for c in SUMMARY_COLUMNS]
        )  # repr: NaN (no FaceNet here) equals NaN


def test_runs_side_by_side_in_one_table(released, baseline_run, tmp_path, capsys):
    from flows.cli import app
    from flows.cli_common import run_cli
    from training.evaluation.compare import compare_runs

    (_, _, release), ours = released, baseline_run
    assert_side_by_side(release, ours, ("eval-cid-release", "consistentid-release"))
    style = compare_runs([release.out_dir, ours.out_dir], category="style")
    assert [r["images"] for r in style.rows] == [2, 2]
    assert style.rows[0]["clip_t"] == release.row("style")["clip_t"]

    md, csv_file, parquet = (tmp_path / f"table.{x}" for x in ("md", "csv", "parquet"))
    for out in (md, csv_file, parquet):
        code = run_cli(app, ["evaluate-table", release.out_dir, ours.out_dir, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
    shown = capsys.readouterr().out
    for name in ("eval-cid-release", "sd-text-only", "CLIP-T", "FaceSim-ArcFace", "s/image"):
        assert name in shown
    lines = md.read_text().splitlines()
    assert lines[2].startswith("| run | generator | images | CLIP-T | CLIP-I | DINO | FaceSim |")
    assert lines[4].startswith("| eval-cid-release | consistentid-release | 4 |")
    assert f"| {release.row()['clip_t']:.1f} |" in lines[4]
    import csv

    rows = list(csv.DictReader(csv_file.open()))
    assert [r["generator"] for r in rows] == ["consistentid-release", "sd-text-only"]
    assert float(rows[1]["clip_i"]) == ours.row()["clip_i"]
    assert pq.read_table(parquet).to_pylist()[1]["fid"] == ours.row()["fid"]


def test_a_table_names_what_makes_runs_incomparable(
    baseline, baseline_run, metric_models, built_dataset, tmp_path, capsys
):
    import csv

    from flows.cli import app
    from flows.cli_common import run_cli
    from training.evaluation.compare import compare_runs
    from training.evaluation.prompts import load_prompts
    from training.evaluation.run import evaluate
    from training.reference import load_references

    other = tmp_path / "eval-seed-1"
    references = load_references(str(built_dataset), identities=1)
    prompts = load_prompts(categories=["style"], per_category=1)
    evaluate(baseline, references, prompts, metric_models, str(other), seed=1)
    table = compare_runs([baseline_run.out_dir, str(other)])
    assert table.notes == [
        "eval-seed-1 drew other images than eval-text-only (1 and 4, 1 in common): "
        "other references or prompts",
        "eval-seed-1 used seed 1, eval-text-only seed 0",
    ]
    out = tmp_path / "table.csv"
    assert run_cli(app, ["evaluate-table", baseline_run.out_dir, str(other), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not comparable: eval-seed-1 used seed 1" in err
    assert math.isnan(table.rows[1]["fid"])  # one reference: no FID, an empty cell
    assert [r["fid"] for r in csv.DictReader(out.open())][1] == ""

    (tmp_path / "plain").mkdir()
    (tmp_path / "half" / "images").mkdir(parents=True)
    mistakes = {
        "not an fgid evaluate output: no evaluation.json": [str(tmp_path / "plain")],
        "its images are there: rerun": [str(tmp_path / "half")],
        "no such folder": [str(tmp_path / "nowhere")],
        "given more than once": [str(other), str(other)],
        "has no 'clothing' prompts (it has all, style)": [str(other), "--category", "clothing"],
        "write the table as .md, .csv, .parquet": [str(other), "--out", str(tmp_path / "t.txt")],
    }
    for expected, args in mistakes.items():
        assert run_cli(app, ["evaluate-table", *args]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "t.txt").exists()


# -- a released FaceCLIP-SDXL (face_clip_encoder.pt + unet.pt) evaluated as it is --------------


@pytest.fixture(scope="module")
def released_faceclip(tiny_sdxl, built_dataset, metric_models, tmp_path_factory):
    """A tiny FaceCLIP-SDXL written in the release's hub layout (`model/face_clip_encoder.pt`, the
    reference wrapper's keys with its `model.` prefix, and `model/unet.pt`, a diffusers UNet state
    dict) and evaluated from that folder: (encoder file's state, UNet file's state, generator,
    result)."""
    import torch
    from diffusers import UNet2DConditionModel

    from training.evaluation.config import load_generator
    from training.evaluation.run import run_evaluation
    from training.faceclip.config import EncoderConfig
    from training.faceclip.convert import to_reference
    from training.faceclip.encoder import FaceCLIPEncoder

    torch.manual_seed(0)
    architecture = EncoderConfig.tiny()  # open_clip text towers built here, no weights fetched
    encoder = FaceCLIPEncoder.build(architecture)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sdxl), subfolder="unet")
    with torch.no_grad():  # away from both initial states: every tensor must come from the files
        for p in [*encoder.parameters(), *unet.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    model = tmp_path_factory.mktemp("faceclip-release") / "model"
    model.mkdir()
    encoder_state = {f"model.{k}": v for k, v in to_reference(encoder.state_dict()).items()}
    unet_state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    torch.save(encoder_state, model / "face_clip_encoder.pt")
    torch.save(unet_state, model / "unet.pt")
    # The file does not record its (tiny) architecture: the generator is told it.
    tiny = architecture.model_dump(include={"towers", "face_vit", "fuser"})
    options = {"device": "cpu", "steps": 2, "height": 48, "width": 32, "architecture": tiny}
    config = _config(
        built_dataset, model.parent / "eval-fc-release", kind="faceclip",
        base_model=str(tiny_sdxl), weights=str(model.parent), options=options,
    )  # fmt: skip
    generator = load_generator(config.generator)
    return encoder_state, unet_state, generator, run_evaluation(config, generator, metric_models)


def test_a_released_faceclip_sdxl_folder_is_evaluated_as_it_is(released_faceclip):
    from training.faceclip.convert import to_reference
    from training.faceclip.pipeline import FaceCLIPGenerator

    encoder_file, unet_file, generator, result = released_faceclip
    assert isinstance(generator, FaceCLIPGenerator) and generator.name == "faceclip-sdxl-release"
    # Every tensor of both files, and nothing else, is in the generator (strict loads).
    encoder = {f"model.{k}": v for k, v in to_reference(generator.encoder.state_dict()).items()}
    assert_same_weights(encoder, encoder_file)
    assert_same_weights(generator.pipeline.unet.state_dict(), unet_file)
    assert_evaluated_release(result, "faceclip-sdxl-release")


def test_a_released_faceclip_file_missing_a_tensor_is_refused(
    released_faceclip, tiny_sdxl, tmp_path
):
    import torch

    from training.evaluation.config import GeneratorConfig, load_generator
    from training.faceclip.config import EncoderConfig

    encoder_file, *_ = released_faceclip
    broken = dict(encoder_file)
    del broken["model.face_clip_g.fuser.encoder.layers.1.norm2.bias"]
    torch.save(broken, tmp_path / "face_clip_encoder.pt")
    architecture = EncoderConfig.tiny().model_dump(include={"towers", "face_vit", "fuser"})
    config = GeneratorConfig(
        kind="faceclip",
        base_model=str(tiny_sdxl),
        weights=str(tmp_path / "face_clip_encoder.pt"),  # the file itself; no unet.pt beside it
        options={"device": "cpu", "architecture": architecture},
    )
    with pytest.raises(ValueError, match="1 missing"):
        load_generator(config)


def test_a_released_faceclip_run_goes_into_one_table(
    released_faceclip, baseline_run, tmp_path, capsys
):
    from flows.cli import app
    from flows.cli_common import run_cli

    *_, release = released_faceclip
    assert_side_by_side(release, baseline_run, ("eval-fc-release", "faceclip-sdxl-release"))

    md = tmp_path / "table.md"
    code = run_cli(app, ["evaluate-table", release.out_dir, baseline_run.out_dir, "--out", str(md)])
    assert code == 0, capsys.readouterr().err
    assert "faceclip-sdxl-release" in capsys.readouterr().out
    lines = md.read_text().splitlines()
    assert lines[4].startswith("| eval-fc-release | faceclip-sdxl-release | 4 |")
    assert f"| {release.row()['clip_t']:.1f} |" in lines[4]


def test_the_text_only_baseline_of_an_sdxl_base_draws_with_sdxl(tiny_sdxl):
    """An SDXL ConsistentID's comparison row: the same base drawing the prompt alone, with the
    SDXL generator's sampler and guidance, not an SD 1.5 pipeline (which cannot load it)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from training.evaluation.baseline import TextOnlyGenerator

    sdxl = TextOnlyGenerator.from_pretrained(
        str(tiny_sdxl), device="cpu", steps=2, height=64, width=64
    )
    assert isinstance(sdxl.pipeline, StableDiffusionXLPipeline)
    assert isinstance(sdxl.pipeline.scheduler, EulerDiscreteScheduler)
    assert (sdxl.name, sdxl.guidance_scale) == ("sdxl-text-only", 7.5)
    first = sdxl.generate(None, "a photo of a person", seed=3)
    assert first.size == (64, 64)
    again = sdxl.generate(None, "a photo of a person", seed=3)
    other = sdxl.generate(None, "a painting of a person", seed=3)
    assert np.array_equal(np.asarray(first), np.asarray(again))  # the seed fixes the image
    assert not np.array_equal(np.asarray(first), np.asarray(other))  # the prompt is drawn
