"""Identity grouping: copies of one person join one identity, different people stay apart."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.scale_bench import synthetic_faces
from fgid import ann, grouping
from fgid.finalize import read_index
from fgid.pipeline import build
from tests.corpus import make_identity_corpus


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("people")
    return folder, make_identity_corpus(folder)


@pytest.fixture(scope="module")
def grouped(photos, lite_config, lite_models, tmp_path_factory):
    folder, people = photos
    out = tmp_path_factory.mktemp("grouped")
    summary = build([str(folder)], out, lite_config, models=lite_models)
    index = {row["key"]: row for row in read_index(out).to_pylist()}
    identities = pq.read_table(out / "identities.parquet").to_pylist()
    rows = {Path(index[r["key"]]["source"]).name: r for r in identities}
    return summary, rows, people, index


def identity_of(rows: dict[str, dict], people: dict[str, str], person: str) -> set[str]:
    return {rows[name]["identity"] for name, who in people.items() if who == person}


def test_every_photo_is_kept(grouped):
    summary, rows, people, _ = grouped
    assert set(rows) == set(people)
    assert summary["rejected"] == 0 and summary["shards"]["done"] >= 3


def test_copies_of_one_person_share_one_identity(grouped):
    _, rows, people, _ = grouped
    for person in set(people.values()):
        assert len(identity_of(rows, people, person)) == 1, person


def test_different_people_get_different_identities(grouped):
    _, rows, people, _ = grouped
    persons = sorted(set(people.values()))
    assert len(persons) == 5
    ids = [identity_of(rows, people, p).pop() for p in persons]
    assert len(set(ids)) == len(persons)
    for name, row in rows.items():
        assert row["identity"].startswith("cluster-") and row["identity_source"] == "cluster"
        same = sum(1 for who in people.values() if who == people[name])
        assert row["identity_size"] == same


def test_exact_copy_is_flagged_duplicate(grouped):
    _, rows, _, _ = grouped
    assert rows["hopper_9_copy.jpg"]["duplicate_of"] == rows["hopper_0_original.jpg"]["key"]
    assert rows["hopper_9_copy.jpg"]["near_duplicate_of"] is None
    flagged = [name for name, row in rows.items() if row["duplicate_of"]]
    assert flagged == ["hopper_9_copy.jpg"]


def test_near_duplicates_point_at_an_earlier_photo_of_the_same_identity(grouped):
    _, rows, _, index = grouped
    by_key = {row["key"]: (name, row) for name, row in rows.items()}
    order = list(index)  # index order is plan order
    assert any(row["near_duplicate_of"] for row in rows.values())
    for row in rows.values():
        target = row["near_duplicate_of"]
        if target:
            assert by_key[target][1]["identity"] == row["identity"]
            assert order.index(target) < order.index(row["key"])
            gap = np.linalg.norm(
                np.asarray(index[target]["embedding"]) - np.asarray(index[row["key"]]["embedding"])
            )
            assert gap <= grouping.DEFAULTS[128][2] + 1e-6


def test_summary_counts_recognizable_identities(grouped):
    summary, rows, _, _ = grouped
    distinct = Counter(
        r["identity"] for r in rows.values() if not r["duplicate_of"] and not r["near_duplicate_of"]
    )
    stats = summary["identities"]
    assert stats["total"] == len(distinct) == 5
    # Astronaut and Hopper have several distinct photos; each group-photo person has one.
    assert stats["recognizable"] == sum(1 for n in distinct.values() if n >= 2) == 2
    assert stats["images_in_recognizable"] == sum(n for n in distinct.values() if n >= 2)
    assert stats["from_labels"] == 0
    assert summary["duplicates"]["exact"] == 1
    assert summary["duplicates"]["near"] == sum(1 for r in rows.values() if r["near_duplicate_of"])


def test_labels_file_sets_identities(photos, lite_config, lite_models, tmp_path):
    folder, _ = photos
    inputs = tmp_path / "celeba"
    inputs.mkdir()
    chosen = {
        "000001.jpg": ("astronaut_1_flip.jpg", "101"),
        "000002.jpg": ("hopper_0_original.jpg", "202"),
        "000003.jpg": ("astronaut_2_bright.jpg", "101"),
        # Labels win over faces: a different person with label 101 is identity 101.
        "000004.jpg": ("group_person_a.jpg", "101"),
        "000005.jpg": ("hopper_1_flip.jpg", None),  # not in the labels file: clustered
    }
    lines = []
    for name, (source, label) in chosen.items():
        (inputs / name).write_bytes((folder / source).read_bytes())
        if label:
            lines.append(f"{name} {label}")
    labels = tmp_path / "identity_CelebA.txt"
    labels.write_text("\n".join(lines) + "\n")
    config = lite_config.model_copy(update={"labels": str(labels)})

    out = tmp_path / "out"
    summary = build([str(inputs)], out, config, models=lite_models)
    index = {row["key"]: row for row in read_index(out).to_pylist()}
    rows = {
        Path(index[r["key"]]["source"]).name: r
        for r in pq.read_table(out / "identities.parquet").to_pylist()
    }
    assert set(rows) == set(chosen)
    for name, (_, label) in chosen.items():
        row = rows[name]
        if label:
            assert row["identity"] == f"label-{label}" and row["identity_source"] == "label"
            assert index[row["key"]]["label"] == label
        else:
            assert row["identity"].startswith("cluster-") and row["identity_source"] == "cluster"
            assert index[row["key"]]["label"] is None
    assert rows["000001.jpg"]["identity_size"] == 3
    assert summary["identities"]["from_labels"] == 2


# Unit tests of the clustering itself, on synthetic embeddings.


def blobs(seed: int = 0) -> np.ndarray:
    """Three well-separated groups of four 128-d points, interleaved."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 128))
    centres *= 3.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[np.tile([0, 1, 2], 4)] + rng.normal(scale=0.01, size=(12, 128))
    return points.astype(np.float32)


