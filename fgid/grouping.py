"""Identity grouping and near-duplicate flags from face embeddings.

Clustering is a deterministic leader algorithm over samples in plan order: each face joins the
identity whose centroid is nearest if that distance is within the threshold, otherwise it
starts a new identity. The same set of embeddings always gives the same identities, whichever
shard or worker produced them, because it runs once over all shards at finalize time.

Thresholds (GroupConfig documents and overrides them):
- dlib 128-d descriptors: euclidean 0.6 — dlib's own "same person" threshold (99.38% on LFW).
- ArcFace 512-d normed embeddings: cosine distance 0.6 (similarity 0.4), a common operating point
  for buffalo_l verification; near duplicates at cosine distance 0.05.
"""

from __future__ import annotations

import numpy as np

DEFAULTS = {
    # embedding dim -> (metric, identity threshold, near-duplicate threshold)
    128: ("euclidean", 0.6, 0.15),
    512: ("cosine", 0.6, 0.05),
}


def resolve(dim: int, metric: str | None, threshold: float | None, near: float | None):
    """Fill unset settings from the defaults for this embedding size (0.0 is a setting)."""
    default = DEFAULTS.get(dim, ("cosine", 0.6, 0.05))
    return (
        default[0] if metric is None else metric,
        default[1] if threshold is None else threshold,
        default[2] if near is None else near,
    )


def distances(vectors: np.ndarray, points: np.ndarray, metric: str) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) distances."""
    if metric == "cosine":
        a = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        b = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
        return 1.0 - a @ b.T
    sq = (vectors**2).sum(1)[:, None] + (points**2).sum(1)[None, :] - 2.0 * vectors @ points.T
    return np.sqrt(np.maximum(sq, 0.0))


def cluster(embeddings: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    """Leader clustering in row order -> identity per row (0, 1, ... in order of first use)."""
    n = len(embeddings)
    labels = np.empty(n, dtype=np.int64)
    sums = np.zeros((0, embeddings.shape[1]), dtype=np.float64)
    counts = np.zeros(0, dtype=np.int64)
    for i, vector in enumerate(embeddings.astype(np.float64)):
        if len(counts):
            centroids = sums / counts[:, None]
            dist = distances(vector[None, :], centroids, metric)[0]
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


def near_duplicates(
    embeddings: np.ndarray, identities: np.ndarray, metric: str, threshold: float
) -> np.ndarray:
    """Index of the earliest earlier row of the same identity within `threshold`, else -1."""
    result = np.full(len(embeddings), -1, dtype=np.int64)
    for identity in np.unique(identities):
        members = np.flatnonzero(identities == identity)
        if len(members) < 2:
            continue
        dist = distances(embeddings[members], embeddings[members], metric)
        for pos in range(1, len(members)):
            close = np.flatnonzero(dist[pos, :pos] <= threshold)
            if len(close):
                result[members[pos]] = members[close[0]]
    return result
