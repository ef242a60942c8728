"""Two training processes on one machine (torchrun, gloo on CPU; Accelerate reads its
environment): DDP, shards split by rank, one set of checkpoints, as on a multi-GPU node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.mark.slow
def test_consistentid_trains_in_two_processes(built_dataset, tiny_sd15, tmp_path):
    out = tmp_path / "run"
    config = {
        "dataset_url": str(built_dataset),
        "base_model": str(tiny_sd15),
        "id_dim": 128,  # the lite build's dlib embeddings, on purpose
        "loader": {"batch_size": 2, "resolution": 32, "workers": 0, "shuffle_buffer": 4},
        "train": {
            "output_dir": str(out),
            "max_steps": 3,
            "mixed_precision": "no",
            "checkpoint_every": 2,
            "log_every": 1,
            # a batch without a usable region leaves the fusion MLPs without gradient
            "find_unused_parameters": True,
        },
        "model": {"lora_rank": 4, "id_depth": 1, "facial_depth": 1, "dim_head": 16},
    }
    config_file = tmp_path / "cid.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # --standalone: a rendezvous on localhost with a free port
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*launch, "-m", "flows.cli", "train", "consistentid", "--config", str(config_file),
         "--no-prefect"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        # Without a GPU, Accelerate treats a torchrun world as distributed only when told to.
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # Accelerate saved one RNG state per process: both ranks took part.
    assert sorted(p.name for p in (out / "checkpoint-3").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # written by the main process only
    assert (out / "final" / "consistentid.safetensors").is_file()