def test_cluster_is_deterministic_and_numbered_in_order_of_first_use():
    points = blobs()
    first = grouping.cluster(points, "euclidean", 0.6)
    assert np.array_equal(first, grouping.cluster(points.copy(), "euclidean", 0.6))
    assert first.tolist() == [0, 1, 2] * 4


def test_cluster_partition_does_not_depend_on_input_order():
    points = blobs()
    order = np.random.default_rng(1).permutation(len(points))
    shuffled = grouping.cluster(points[order], "euclidean", 0.6)
    base = grouping.cluster(points, "euclidean", 0.6)
    # Same groups; numbers follow the first appearance in the new order.
    assert {frozenset(order[shuffled == c]) for c in set(shuffled)} == {
        frozenset(np.flatnonzero(base == c)) for c in set(base)
    }
    seen = list(dict.fromkeys(shuffled.tolist()))
    assert seen == list(range(3))


def test_cluster_threshold_is_inclusive_and_respected():
    points = np.array([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]], dtype=np.float32)
    assert grouping.cluster(points, "euclidean", 0.5).tolist() == [0, 0, 1]
    assert grouping.cluster(points, "euclidean", 0.49).tolist() == [0, 1, 2]
    assert grouping.cluster(points, "euclidean", 5.0).tolist() == [0, 0, 0]


def test_cluster_compares_with_the_running_centroid():
    # 0.0 and 1.0 join (threshold 1); their centroid 0.5 is within 1 of 1.4, so 1.4 joins too,
    # though it is 1.4 from the first point.
    points = np.array([[0.0], [1.0], [1.4]], dtype=np.float32)
    assert grouping.cluster(points, "euclidean", 1.0).tolist() == [0, 0, 0]


