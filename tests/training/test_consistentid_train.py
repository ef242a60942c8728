"""ConsistentID end to end on the real lite build: checkpoints pruned to the limit, an exact resume
(same data order, same loss), and the exported weights loading into the generator."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoints import list_checkpoints
from training.consistentid.config import ModelOptions
from training.consistentid.pipeline import ConsistentIDGenerator
from training.consistentid.train import ConsistentIDTrainConfig, train_consistentid

TINY = ModelOptions(lora_rank=4, id_depth=1, facial_depth=1, dim_head=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits can make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(dataset, base, output, max_steps):
    return ConsistentIDTrainConfig(
        dataset_url=str(dataset),
        base_model=str(base),
        id_dim=128,  # the lite build's dlib embeddings, on purpose
        model=TINY,
        loader={"batch_size": 2, "resolution": 32, "workers": 0, "shuffle_buffer": 4, "seed": 3},
        train={
            "output_dir": str(output),
            "max_steps": max_steps,
            "mixed_precision": "no",
            "checkpoint_every": 2,
            "checkpoints_limit": 2,
            "log_every": 1,
            "seed": 7,
        },
    )


def _run(config):
    keys: list[list[str]] = []
    result = train_consistentid(config, observe=lambda batch: keys.append(list(batch["key"])))
    return result, keys


@pytest.fixture(scope="module")
def uninterrupted(built_dataset, tiny_sd15, tmp_path_factory):
    out = tmp_path_factory.mktemp("consistentid-straight")
    return (*_run(_config(built_dataset, tiny_sd15, out, 6)), out)


def test_training_writes_pruned_checkpoints_and_exports_the_trainable_weights(uninterrupted):
    result, keys, out = uninterrupted
    assert result.step == 6 and len(result.losses) == 6 and len(keys) == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert [step for step, _ in list_checkpoints(out)] == [4, 6]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all("noise_mse" in r and "localization" in r for r in rows)

    final = out / "final"
    weights = load_file(str(final / "consistentid.safetensors"))
    assert {k.split(".")[0] for k in weights} == {"id_projection", "facial_encoder", "adapters"}
    meta = json.loads((final / "consistentid.json").read_text())
    assert meta["id_dim"] == 128 and meta["options"] == TINY.model_dump()
    # The checkpoint holds the same trainable state (Accelerate saves the model's state dict).
    checkpoint = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert checkpoint.keys() == weights.keys()
    assert all(torch.equal(checkpoint[k], weights[k]) for k in weights)


def test_a_resumed_run_continues_with_the_same_data_and_loss(
    uninterrupted, built_dataset, tiny_sd15, tmp_path
):
    straight, straight_keys, _ = uninterrupted
    first, first_keys = _run(_config(built_dataset, tiny_sd15, tmp_path, 4))
    assert first.step == 4 and first_keys == straight_keys[:4]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]

    resumed, resumed_keys = _run(_config(built_dataset, tiny_sd15, tmp_path, 6))
    assert resumed.start_step == 4 and resumed.resumed_from.name == "checkpoint-4"
    assert resumed_keys == straight_keys[4:]
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]


def test_exported_and_checkpoint_weights_load_into_the_generator(uninterrupted, tiny_sd15):
    _, _, out = uninterrupted
    final = load_file(str(out / "final" / "consistentid.safetensors"))
    for folder in (out / "final", out / "checkpoint-6"):
        generator = ConsistentIDGenerator.from_pretrained(str(tiny_sd15), folder, device="cpu")
        state = generator.model.state_dict()
        assert state.keys() == final.keys()
        assert all(torch.equal(state[k], final[k]) for k in final)
