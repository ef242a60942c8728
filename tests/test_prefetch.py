"""Read-ahead decoding: batches ready ahead of the model stages, same shards, same failures."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fgid.config import DecodeConfig
from fgid.dataset import Dataset
from fgid.inputs import plan_shards
from fgid.pipeline import build, prepare_output, process_shard, shard_done
from fgid.prefetch import ReadAhead, ThreadedDecodeStage
from fgid.sample import Sample
from fgid.stages.base import StageFailed
from fgid.stages.decode import DecodeStage
from tests.corpus import corpus_inputs, make_bad_corpus

SAMPLE_FIELDS = ("status", "reason", "sha256", "width", "height", "source_info")


def loader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("fgid-read", "fgid-dec"))]


def test_read_ahead_loads_the_next_batch_while_the_consumer_works():
    second_loaded = threading.Event()

    def load(i: int) -> int:
        if i == 1:
            second_loaded.set()
        return i * 10

    with ReadAhead(load, range(5), depth=2) as batches:
        seen = []
        for batch in batches:
            if batch == 0:
                # Still holding batch 0: batch 1 must get loaded meanwhile, on another thread.
                assert second_loaded.wait(timeout=10)
            seen.append(batch)
    assert seen == [0, 10, 20, 30, 40]
    assert loader_threads() == []


def test_without_depth_each_batch_is_loaded_when_asked_for():
    loaded_by = []

    def load(i: int) -> int:
        loaded_by.append(threading.current_thread().name)
        return i

    with ReadAhead(load, range(3), depth=0) as batches:
        assert list(batches) == [0, 1, 2]
    assert set(loaded_by) == {threading.current_thread().name}


def test_wait_counts_only_the_time_the_consumer_is_kept_waiting():
    def load(i: int) -> int:
        time.sleep(0.05)
        return i

    def consume(depth: int) -> float:
        with ReadAhead(load, range(6), depth=depth) as batches:
            for _ in batches:
                time.sleep(0.15)  # the "model stages": slower than loading
        return batches.wait_seconds

    in_turn, ahead = consume(0), consume(2)
    assert in_turn >= 6 * 0.05 * 0.9  # every load waited for
    assert ahead < in_turn / 2  # only the first load is waited for


def test_a_failed_load_raises_after_the_batches_before_it():
    def load(i: int) -> int:
        if i == 2:
            raise OSError("storage went away")
        return i

    seen = []
    with pytest.raises(OSError, match="storage went away"), ReadAhead(load, range(5), 2) as batches:
        seen.extend(batches)
    assert seen == [0, 1]
    assert loader_threads() == []


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> list[str]:
    """Every source of the broken-inputs corpus: each decode failure, and photos that decode."""
    folder = tmp_path_factory.mktemp("bad")
    make_bad_corpus(folder)
    [plan] = plan_shards(corpus_inputs(folder), 1000, None)
    return [item.source for item in plan.items]


def decoded(stage: DecodeStage, sources: list[str]) -> list[Sample]:
    batch = [Sample(f"k{i}", 0, source) for i, source in enumerate(sources)]
    stage(batch)
    return batch


def test_threaded_decode_leaves_samples_as_plain_decode_does(bad_corpus):
    from concurrent.futures import ThreadPoolExecutor

    plain = decoded(DecodeStage(DecodeConfig()), bad_corpus)
    with ThreadPoolExecutor(3) as pool:
        threaded = decoded(ThreadedDecodeStage(DecodeConfig(), pool), bad_corpus)
    assert {s.reason for s in plain if s.reason}  # the corpus rejects some inputs
    for a, b in zip(plain, threaded, strict=True):
        assert [getattr(a, f) for f in SAMPLE_FIELDS] == [getattr(b, f) for f in SAMPLE_FIELDS]
        assert (a.image is None and b.image is None) or np.array_equal(a.image, b.image)


def test_threaded_decode_fails_like_plain_decode_on_an_unexpected_error(demo_inputs):
    from concurrent.futures import ThreadPoolExecutor

    # A config that skipped validation: comparing a file's size with None raises TypeError, an
    # error that is not a rejection.
    broken = DecodeConfig.model_construct(max_bytes=None, min_side=64, max_pixels=10**8)
    photo = str(demo_inputs / "astronaut.png")
    with ThreadPoolExecutor(3) as pool:
        for stage in (DecodeStage(broken), ThreadedDecodeStage(broken, pool)):
            with pytest.raises(StageFailed):
                decoded(stage, [photo] * 3)  # every sample fails alone too: the shard fails
            [alone] = decoded(stage, [photo])
            assert alone.reason.startswith("stage_error: decode: TypeError")


def shard_bytes(out: Path) -> dict[str, bytes]:
    files = sorted((out / "shards").glob("*.tar")) + sorted((out / "shards").glob("*.parquet"))
    return {p.name: p.read_bytes() for p in files}


def test_shards_are_byte_identical_with_and_without_read_ahead(
    demo_inputs, lite_config, lite_models, tmp_path
):
    settings = {"shard_size": 5, "batch_size": 2}
    in_turn = lite_config.model_copy(
        update={**settings, "prefetch_batches": 0, "decode_workers": 1}
    )
    ahead = lite_config.model_copy(update={**settings, "prefetch_batches": 2, "decode_workers": 3})
    assert in_turn.output_hash() == ahead.output_hash()  # speed settings, not content
    build([str(demo_inputs)], tmp_path / "in-turn", in_turn, lite_models)
    build([str(demo_inputs)], tmp_path / "ahead", ahead, lite_models)
    reference = shard_bytes(tmp_path / "in-turn")
    assert len(reference) > 2 and reference == shard_bytes(tmp_path / "ahead")
    for stats_file in (tmp_path / "ahead" / "shards").glob("*.stats.json"):
        decode = json.loads(stats_file.read_text())["stages"]["decode"]
        assert decode["input_wait_seconds"] >= 0
        assert 0 <= decode["input_wait_fraction"] <= 1


def test_a_model_failure_aborts_the_shard_and_stops_the_loader(
    demo_inputs, lite_config, lite_models, tmp_path
):
    config = lite_config.model_copy(update={"batch_size": 1, "prefetch_batches": 3})
    prepare_output([str(demo_inputs)], tmp_path, config)
    plans = Dataset(tmp_path).read_plan()

    class Exploding:
        name, unseen_classes = "boom", frozenset()

        def parse(self, aligned, dense):
            raise KeyboardInterrupt  # not a per-sample failure: the shard must abort

    models = type(lite_models)(**{**lite_models.__dict__, "parser": Exploding()})
    with pytest.raises(KeyboardInterrupt):
        process_shard(plans[0], tmp_path, config, models)
    assert not shard_done(tmp_path, 0)
    assert list((tmp_path / "shards").iterdir()) == []
    assert loader_threads() == []


def gray16_png(side: int) -> bytes:
    """A 16-bit grayscale gradient: small on disk, 2 bytes a pixel decoded, 3 as RGB."""
    import io

    from PIL import Image

    ramp = np.linspace(0, 65535, side).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(ramp, (side, 1))).save(buffer, "PNG")
    return buffer.getvalue()


def decode_ahead(
    source: str, config: DecodeConfig, chunks: list, depth: int, pool=None, work: float = 0.05
) -> list:
    """Decode `chunks` (lists of sample numbers) `depth` batches ahead of a consumer that works
    `work` seconds on each batch."""
    stage = ThreadedDecodeStage(config, pool) if pool else DecodeStage(config)

    def load(chunk: list[int]) -> list[Sample]:
        batch = [Sample(f"k{i}", 0, source) for i in chunk]
        stage(batch)
        return batch

    kept = []
    with ReadAhead(load, chunks, depth) as batches:
        for batch in batches:
            time.sleep(work)  # the model stages
            kept.append([(s.status, s.image.shape if s.image is not None else None) for s in batch])
            for sample in batch:
                sample.release()
    return kept


@pytest.fixture(scope="module")
def heavy_png(tmp_path_factory) -> tuple[str, int]:
    """A 16-bit PNG and the bytes decoding it reserves (its peak estimate)."""
    side = 1200
    path = tmp_path_factory.mktemp("heavy") / "scan16.png"
    path.write_bytes(gray16_png(side))
    return str(path), side * side * (2 * 2 + 4)


def test_read_ahead_holds_decoded_bytes_under_the_budget(heavy_png):
    from fgid.budget import BUDGET

    source, estimate = heavy_png
    chunks = [[i] for i in range(8)]
    peaks = {}
    for budget_mb in (24, 10_000):
        BUDGET.reset_peak()
        kept = decode_ahead(source, DecodeConfig(memory_budget_mb=budget_mb), chunks, depth=6)
        assert kept == [[("ok", (1200, 1200, 3))]] * 8
        assert BUDGET.in_flight == 0  # everything released once the read-ahead is left
        peaks[budget_mb] = BUDGET.peak
    assert estimate < peaks[24] <= 24 << 20
    assert peaks[10_000] > 24 << 20  # without the budget the read-ahead runs further ahead


@pytest.mark.timeout(120)
def test_a_batch_larger_than_the_budget_is_decoded_alone(heavy_png):
    from concurrent.futures import ThreadPoolExecutor

    from fgid.budget import BUDGET

    source, estimate = heavy_png
    BUDGET.reset_peak()
    with ThreadPoolExecutor(2) as pool:
        kept = decode_ahead(
            source, DecodeConfig(memory_budget_mb=1), [[0, 1], [2, 3], [4, 5]], depth=3, pool=pool
        )
    assert kept == [[("ok", (1200, 1200, 3))] * 2] * 3
    # One batch at a time: its two images, and what the batch before still held.
    assert BUDGET.peak <= 2 * estimate + 2 * 1200 * 1200 * 3
    assert BUDGET.in_flight == 0


RSS_CHILD = """
import json, os, sys, threading, time
from fgid.config import DecodeConfig
from tests.test_prefetch import decode_ahead
args = json.loads(sys.argv[1])
config = DecodeConfig(memory_budget_mb=args["budget_mb"])
decode_ahead(args["source"], config, [[0]], depth=1)  # warm up: imports, decoder tables

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

baseline, peak, done = rss(), [0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

watcher = threading.Thread(target=watch)
watcher.start()
# Model stages slower than decoding: without a budget, all eight images are soon held at once.
decode_ahead(args["source"], config, [[i] for i in range(8)], depth=8, work=1.0)
done.set()
watcher.join()
print(json.dumps({"growth": peak[0] - baseline}))
"""


@pytest.mark.timeout(300)
def test_the_budget_bounds_the_memory_of_a_process(tmp_path):
    import subprocess
    import sys

    side = 3000  # 9 megapixels: 27 MB as RGB, 72 MB reserved while decoding
    source = tmp_path / "scan16.png"
    source.write_bytes(gray16_png(side))
    root = Path(__file__).resolve().parents[1]
    growth = {}
    for budget_mb in (128, 10_000):
        args = json.dumps({"source": str(source), "budget_mb": budget_mb})
        done = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        growth[budget_mb] = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    assert growth[128] < (128 + 96) << 20, growth
    assert growth[10_000] > growth[128] + (64 << 20), growth
