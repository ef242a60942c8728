"""An evaluation run end to end: the text-only baseline on a tiny SD 1.5 over references from a real
lite build; tables written, reruns resume image by image."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest


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
