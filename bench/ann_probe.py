"""How well approximate searches find a face's own identity among many: the evidence behind the
grouping's search (fgid.grouping, fgid.ann). Prints figures; asserts nothing.

The faces are the scale bench's synthetic ones (bench.scale_bench: random unit identity centres,
a face at cosine about 0.74 to its centre, two faces of one person at about 0.55). The table
holds one running centroid per identity, the mean of `--members` faces (1 is the hardest case,
the second face of a person meeting the first); each query is a fresh face of a random identity.
A leader clustering that misses the query's own centroid splits that person, so what matters is
recall@16 (own centroid among the 16 returned), against the share of the table each query reads.

Methods: the exact float search; the 512-bit sign codes fgid uses above 50k faces; IVF-flat
(k-means lists, probes); HNSW graphs; cross-polytope LSH (one hash per table: the bucket's
collision probability for a same-person pair and for a random pair, and the tables needed for
99.9% recall with the share of the table they read).

Run:  uv run python -m bench.ann_probe [--centroids 200000] [--members 1] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from bench.scale_bench import DIM, NOISE
from fgid.ann import HammingTable

K = 16


def faces(centres: np.ndarray, rows: np.ndarray, rng) -> np.ndarray:
    noise = rng.standard_normal((len(rows), DIM), dtype=np.float32) * (NOISE / np.sqrt(DIM))
    return centres[rows] + noise


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float((found == truth[:, None]).any(1).mean())


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def line(method: str, found, truth, seconds: float, scanned: float, **extra) -> None:
    print(json.dumps({
        "method": method, "recall_at_16": round(recall(found, truth), 4),
        "table_share_read": None if scanned is None else round(scanned, 4),
        "ms_per_1000_queries": round(1000 * seconds * 1000 / len(truth), 1), **extra,
    }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--centroids", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=1, help="faces per centroid")
    parser.add_argument("--queries", type=int, default=2_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.centroids
    centres = unit(rng.standard_normal((n, DIM), dtype=np.float32))
    sums = sum(faces(centres, np.arange(n), rng) for _ in range(args.members))
    table = unit(sums).astype(np.float32)
    truth = rng.integers(0, n, args.queries)
    queries = unit(faces(centres, truth, rng)).astype(np.float32)
    cosine = float((queries * table[truth]).sum(1).mean())
    print(json.dumps({"centroids": n, "members": args.members, "queries": args.queries,
                      "cosine_to_own_centroid": round(cosine, 3)}), flush=True)  # fmt: skip

    (_, found), seconds = timed(lambda: faiss.knn(queries, table, K, faiss.METRIC_INNER_PRODUCT))
    line("exact float", found, truth, seconds, 1.0)

    codes = HammingTable(DIM)
    codes.set(np.arange(n), table)
    found, seconds = timed(lambda: codes.search(queries, K))
    line("sign codes, 512 bits", found, truth, seconds, 1.0)

    lists = 1024
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, lists, faiss.METRIC_INNER_PRODUCT)
    ivf.train(table[rng.choice(n, min(n, 64 * lists), replace=False)])
    ivf.add(table)
    for probes in (16, 64, 256):
        ivf.nprobe = probes
        (_, found), seconds = timed(lambda: ivf.search(queries, K))
        line(f"IVF-flat {lists} lists", found, truth, seconds, probes / lists, probes=probes)

    graph = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    _, build = timed(lambda: graph.add(table))
    for ef in (64, 256, 1024):
        graph.hnsw.efSearch = ef
        (_, found), seconds = timed(lambda: graph.search(queries, K))
        line("HNSW M=32", found, truth, seconds, None, ef_search=ef, build_s=round(build))

    for rotated in (64, 256):
        planes = rng.standard_normal((DIM, rotated)).astype(np.float32)

        def bucket(x, planes=planes):
            y = x @ planes
            top = np.abs(y).argmax(1)
            return 2 * top + (y[np.arange(len(y)), top] > 0)

        mine = bucket(queries) == bucket(table[truth])
        other = bucket(queries) == bucket(table[rng.integers(0, n, len(queries))])
        p1, p2 = float(mine.mean()), max(float(other.mean()), 1 / (2 * rotated))
        tables = int(np.ceil(np.log(1e-3) / np.log(1 - p1))) if 0 < p1 < 1 else None
        print(json.dumps({
            "method": f"cross-polytope LSH, {2 * rotated} buckets", "p_same_person": round(p1, 4),
            "p_random": round(p2, 4), "tables_for_99.9pct": tables,
            "table_share_read": round(min(1.0, (tables or 0) * p2), 3),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
