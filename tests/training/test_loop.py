"""The shared training loop on a small regression model: learning, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from training.checkpoints import list_checkpoints
from training.loop import TrainConfig, train

BATCH = 8


def _batches(start: int):
    """An endless, seeded stream: batch i is a pure function of i, as the real loaders are."""
    i = start
    while True:
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(BATCH, 4, generator=g)
        yield {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5, 3.0]), "index": [i] * BATCH}
        i += 1


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(x).squeeze(-1)


def _step(seen: list[int]):
    def step_fn(model, batch):
        seen.append(batch["index"][0])
        # Randomness drawn from torch's global RNG, like diffusion noise: it must resume exactly.
        noise = 0.01 * torch.randn_like(batch["y"])
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"] + noise)
        return loss, {"noise_mean": float(noise.mean())}

    return step_fn


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        mixed_precision="no",
        learning_rate=0.3,
        checkpoint_every=4,
        checkpoints_limit=2,
        log_every=1,
        gradient_accumulation_steps=2,
    )
    return TrainConfig(**(base | kw))


def _export(model, folder):
    torch.save(model.head.state_dict(), folder / "head.pt")


def test_learns_checkpoints_and_exports(tmp_path):
    seen: list[int] = []
    model = Regressor()
    frozen_before = model.frozen.weight.clone()
    result = train(model, _step(seen), _batches, _config(tmp_path), export=_export)

    assert result.step == 12 and len(result.losses) == 12
    assert result.losses[-1] < 0.2 * result.losses[0]
    assert torch.equal(model.frozen.weight, frozen_before)
    # 2 micro-batches per optimiser step, in stream order from 0
    assert seen == list(range(24))
    # saved at 4, 8, 12; pruned to the newest two
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 12]
    assert (result.final_dir / "head.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert 0 <= rows[-1]["loader_wait_fraction"] < 1


def test_resume_continues_same_step_same_data_same_losses(tmp_path):
    full_seen: list[int] = []
    full = train(Regressor(), _step(full_seen), _batches, _config(tmp_path / "full"))

    first_seen: list[int] = []
    part = train(Regressor(), _step(first_seen), _batches, _config(tmp_path / "run", max_steps=8))
    assert part.step == 8
    resumed_seen: list[int] = []
    rest = train(Regressor(), _step(resumed_seen), _batches, _config(tmp_path / "run"))

    assert rest.start_step == 8 and rest.resumed_from.name == "checkpoint-8"
    assert resumed_seen == full_seen[16:]
    # weights, optimiser state and the global RNG (the noise) all came back
    assert rest.losses == pytest.approx(full.losses[8:], rel=1e-5)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return _batches(self.start)


def _loader(start: int):
    """A real DataLoader: starting its iterator draws a base seed from torch's global RNG."""
    return torch.utils.data.DataLoader(_Stream(start), batch_size=None)


def test_resume_through_a_dataloader_keeps_the_training_rng(tmp_path):
    full = train(Regressor(), _step([]), _loader, _config(tmp_path / "full"))
    train(Regressor(), _step([]), _loader, _config(tmp_path / "run", max_steps=8))
    rest = train(Regressor(), _step([]), _loader, _config(tmp_path / "run"))
    assert rest.losses == pytest.approx(full.losses[8:], rel=1e-5)


def test_finished_run_does_not_train_again(tmp_path):
    train(Regressor(), _step([]), _batches, _config(tmp_path, max_steps=4))
    seen: list[int] = []
    again = train(Regressor(), _step(seen), _batches, _config(tmp_path, max_steps=4))
    assert again.step == 4 and again.losses == [] and seen == []


def test_finite_stream_ends_with_a_checkpoint(tmp_path):
    def five_batches(start):
        batches = _batches(start)
        for _ in range(max(0, 10 - start)):
            yield next(batches)

    result = train(Regressor(), _step([]), five_batches, _config(tmp_path, checkpoint_every=100))
    assert result.step == 5
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]


def test_model_without_trainable_parameters_is_refused(tmp_path):
    model = Regressor().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, _step([]), _batches, _config(tmp_path))


# --- the final export survives a crash ------------------------------------------------------------

_CRASH_DURING_EXPORT = """
import os, signal, sys, torch
from tests.training.test_loop import Regressor, _batches, _config, _step
from training.loop import train

def export(model, folder):
    torch.save(model.head.state_dict(), folder / "head.pt")
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies halfway through the export

train(Regressor(), _step([]), _batches, _config(__import__("pathlib").Path(sys.argv[1]),
      max_steps=4), export=export)
"""


def test_a_crash_during_the_export_is_repaired_by_the_rerun(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from training.checkpoints import STATE_FILE, final_step

    crashed = subprocess.run(
        [sys.executable, "-c", _CRASH_DURING_EXPORT, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    # Training finished and its last checkpoint is saved; the export never completed.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert not (tmp_path / "final").exists() and final_step(tmp_path) is None

    seen: list[int] = []
    again = train(Regressor(), _step(seen), _batches, _config(tmp_path, max_steps=4), _export)
    assert seen == [] and again.losses == []  # nothing trained again
    assert again.final_dir == tmp_path / "final" and final_step(tmp_path) == 4
    assert (again.final_dir / "head.pt").is_file() and (again.final_dir / STATE_FILE).is_file()
    assert not (tmp_path / ".final.tmp").exists()
    # The export holds the checkpoint's trained weights, not a fresh model's.
    exported = torch.load(again.final_dir / "head.pt")
    assert not torch.equal(exported["weight"], Regressor().head.weight)


def test_a_finished_run_returns_its_export_without_writing_it_again(tmp_path):
    first = train(Regressor(), _step([]), _batches, _config(tmp_path, max_steps=4), _export)
    exports: list = []
    again = train(
        Regressor(), _step([]), _batches, _config(tmp_path, max_steps=4),
        lambda model, folder: exports.append(folder),
    )  # fmt: skip
    assert again.final_dir == first.final_dir and exports == []
    # Training further exports again, from the new last step.
    more = train(Regressor(), _step([]), _batches, _config(tmp_path, max_steps=8), _export)
    assert more.step == 8 and json.loads((more.final_dir / "trainer_state.json").read_text()) == {
        "step": 8
    }
