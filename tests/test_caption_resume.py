"""A build killed while captioning resumes from the shard's caption journal, byte-identical."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fgid.captioning.recaption import recaption
from fgid.captioning.run import DEFAULT_FIELDS
from fgid.config import BuildConfig
from fgid.inputs import sample_key
from fgid.pipeline import build
from fgid.sample import Sample
from fgid.schema import CAPTION_PROMPT
from fgid.stages.caption import CaptionStage
from fgid.writer import shard_paths

ROOT = Path(__file__).resolve().parents[1]
# Two shards (6 + 4 demo inputs), batches of two: the captioner is called twice per batch that
# has a face, five batches in all (calls 1-6 in shard 0, 7-10 in shard 1).
CONFIG = BuildConfig(models={"set": "lite"}, shard_size=6, batch_size=2)
HANG_AT = 9  # shard 1's second batch: shard 0 committed, shard 1's first batch journaled


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so no stage turns it into a row."""


class Recording:
    """Passes calls to a captioner and appends each one (prompt, pixel hashes) to a log file;
    on call `hang_at` it hangs, as a stuck model would, until the process is killed."""

    def __init__(self, inner, log: Path, hang_at: int | None = None, crash_at: int | None = None):
        self.inner, self.name, self.log = inner, inner.name, log
        self.hang_at, self.crash_at, self.calls = hang_at, crash_at, 0

    def caption(self, images, prompt, hints):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash()
        if self.calls == self.hang_at:
            self.log.with_suffix(".hung").touch()
            while True:
                time.sleep(60)
        entry = {"prompt": prompt, "images": [pixels(image) for image in images]}
        with self.log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        return self.inner.caption(images, prompt, hints)


class Renamed:
    """The same captioner under another name, as a new model revision would be."""

    def __init__(self, inner, name: str) -> None:
        self.inner, self.name = inner, name

    def caption(self, images, prompt, hints):
        return self.inner.caption(images, prompt, hints)