def test_cosine_clustering_ignores_length():
    points = np.array([[1.0, 0.0], [5.0, 0.1], [0.0, 2.0], [0.1, 9.0]], dtype=np.float32)
    assert grouping.cluster(points, "cosine", 0.05).tolist() == [0, 0, 1, 1]


def test_cluster_of_nothing_is_empty():
    assert grouping.cluster(np.zeros((0, 128), np.float32), "euclidean", 0.6).tolist() == []


def test_near_duplicates_point_at_the_earliest_close_row_of_the_same_identity():
    points = np.array([[0.0], [0.05], [0.1], [3.0], [0.02]], dtype=np.float32)
    identities = np.array([0, 0, 0, 1, 2])
    near = grouping.near_duplicates(points, identities, "euclidean", 0.06)
    # Row 4 is close to row 0 but belongs to another identity: not a duplicate.
    assert near.tolist() == [-1, 0, 1, -1, -1]


def test_resolve_defaults_by_dimension_and_keeps_explicit_zero():
    assert grouping.resolve(128, None, None, None) == ("euclidean", 0.6, 0.15)
    assert grouping.resolve(512, None, None, None) == ("cosine", 0.6, 0.05)
    assert grouping.resolve(128, "cosine", 0.3, 0.0) == ("cosine", 0.3, 0.0)


# The scalable algorithm against today's exact one (kept here, for checking only).


