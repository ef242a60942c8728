"""Nearest-neighbour search over a growing set of changing vectors (running centroids), by faiss."""

from __future__ import annotations

import contextlib
import os
import sys

import faiss
import numpy as np

# Device files of the GPUs torch can use (NVIDIA's driver, AMD's ROCm).
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd")
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

    def adopt(self, rows: np.ndarray) -> None:
        """Take `rows` as the first rows, without copying whole chunks of them: they become
        this table's storage (and change with it); only a last partial chunk is copied."""
        rows = np.asarray(rows, self.dtype)
        whole = len(rows) // CHUNK_ROWS * CHUNK_ROWS
        self.chunks = [rows[lo : lo + CHUNK_ROWS] for lo in range(0, whole, CHUNK_ROWS)]
        if whole < len(rows):
            self.chunks.append(np.zeros((CHUNK_ROWS, self.width), self.dtype))
            self.chunks[-1][: len(rows) - whole] = rows[whole:]
        self.size = len(rows)

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
    """Vectors searched exactly by brute force in blocks of queries (faiss's BLAS kNN, or its GPU
    kNN): inner product or L2."""

    def __init__(self, dim: int, inner_product: bool) -> None:
        self.metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
        self.rows = _Grown(dim, np.float32)
        self.gpu = faiss.StandardGpuResources() if gpu_count() else None

    @property
    def size(self) -> int:
        return self.rows.size

    def set(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write rows `ids` (existing ids, or the next ones in order)."""
        self.rows.set(ids, np.asarray(vectors, np.float32))

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(n, k) ids of the best rows per query (best first); -1 where there are fewer."""
        out = np.full((len(queries), k), -1, np.int64)
        if not self.size or not len(queries):
            return out
        q = np.ascontiguousarray(queries, np.float32)
        base, kk = self.rows.view(), min(k, self.size)
        if self.gpu is not None:
            _, ids = faiss.knn_gpu(self.gpu, q, base, kk, metric=self.metric)
        else:
            with one_thread(q.size * len(base) < THREADED_FROM):
                _, ids = faiss.knn(q, base, kk, metric=self.metric)
        out[:, :kk] = ids
        return out


class TorchTable:
    """VectorTable's exact search on a torch device: one matrix product and a top-k per block
    of queries. For a CUDA GPU without faiss's GPU build (faiss-cpu has none; the GPU wheels are
    tied to one CUDA version): there every size is searched exactly, since a block against 200k
    centroids is some 26 billion multiply-adds, about a millisecond of a data-centre GPU by
    arithmetic (not measured). Same results as VectorTable up to ties and float32 rounding;
    callers re-rank the candidates exactly."""

    SLICE_ROWS = 1 << 20

    def __init__(self, dim: int, inner_product: bool, device: str) -> None:
        import torch

        self.torch, self.inner_product = torch, inner_product
        self.data = torch.zeros((1024, dim), dtype=torch.float32, device=device)
        self.size = 0

    def set(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        torch = self.torch
        if not len(ids):
            return
        need = int(ids.max()) + 1
        if need > len(self.data):
            grown = self.data.new_zeros((max(need, 2 * len(self.data)), self.data.shape[1]))
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        rows = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(self.data.device)
        self.data[torch.from_numpy(np.asarray(ids, np.int64)).to(self.data.device)] = rows
        self.size = max(self.size, need)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(queries), k), -1, np.int64)
        if not self.size or not len(queries):
            return out
        torch, kk = self.torch, min(k, self.size)
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.data.device)
        best_score = best_id = None
        # A slice of rows at a time: 256 queries against 20M centroids would be 20 GB of scores.
        for lo in range(0, self.size, self.SLICE_ROWS):
            base = self.data[lo : min(lo + self.SLICE_ROWS, self.size)]
            score = q @ base.T
            if not self.inner_product:  # nearest in L2: largest 2q.b - |b|^2 (|q|^2 per row)
                score = 2 * score - (base * base).sum(1)
            top = torch.topk(score, min(kk, len(base)), dim=1)
            scores, ids = top.values, top.indices + lo
            if best_score is not None:  # merge with the best of the slices before
                scores, ids = torch.cat([best_score, scores], 1), torch.cat([best_id, ids], 1)
                keep = torch.topk(scores, min(kk, scores.shape[1]), dim=1).indices
                scores, ids = torch.gather(scores, 1, keep), torch.gather(ids, 1, keep)
            best_score, best_id = scores, ids
        out[:, :kk] = best_id.cpu().numpy()
        return out


def exact_table(dim: int, inner_product: bool, device: str = "cpu"):
    """The exact search for `device`: faiss (on a GPU too where faiss has one), or torch on a
    GPU faiss cannot use."""
    if device == "cpu" or gpu_count():
        return VectorTable(dim, inner_product)
    return TorchTable(dim, inner_product, device)


def search_device(spec: str = "auto") -> str:
    """Where the centroid search runs: "cpu", or a CUDA device torch sees (faiss's own GPU build
    counts as one). `spec` is models.device: "auto", "cpu", "cuda" or "cuda:N"."""
    if spec == "cpu":
        return "cpu"
    if gpu_count():
        return "cuda"
    if spec == "auto" and "torch" not in sys.modules and not any(map(os.path.exists, GPU_NODES)):
        return "cpu"  # no GPU to find: importing torch to learn that costs 2 s and 300 MB
    from fgid.backends.full.device import torch_device

    return torch_device(spec)


class HammingTable:
    """Directions searched by the Hamming distance of `bits`-bit sign codes (random hyperplanes,
    SimHash): the fraction of differing bits estimates the angle between two vectors, and a
    Hamming kNN costs about 0.5 ns per pair on two cores against about 12 ns for a 128-d float
    kNN in blocks of 256 queries. Approximate: callers re-rank the candidates exactly.

    With 512 bits the estimate's standard deviation is about 0.07 rad, so a face at cosine 0.55
    (two photos of one person) stands about 8 deviations closer than unrelated faces (cosine 0);
    on the synthetic benchmark faces, the true match was among 16 candidates from 200k for
    99.99% of queries. The hyperplanes come from a fixed seed: same input, same codes."""

    def __init__(self, dim: int, bits: int = 512, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.planes = rng.standard_normal((dim, bits)).astype(np.float32)
        self.rows = _Grown(bits // 8, np.uint8)

    @property
    def size(self) -> int:
        return self.rows.size

    def code(self, vectors: np.ndarray) -> np.ndarray:
        return np.packbits(np.asarray(vectors, np.float32) @ self.planes > 0, axis=1)

    def set(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.rows.set(ids, self.code(vectors))

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        out = np.full((len(queries), k), -1, np.int64)
        if not self.size or not len(queries):
            return out
        kk, base = min(k, self.size), self.rows.view()
        with one_thread(len(queries) * base.size < THREADED_FROM):
            _, ids = faiss.knn_hamming(self.code(queries), base, kk)
        out[:, :kk] = ids
        return out


class _Grown:
    """A (n, width) array written by row id that doubles its storage as ids grow."""

    def __init__(self, width: int, dtype) -> None:
        self.data = np.zeros((1024, width), dtype)
        self.size = 0

    def set(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if not len(ids):
            return
        need = int(ids.max()) + 1
        if need > len(self.data):
            grown = np.zeros((max(need, 2 * len(self.data)), self.data.shape[1]), self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[ids] = rows
        self.size = max(self.size, need)

    def view(self) -> np.ndarray:
        return self.data[: self.size]