def pixels(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def logged(log: Path, prompt: str = CAPTION_PROMPT) -> list[str]:
    """Pixel hashes of every image captioned with `prompt`, in call order."""
    if not log.exists():
        return []
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [h for call in calls if call["prompt"] == prompt for h in call["images"]]


def outputs(out: Path) -> dict[str, bytes]:
    shards = out / "shards"
    return {
        p.name: p.read_bytes()
        for p in sorted(shards.glob("*.tar")) + sorted(shards.glob("*.parquet"))
    }


def ok_keys(out: Path) -> list[str]:
    """Kept samples in plan order: the order the captioner saw them."""
    rows = pq.read_table(sorted(str(p) for p in (out / "shards").glob("*.parquet"))).to_pylist()
    return [r["key"] for r in rows if r["status"] == "ok"]


def journal_keys(url: str) -> list[str]:
    path = Path(url)
    return (
        [json.loads(line)["key"] for line in path.read_text().splitlines()] if path.exists() else []
    )


def child_build(inputs: Path, out: Path, log: Path, hang_at: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.test_caption_resume", str(inputs), str(out), str(log)]
    cmd += [str(hang_at or 0)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main(argv: list[str]) -> None:
    """The build a child process runs: the lite set, its captioner recorded (and maybe stuck)."""
    from fgid.models import load_model_set

    inputs, out, log, hang_at = argv
    models = load_model_set(CONFIG)
    recording = Recording(models.captioner, Path(log), int(hang_at) or None)
    build([inputs], out, CONFIG, dataclasses.replace(models, captioner=recording))


@pytest.mark.slow
def test_sigkill_mid_shard_reruns_only_unjournaled_samples(demo_inputs, lite_models, tmp_path):
    reference = tmp_path / "reference"
    recording = Recording(lite_models.captioner, tmp_path / "reference.log")
    build(
        [str(demo_inputs)],
        str(reference),
        CONFIG,
        dataclasses.replace(lite_models, captioner=recording),
    )
    assert recording.calls == 10 and not list((reference / "shards").glob("*journal*"))
    hashes = dict(zip(ok_keys(reference), logged(tmp_path / "reference.log"), strict=True))

    out, crash_log = tmp_path / "ds", tmp_path / "crash.log"
    proc = child_build(demo_inputs, out, crash_log, HANG_AT)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not crash_log.with_suffix(".hung").exists():
        assert time.monotonic() < deadline, "the build never reached the captioner call"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    # Shard 0 was committed and its journal deleted; shard 1 died mid-captioning.
    assert (out / "shards" / "00000.stats.json").exists()
    assert not Path(shard_paths(str(out), 0)["journal"]).exists()
    assert not (out / "shards" / "00001.stats.json").exists()
    journaled = journal_keys(shard_paths(str(out), 1)["journal"])
    shard1 = ok_keys_of_shard(reference, 1)
    assert 0 < len(journaled) < len(shard1)
    # What the journal holds is exactly what was captioned in shard 1 before the kill.
    before = logged(crash_log)[len(ok_keys_of_shard(reference, 0)) :]
    assert Counter(before) == Counter(hashes[k] for k in journaled)

    rerun_log = tmp_path / "rerun.log"
    rerun = child_build(demo_inputs, out, rerun_log, None)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr.decode()[-2000:]
    # Only shard 1's unjournaled samples were captioned again, once per prompt.
    missing = Counter(hashes[k] for k in shard1 if k not in journaled)
    for prompt in DEFAULT_FIELDS.values():
        assert Counter(logged(rerun_log, prompt)) == missing
    assert outputs(out) == outputs(reference)
    assert not list((out / "shards").glob("*journal*"))
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"


def ok_keys_of_shard(out: Path, shard_id: int) -> list[str]:
    rows = pq.read_table(Path(shard_paths(str(out), shard_id)["index"])).to_pylist()
    return [r["key"] for r in rows if r["status"] == "ok"]


def test_journal_is_reused_only_for_the_same_captioner_settings_and_input(lite_models, tmp_path):
    url = str(tmp_path / "00000.caption-journal.jsonl")
    template = lite_models.captioner

    def samples(sha: str = "a") -> list[Sample]:
        made = []
        for i in range(3):
            sample = Sample(f"key{i}", 0, f"/in/{i}.jpg", sha256=f"{sha}{i}", face_count=1)
            sample.aligned = np.full((8, 8, 3), i, np.uint8)
            sample.regions = ["face", "eyes"]
            made.append(sample)
        return made

    def run(captioner, config=CONFIG, batch=None) -> tuple[Recording, list[Sample]]:
        log = tmp_path / f"{time.monotonic_ns()}.log"
        recording = Recording(captioner, log)
        batch = batch or samples()
        CaptionStage(recording, config, url)(batch)
        return recording, batch

    first, made = run(template)
    assert first.calls == 2 and journal_keys(url) == ["key0", "key1", "key2"]
    again, reused = run(template)
    assert again.calls == 0
    assert [(s.caption, s.facial) for s in reused] == [(s.caption, s.facial) for s in made]
    with Path(url).open("a") as handle:
        handle.write('{"key": "key9", "mo')  # a line a crash cut short
    assert run(template)[0].calls == 0

    assert run(Renamed(template, "fgid-template-captioner-v2"))[0].calls == 2  # another model
    for changed in (
        {"caption.max_new_tokens": 64},
        {"align.size": 256},
        {"caption.engine": "vllm"},
    ):
        assert run(template, CONFIG.with_overrides(**changed))[0].calls == 2, changed
    # One photo replaced under the same path: only that sample is captioned again.
    batch = samples()
    batch[1].sha256 = "replaced"
    recording, _ = run(template, batch=batch)
    assert recording.calls == 2 and logged(recording.log) == [pixels(batch[1].aligned)]


def test_journal_without_a_build_config_is_refused(lite_models, tmp_path):
    with pytest.raises(ValueError, match="config"):
        CaptionStage(lite_models.captioner, journal_url=str(tmp_path / "j.jsonl"))


def test_removal_purges_build_and_caption_run_journals(demo_inputs, lite_models, tmp_path):
    from fgid.removal import remove_samples

    out = tmp_path / "ds"
    crashing = Recording(lite_models.captioner, tmp_path / "crash.log", crash_at=HANG_AT)
    with pytest.raises(Crash):
        build(
            [str(demo_inputs)],
            str(out),
            CONFIG,
            dataclasses.replace(lite_models, captioner=crashing),
        )
    journal = shard_paths(str(out), 1)["journal"]
    gone, kept = (sample_key(str(demo_inputs / n)) for n in ("grace_hopper.jpg", "group-t1.jpg"))
    assert journal_keys(journal) == [gone, kept]

    remove_samples(str(out), sources=[str(demo_inputs / "grace_hopper.jpg")], reason="ticket 1")
    assert journal_keys(journal) == [kept] and gone not in Path(journal).read_text()

    resumed = Recording(lite_models.captioner, tmp_path / "rerun.log")
    build([str(demo_inputs)], str(out), CONFIG, dataclasses.replace(lite_models, captioner=resumed))
    # group-t1 came from the journal; tom_hanks, the only other face of shard 1, was captioned.
    assert resumed.calls == 2 and len(logged(resumed.log)) == 1
    assert gone not in ok_keys(out) and kept in ok_keys(out)
    assert not list((out / "shards").glob("*journal*"))

    # A caption run that crashed leaves its own journal: the removal purges it the same way.
    config = CONFIG.with_overrides(**{"caption.batch_size": 2})
    failing = Recording(lite_models.captioner, tmp_path / "run.log", crash_at=3)
    with pytest.raises(Crash):
        recaption(str(out), config, DEFAULT_FIELDS, replace=True, captioner=failing)
    (run_journal,) = (out / "captions").glob("*.00000.jsonl")
    first, second = journal_keys(str(run_journal))
    flipped = sample_key(str(demo_inputs / "astronaut flipped.jpg"))
    assert second == flipped
    remove_samples(str(out), sources=[str(demo_inputs / "astronaut flipped.jpg")], reason="t 2")
    assert journal_keys(str(run_journal)) == [first]
    record = recaption(
        str(out), config, DEFAULT_FIELDS, replace=True, captioner=lite_models.captioner
    )
    assert record["status"] == "done" and flipped not in ok_keys(out)


if __name__ == "__main__":
    main(sys.argv[1:])


def test_a_shared_datasets_journal_cannot_crash_or_inject(tmp_path):
    """Journal lines this code did not write are ignored, not trusted or fatal."""
    from fgid.captioning.journal import Journal, purge

    url = tmp_path / "00000.caption-journal.jsonl"
    good = {"key": "k0", "model": "m", "captions": {"caption": "a face"}}
    lines = [
        good,
        [1, 2],
        {"key": "../../x", "model": "m", "captions": {"caption": "escape"}},
        {"key": "k1", "model": "m", "captions": "not a mapping"},
        {"key": "k2", "captions": {"caption": "no model"}},
    ]
    url.write_text("".join(json.dumps(line) + "\n" for line in lines))
    journal = Journal(str(url), "m")
    assert journal.entries == {"k0": {"caption": "a face"}}
    assert purge(str(url), {"k0"}) == 5 and not url.exists()