def group_exact(embeddings: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    """Leader clustering as first written: every sample against every running centroid."""
    labels = np.empty(len(embeddings), dtype=np.int64)
    sums = np.zeros((0, embeddings.shape[1]), dtype=np.float64)
    counts = np.zeros(0, dtype=np.int64)
    for i, vector in enumerate(embeddings.astype(np.float64)):
        if len(counts):
            dist = grouping.distances(vector[None, :], sums / counts[:, None], metric)[0]
            best = int(np.argmin(dist))
            if dist[best] <= threshold:
                labels[i] = best
                sums[best] += vector
                counts[best] += 1
                continue
        labels[i] = len(counts)
        sums = np.vstack([sums, vector[None, :]])
        counts = np.append(counts, 1)
    return labels


def near_exact(embeddings, identities, metric, threshold) -> np.ndarray:
    result = np.full(len(embeddings), -1, dtype=np.int64)
    for identity in np.unique(identities):
        members = np.flatnonzero(identities == identity)
        dist = grouping.distances(embeddings[members], embeddings[members], metric)
        for pos in range(1, len(members)):
            close = np.flatnonzero(dist[pos, :pos] <= threshold)
            if len(close):
                result[members[pos]] = members[close[0]]
    return result


def mixtures(seed: int):
    """Sets with merges, splits and near-threshold faces, for both metrics and several sizes."""
    rng = np.random.default_rng(seed)
    for metric, dim, noise in (("cosine", 512, 1.0), ("cosine", 64, 1.2), ("euclidean", 128, 0.3)):
        people, count = int(rng.integers(5, 200)), int(rng.integers(50, 900))
        centres = rng.normal(size=(people, dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        spread = noise * rng.normal(size=(count, dim)) / np.sqrt(dim)
        faces = centres[rng.integers(0, people, count)] + spread
        yield metric, faces.astype(np.float32)


@pytest.mark.parametrize("block, candidates", [(256, 16), (16, 2), (7, 1)])
def test_cluster_equals_the_exact_leader_algorithm(monkeypatch, block, candidates):
    # Tiny blocks and candidate lists force every path: in-block joins, the full-scan fallback.
    monkeypatch.setattr(grouping, "BLOCK", block)
    monkeypatch.setattr(grouping, "CANDIDATES", candidates)
    for metric, faces in mixtures(block):
        expected = group_exact(faces, metric, 0.6)
        assert 1 < len(set(expected)) < len(faces)
        assert grouping.cluster(faces, metric, 0.6).tolist() == expected.tolist()


@pytest.mark.parametrize("block, candidates", [(256, 16), (16, 2)])
def test_cluster_searched_with_torch_equals_the_exact_leader_algorithm(
    monkeypatch, block, candidates
):
    # The search a GPU without faiss's GPU build gets (ann.TorchTable), here on the CPU.
    monkeypatch.setattr(grouping, "BLOCK", block)
    monkeypatch.setattr(grouping, "CANDIDATES", candidates)
    made = []

    def torch_table(dim, inner_product, device="cpu"):
        made.append(ann.TorchTable(dim, inner_product, "cpu"))
        return made[-1]

    monkeypatch.setattr(ann, "exact_table", torch_table)
    for metric, faces in mixtures(block + 1):
        expected = group_exact(faces, metric, 0.6)
        assert grouping.cluster(faces, metric, 0.6).tolist() == expected.tolist()
    assert made and all(t.size > 1 for t in made)


@pytest.mark.parametrize("inner_product", [True, False])
def test_torch_table_finds_what_faiss_finds(inner_product, monkeypatch):
    monkeypatch.setattr(ann.TorchTable, "SLICE_ROWS", 700)  # merged across slices
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3000, 64)).astype(np.float32)
    queries = rng.normal(size=(100, 64)).astype(np.float32)
    tables = [ann.VectorTable(64, inner_product), ann.TorchTable(64, inner_product, "cpu")]
    for table in tables:  # written in two parts, growing, the second part rewritten once
        table.set(np.arange(2000), base[:2000])
        table.set(np.arange(1000, 3000), base[1000:])
    faiss_ids, torch_ids = (t.search(queries, 8) for t in tables)
    assert (faiss_ids == torch_ids).mean() > 0.99 and (torch_ids[:, 0] == faiss_ids[:, 0]).all()
    assert (tables[1].search(queries, 5000)[:, 3000:] == -1).all()


def test_a_big_clustering_searches_exactly_where_a_gpu_is(monkeypatch):
    monkeypatch.setattr(grouping, "EXACT_UP_TO", 100)
    faces, _ = synthetic_faces(60, 5, dim=64)
    exact = grouping.cluster(faces, "cosine", 0.6, exact=True, device="cpu")  # faiss
    seen = []
    monkeypatch.setattr(ann, "search_device", lambda spec: seen.append(spec) or "cuda:1")
    monkeypatch.setattr(ann, "exact_table", lambda d, ip, device: seen.append(device) or
                        ann.TorchTable(d, ip, "cpu"))  # fmt: skip
    assert grouping.cluster(faces, "cosine", 0.6).tolist() == exact.tolist()
    assert seen == ["auto", "cuda:1"]  # asked where, and searched there exactly
    seen.clear()
    grouping.cluster(faces, "cosine", 0.6, device="cpu")
    assert seen == []  # models.device=cpu: sign codes, never a GPU


def test_near_duplicates_equal_the_exact_search(monkeypatch):
    monkeypatch.setattr(grouping, "SMALL_GROUP", 4)  # small groups batched, larger looped
    rng = np.random.default_rng(3)
    faces = rng.normal(size=(600, 16)).astype(np.float32)
    faces[300:] = faces[:300] + rng.normal(scale=0.05, size=(300, 16)).astype(np.float32)
    identities = rng.integers(0, 40, 600)
    identities[300:] = identities[:300]
    for metric, threshold in (("euclidean", 0.25), ("cosine", 0.002)):
        expected = near_exact(faces, identities, metric, threshold)
        assert (expected >= 0).sum() > 100
        found = grouping.near_duplicates(faces, identities, metric, threshold)
        assert found.tolist() == expected.tolist()


def test_near_duplicates_in_a_huge_identity_use_a_knn_search(monkeypatch):
    monkeypatch.setattr(grouping, "EXACT_GROUP", 50)
    rng = np.random.default_rng(4)
    faces = rng.normal(size=(200, 32)).astype(np.float32)
    faces[100:] = faces[:100] + rng.normal(scale=0.01, size=(100, 32)).astype(np.float32)
    found = grouping.near_duplicates(faces, np.zeros(200, np.int64), "euclidean", 0.3)
    assert found[100:].tolist() == list(range(100)) and (found[:100] == -1).all()


def test_sign_code_search_agrees_with_exact_on_20k_faces():
    faces, truth = synthetic_faces(4000, 5, seed=7)
    exact = grouping.cluster(faces, "cosine", 0.6, exact=True)
    approx = grouping.cluster(faces, "cosine", 0.6, exact=False)
    rng = np.random.default_rng(8)
    a, b = rng.integers(0, len(faces), (2, 200_000))
    # Every same-identity pair of 1,000 identities.
    members = np.argsort(truth, kind="stable").reshape(4000, 5)[:1000]
    i, j = np.triu_indices(5, 1)
    same_a, same_b = members[:, i].ravel(), members[:, j].ravel()
    for p, q in ((a, b), (same_a, same_b)):
        agree = (exact[p] == exact[q]) == (approx[p] == approx[q])
        assert agree.mean() >= 0.99
    assert (exact[same_a] == exact[same_b]).mean() >= 0.99  # and exact finds the true people


def test_embeddings_too_big_for_memory_are_finalized_from_a_mapped_file(
    tmp_path, monkeypatch, caplog
):
    from bench.scale_bench import write_dataset
    from fgid import finalize
    from fgid.config import BuildConfig

    write_dataset(tmp_path / "ds", 3000, 1000)
    in_memory = finalize.finalize(str(tmp_path / "ds"), BuildConfig())
    held = (tmp_path / "ds" / "identities.parquet").read_bytes()
    # Past any share of the memory there is: spilled, whatever this machine has.
    monkeypatch.setattr(finalize, "SPILL_SHARE", 0.0)
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    with caplog.at_level(logging.INFO, logger="fgid.finalize"):
        mapped = finalize.finalize(str(tmp_path / "ds"), BuildConfig())
    assert "memory-mapped file" in caplog.text
    assert mapped == in_memory and mapped["identities"]["total"] == 600
    assert (tmp_path / "ds" / "identities.parquet").read_bytes() == held
    assert list(spill_root.iterdir()) == []  # the file goes with finalize


@pytest.mark.skipif(any(map(os.path.exists, ann.GPU_NODES)), reason="a GPU driver is here")
def test_finding_no_gpu_does_not_import_torch():
    code = (
        "import sys; from fgid import ann; print(ann.search_device('auto'), 'torch' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["cpu", "False"]


def test_memory_available_honours_a_container_limit(tmp_path, monkeypatch):
    from fgid import finalize

    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("1000000000\n")
    usage.write_text("400000000\n")
    monkeypatch.setattr(finalize, "CGROUP_MEMORY", ((str(limit), str(usage)),))
    assert finalize.memory_available() == 600_000_000
    limit.write_text("max\n")  # no limit: the machine's MemAvailable
    assert finalize.memory_available() > 600_000_000


def test_no_room_for_the_mapped_file_keeps_embeddings_in_memory(tmp_path, monkeypatch, caplog):
    # A full disk cannot be made here: the free space is what the check is told.
    import collections
    import shutil

    from bench.scale_bench import write_dataset
    from fgid import finalize
    from fgid.config import BuildConfig

    write_dataset(tmp_path / "ds", 500, 500)
    monkeypatch.setattr(finalize, "SPILL_SHARE", 0.0)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with caplog.at_level(logging.INFO, logger="fgid.finalize"):
        summary = finalize.finalize(str(tmp_path / "ds"), BuildConfig())
    assert "point TMPDIR at a disk with room" in caplog.text
    assert "memory-mapped file" not in caplog.text
    assert summary["samples"] == 500
