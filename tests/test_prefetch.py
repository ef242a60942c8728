"""Read-ahead decoding: batches ready ahead of the model stages, same shards, same failures."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fgid.config import DecodeConfig
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
    plans = prepare_output([str(demo_inputs)], tmp_path, config)

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
