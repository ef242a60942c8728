from __future__ import annotations

import pytest

from fgid.sample import Sample
from fgid.stages.base import Stage, StageFailed


class Doubler(Stage):
    name = "double"

    def __init__(self, bad: set[str]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def process(self, samples):
        self.calls += 1
        if any(s.key in self.bad for s in samples):
            raise ValueError("cannot")
        for s in samples:
            s.caption = s.key * 2


def batch(*keys):
    return [Sample(key=k, shard=0, source=f"/{k}.jpg") for k in keys]


def test_one_bad_sample_is_a_row_not_a_failed_batch():
    samples = batch("a", "b", "c")
    Doubler({"b"})(samples)
    assert [s.status for s in samples] == ["ok", "rejected", "ok"]
    assert samples[1].reason == "stage_error: double: ValueError: cannot"
    assert [s.caption for s in samples if s.ok] == ["aa", "cc"]


def test_rejected_samples_are_not_processed_again():
    samples = batch("a", "b")
    samples[0].reject("no_face")
    stage = Doubler(set())
    stage(samples)
    assert samples[0].caption is None and samples[1].caption == "bb"
    assert stage.timing.images == 1


def test_a_model_failing_on_every_sample_fails_the_shard():
    samples = batch("a", "b")
    with pytest.raises(StageFailed, match="double"):
        Doubler({"a", "b"})(samples)
    # A lone sample that fails is data: a row, not a failed shard.
    lone = batch("z")
    Doubler({"z"})(lone)
    assert lone[0].reason.startswith("stage_error")
