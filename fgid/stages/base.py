"""The stage loop: batching, timing, and turning a model's exception into a rejected sample."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fgid.sample import Sample

log = logging.getLogger(__name__)


@dataclass
class StageTiming:
    seconds: float = 0.0
    images: int = 0

    def as_dict(self) -> dict:
        rate = self.images / self.seconds if self.seconds > 0 else None
        return {"seconds": round(self.seconds, 6), "images": self.images, "images_per_s": rate}


class StageFailed(RuntimeError):
    """A stage failed on a whole batch, sample by sample too: the shard must fail."""


class Stage:
    """A concrete stage implements `process`, which sees only live samples.

    When `process` raises on a batch, the batch is retried one sample at a time so that one
    bad image costs one rejected row (reason `stage_error`), not the shard; when every sample
    fails alone as well, the model is at fault and the shard fails (StageFailed).
    """

    name = "stage"

    def __init__(self) -> None:
        self.timing = StageTiming()

    def process(self, samples: list[Sample]) -> None:
        raise NotImplementedError

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        live = [s for s in batch if s.ok]
        if not live:
            return batch
        start = time.perf_counter()
        try:
            self.process(live)
        except Exception as batch_error:
            log.warning(
                "stage %s failed on a batch of %d; retrying one by one", self.name, len(live)
            )
            failed = 0
            for sample in live:
                if not sample.ok:
                    continue
                try:
                    self.process([sample])
                except Exception as exc:  # noqa: BLE001 - failures are data
                    sample.reject("stage_error", f"{self.name}: {type(exc).__name__}: {exc}")
                    failed += 1
            # Every sample failing alone too means the model is broken (a lost GPU, bad weights),
            # not the data: fail the shard so it is retried, rather than commit only rejections.
            if len(live) > 1 and failed == len(live):
                message = f"stage {self.name} failed on every sample of a batch"
                raise StageFailed(message) from batch_error
        self.timing.seconds += time.perf_counter() - start
        self.timing.images += len(live)
        return batch
