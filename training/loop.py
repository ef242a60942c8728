"""The training loop both models share: Accelerate, accumulation, checkpoints, resume, metrics.

A model's trainer supplies three things: the module holding every parameter (frozen ones with
`requires_grad=False`), a `step_fn(model, batch) -> (loss, logs)` and `make_batches(start)`, a
stream of batches starting at micro-batch `start`. The loop owns the rest, so resume behaves the
same for every model: Accelerate restores weights, optimiser, scheduler and RNG states from the
latest `checkpoint-{step}`, and the data stream restarts at the micro-batch where that step
ended, giving the same batches in the same order as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.checkpoints import (
    final_dir,
    final_step,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_final,
)

log = logging.getLogger(__name__)

StepFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field(description="checkpoints, metrics.jsonl and final/ go here")
    max_steps: int = Field(1000, ge=1, description="optimiser steps")
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; None turns it off")
    checkpoint_every: int = Field(500, ge=1, description="optimiser steps between checkpoints")
    checkpoints_limit: int | None = Field(3, ge=1, description="oldest checkpoints are pruned")
    resume_from: str | None = Field(
        "latest", description='"latest" (resume if a checkpoint exists), a folder, or None'
    )
    seed: int = 0
    log_every: int = Field(10, ge=1)
    find_unused_parameters: bool = Field(
        False, description="multi-GPU: let DDP skip trainable parts a batch did not use"
    )


@dataclass
class TrainResult:
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)  # one per optimiser step of this run
    seconds: float = 0.0
    samples_per_second: float = 0.0
    loader_wait_fraction: float = 0.0
    final_dir: Path | None = None
    resumed_from: Path | None = None


def _to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return 0


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    mixed = config.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision fp16 needs a CUDA device; use bf16 or no on a CPU")
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=config.output_dir),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)
        ],
    )


def _optimizer(model: torch.nn.Module, config: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


def _export(accelerator, model, export, output_dir: Path, step: int, fresh: bool) -> Path | None:
    """Write `final/` when this call trained (`fresh`) or `final/` does not hold this step: a
    rerun after a crash mid-export (the last checkpoint saved, `final/` not) writes it then."""
    if accelerator.is_main_process and (fresh or final_step(output_dir) != step):
        save_final(output_dir, step, lambda folder: export(accelerator.unwrap_model(model), folder))
    accelerator.wait_for_everyone()
    return final_dir(output_dir) if final_step(output_dir) == step else None


def _checkpoint(accelerator, config: TrainConfig, step: int, samples: int) -> None:
    state = {
        "micro_batches": step * config.gradient_accumulation_steps,
        "samples_seen_this_run": samples,
    }
    save_checkpoint(accelerator, config.output_dir, step, config.checkpoints_limit, state)


def train(
    model: torch.nn.Module,
    step_fn: StepFn,
    make_batches: Callable[[int], Iterable[dict]],
    config: TrainConfig,
    export: Callable[[torch.nn.Module, Path], None] | None = None,
) -> TrainResult:
    """Train until `config.max_steps` optimiser steps (or the stream ends), resuming if asked,
    then export to `final/`. Rerunning a finished run trains nothing and returns its `final/`,
    writing it first if a crash had stopped the export."""
    from accelerate.utils import set_seed

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(config)
    set_seed(config.seed)
    optimizer, scheduler = _optimizer(model, config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    resumed = resolve_resume(output_dir, config.resume_from)
    if resumed is not None:
        step = int(load_checkpoint(accelerator, resumed)["step"])
        log.info("resumed from %s at step %d", resumed, step)
    result = TrainResult(step=step, start_step=step, resumed_from=resumed)
    if step < config.max_steps:
        _fit(accelerator, model, optimizer, scheduler, step_fn, make_batches, config, result)
    accelerator.wait_for_everyone()
    if export is not None:
        fresh = resumed is None or result.step > result.start_step
        result.final_dir = _export(accelerator, model, export, output_dir, result.step, fresh)
    accelerator.end_training()
    return result


def _fit(accelerator, model, optimizer, scheduler, step_fn, make_batches, config, result) -> None:
    """Optimiser steps from `result.step` to `config.max_steps` (or the stream's end), with
    metrics and checkpoints; fills `result`."""
    output_dir = Path(config.output_dir)
    step = result.step
    accum = config.gradient_accumulation_steps
    # Data loading must not draw from the training RNG: a DataLoader iterator takes its base
    # seed from torch's global generator when it starts, which a resumed run does at another
    # moment than an uninterrupted one, shifting every later noise draw.
    opened = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        batches = iter(make_batches(step * accum))
    metrics = (output_dir / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    model.train()
    started = time.perf_counter()
    waited, samples, micro_losses = 0.0, 0, []
    saved = step
    try:
        while step < config.max_steps:
            t0 = time.perf_counter()
            try:
                with torch.random.fork_rng(devices=[]):  # see above
                    batch = next(batches)
            except StopIteration:
                log.info("the data stream ended at step %d", step)
                break
            waited += time.perf_counter() - t0
            if step == result.start_step and not micro_losses:
                # Loader workers start (import torch, open shards) before the first batch, in
                # tens of seconds on a cold machine: say so, or a slow start looks like a hang.
                log.info("first batch after %.1f s", time.perf_counter() - opened)
            batch = _to_device(batch, accelerator.device)
            samples += _batch_size(batch)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, logs = step_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(float(loss.detach()))
            if not accelerator.sync_gradients:
                continue
            step += 1
            result.losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            elapsed = time.perf_counter() - started
            if metrics and (step % config.log_every == 0 or step == config.max_steps):
                row = {
                    "step": step,
                    "loss": result.losses[-1],
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": samples / elapsed,
                    "loader_wait_fraction": waited / elapsed,
                    **{k: float(v) for k, v in logs.items()},
                }
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                log.info("step %d loss %.5f", step, row["loss"])
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                _checkpoint(accelerator, config, step, samples)
                saved = step
        if step > saved:  # the stream ended between checkpoints: keep what was learned
            _checkpoint(accelerator, config, step, samples)
    finally:
        if metrics:
            metrics.close()

    result.step = step
    result.seconds = time.perf_counter() - started
    result.samples_per_second = samples / result.seconds if result.seconds else 0.0
    result.loader_wait_fraction = waited / result.seconds if result.seconds else 0.0
