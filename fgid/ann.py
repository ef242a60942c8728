"""Nearest-neighbour search over a growing set of changing vectors (running centroids), by faiss."""

from __future__ import annotations

import contextlib

import faiss
import numpy as np

# Rows per storage chunk: a growing table never copies what it already holds.
CHUNK_ROWS = 65536
# Below this many multiply-adds a search runs on one thread: faiss's OpenMP threads spin-wait, and
# on a busy machine a small search took 6x longer on two threads than on one.
THREADED_FROM = 2e9


@contextlib.contextmanager
def one_thread(small: bool):
    before = faiss.omp_get_max_threads()
    if small:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu, whose module has no GPU functions)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class Rows:
    """A (n, width) array that grows in fixed chunks; rows are read by id and written in place."""

    def __init__(self, width: int, dtype=np.float64) -> None:
        self.width, self.dtype, self.chunks, self.size = width, dtype, [], 0

    def append(self, row: np.ndarray) -> int:
        if self.size == len(self.chunks) * CHUNK_ROWS:
            self.chunks.append(np.zeros((CHUNK_ROWS, self.width), self.dtype))
        self.chunks[-1][self.size % CHUNK_ROWS] = row
        self.size += 1
        return self.size - 1

    def add(self, row_id: int, row: np.ndarray) -> None:
        self.chunks[row_id // CHUNK_ROWS][row_id % CHUNK_ROWS] += row

    def get(self, row_id: int) -> np.ndarray:
        return self.chunks[row_id // CHUNK_ROWS][row_id % CHUNK_ROWS]

    def take(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.width), self.dtype)
        chunk = ids // CHUNK_ROWS
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = self.chunks[c][ids[sel] % CHUNK_ROWS]
        return out

    def all(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros((0, self.width), self.dtype)
        return np.concatenate(self.chunks)[: self.size]


class VectorTable:
    """Vectors searched by brute force in blocks of queries (faiss's BLAS kNN, or its GPU kNN).

    With a `basis` (d, k), vectors and queries are projected to k dimensions first: the search
    then costs k/d of the full one and is approximate; callers re-rank its candidates exactly.
    """

    def __init__(self, dim: int, inner_product: bool, basis: np.ndarray | None = None) -> None:
        self.basis = None if basis is None else np.ascontiguousarray(basis, np.float32)
        width = dim if basis is None else basis.shape[1]
        self.metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
        self.rows = np.zeros((1024, width), np.float32)
        self.size = 0
        self.gpu = faiss.StandardGpuResources() if gpu_count() else None

    def project(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        return vectors if self.basis is None else vectors @ self.basis

    def set(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write rows `ids` (existing ids, or the next ones in order)."""
        if not len(ids):
            return
        need = int(ids.max()) + 1
        if need > len(self.rows):
            grown = np.zeros((max(need, 2 * len(self.rows)), self.rows.shape[1]), np.float32)
            grown[: self.size] = self.rows[: self.size]
            self.rows = grown
        self.rows[ids] = self.project(vectors)
        self.size = max(self.size, need)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(n, k) ids of the best rows per query (best first); -1 where there are fewer."""
        out = np.full((len(queries), k), -1, np.int64)
        if not self.size or not len(queries):
            return out
        q = np.ascontiguousarray(self.project(queries))
        base = self.rows[: self.size]
        kk = min(k, self.size)
        if self.gpu is not None:
            _, ids = faiss.knn_gpu(self.gpu, q, base, kk, metric=self.metric)
        else:
            with one_thread(q.size * len(base) < THREADED_FROM):
                _, ids = faiss.knn(q, base, kk, metric=self.metric)
        out[:, :kk] = ids
        return out


def projection(sample: np.ndarray, k: int) -> np.ndarray:
    """(d, k): the top-k eigenvectors of the sample's second moment (uncentred PCA), which keep
    inner products and distances best among k-dimensional projections of data like the sample."""
    x = np.asarray(sample, np.float64)
    _, vectors = np.linalg.eigh(x.T @ x)
    return vectors[:, ::-1][:, :k].astype(np.float32)
