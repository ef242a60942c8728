"""ConsistentID-SDXL fine-tuned on the real lite build from a file in the released layout (a tiny
SDXL's sizes): the trainable weights move, the frozen ones do not, and the final export converts
back to the released layout, which loads strictly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fgid.errors import UsageError
from tests.training import tiny_models
from training.consistentid import train as train_module
from training.consistentid.config import ModelOptions
from training.consistentid.convert import from_reference, to_reference
from training.consistentid.train import (
    ConsistentIDTrainConfig,
    resolve_variant,
    train_consistentid,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The release's perceiver head width (64), which its shapes do not record, so it loads back.
TINY = ModelOptions(lora_rank=4, id_depth=1, facial_depth=1)


@pytest.fixture(scope="module")
def fine_tuned(tiny_sdxl, built_dataset, tmp_path_factory):
    """(release file it started from, output folder, result, model, weights before, frozen
    tensors before) of a 2-step fine-tune."""
    from training.consistentid.sdxl import ConsistentIDXL

    folder = tmp_path_factory.mktemp("cid-sdxl-ft")
    clip = tiny_models.save_clip_image_encoder(folder / "clip")
    torch.manual_seed(0)
    released = ConsistentIDXL.from_pretrained(str(tiny_sdxl), 128, str(clip), TINY)
    with torch.no_grad():  # LoRA ups start at zero: every tensor nonzero, as a trained file's
        for p in released.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    release = folder / "ConsistentID_SDXL-tiny.bin"
    torch.save(to_reference(released.state_dict()), release)

    config = ConsistentIDTrainConfig(
        dataset_url=str(built_dataset),
        base_model=str(tiny_sdxl),  # its UNet's text_time conditioning picks the SDXL variant
        image_encoder=str(clip),
        id_dim=128,
        model=TINY,
        init_from_reference=str(release),
        loader={"batch_size": 2, "resolution": 32, "workers": 0, "shuffle_buffer": 4, "seed": 3},
        train={
            "output_dir": str(folder / "run"),
            "max_steps": 2,
            "mixed_precision": "no",
            "checkpoint_every": 2,
            "log_every": 1,
            "seed": 7,
        },
    )
    built: dict = {}

    def build_model(config, id_dim):  # the real one; the test keeps the model it returns
        model = build(config, id_dim)
        built["model"] = model
        built["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        built["frozen"] = {
            f"{i}.{name}": p.detach().clone()
            for i, module in enumerate(model.frozen.modules())
            for name, p in module.named_parameters()
            if not p.requires_grad
        }
        return model

    build = train_module.build_model
    train_module.build_model = build_model
    try:
        result = train_consistentid(config)
    finally:
        train_module.build_model = build
    return release, folder / "run", result, built


def test_fine_tuning_from_the_release_moves_only_the_trainable_weights(fine_tuned):
    from training.consistentid.sdxl import ConsistentIDXL

    release, out, result, built = fine_tuned
    model = built["model"]
    assert isinstance(model, ConsistentIDXL)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("noise_mse" in r and "localization" in r for r in rows)

    # It started from the release, and every trainable tensor moved from there.
    started = from_reference(torch.load(release, weights_only=True), model.processor_names())
    before = built["before"]
    assert before.keys() == started.keys()
    assert all(torch.equal(before[k], started[k]) for k in started)
    final = load_file(str(out / "final" / "consistentid.safetensors"))
    assert final.keys() == started.keys()
    assert all(not torch.equal(final[k], started[k]) for k in started)

    # Nothing frozen (UNet, VAE, both text encoders, image encoder) moved.
    frozen = {
        f"{i}.{name}": p
        for i, module in enumerate(model.frozen.modules())
        for name, p in module.named_parameters()
        if not p.requires_grad
    }
    assert frozen.keys() == built["frozen"].keys() and len(frozen) > 100
    assert any(k.startswith("4.") for k in frozen)  # the second text encoder is among them
    assert all(torch.equal(frozen[k], built["frozen"][k]) for k in frozen)

    meta = json.loads((out / "final" / "consistentid.json").read_text())
    assert meta["variant"] == "sdxl" and meta["options"]["localization_layers"] == 3


def test_the_fine_tune_loads_as_the_sdxl_generator(fine_tuned, tiny_sdxl):
    from training.consistentid.release import weights_variant
    from training.consistentid.sdxl import ConsistentIDXLGenerator

    _, out, _, _ = fine_tuned
    assert weights_variant(out / "final") == ("sdxl", str(tiny_sdxl))
    generator = ConsistentIDXLGenerator.from_pretrained(str(tiny_sdxl), out / "final", device="cpu")
    final = load_file(str(out / "final" / "consistentid.safetensors"))
    state = generator.model.state_dict()
    assert all(torch.equal(state[k], final[k]) for k in final)


def test_the_fine_tune_converts_to_the_released_layout_and_loads_back(
    fine_tuned, tiny_sdxl, tmp_path
):
    from training.consistentid.release import folder_to_release, release_model

    release, out, _, _ = fine_tuned
    converted = folder_to_release(out / "final", tmp_path / "ConsistentID_SDXL-ours.bin")
    ours, theirs = (torch.load(p, weights_only=True) for p in (converted, release))
    assert ours.keys() == theirs.keys()
    for group in theirs:
        assert ours[group].keys() == theirs[group].keys()
        assert all(ours[group][k].shape == theirs[group][k].shape for k in theirs[group])

    clip = release.parent / "clip"
    model = release_model(converted, str(tiny_sdxl), str(clip))  # strict
    final = load_file(str(out / "final" / "consistentid.safetensors"))
    state = model.state_dict()
    assert state.keys() == final.keys()
    assert all(torch.equal(state[k], final[k]) for k in final)


def test_the_variant_is_resolved_and_a_mismatch_refused(tiny_sd15, tmp_path, capsys):
    from flows.cli import app
    from flows.cli_common import run_cli
    from training.weights import SDXL

    config = ConsistentIDTrainConfig(
        dataset_url=str(tmp_path), variant="sdxl", train={"output_dir": str(tmp_path)}
    )
    resolved = resolve_variant(config)
    assert resolved.base_model == SDXL and resolved.loader.resolution == 1024
    assert resolved.model.localization_layers == 3
    assert resolve_variant(resolved) == resolved  # idempotent, through a flow's parameters too
    # Unresolved through a flow's parameters (JSON, validated again: every field is set).
    passed = ConsistentIDTrainConfig.model_validate(config.model_dump(mode="json"))
    assert "resolution" in passed.loader.model_fields_set
    assert resolve_variant(passed) == resolved
    chosen = config.model_copy(
        update={"loader": config.loader.model_copy(update={"resolution": 768})}
    )
    assert resolve_variant(chosen).loader.resolution == 768
    plain = resolve_variant(config.model_copy(update={"variant": None}))
    assert plain.variant == "sd15" and plain.loader.resolution == 512
    wrong = config.model_copy(update={"base_model": str(tiny_sd15)})
    with pytest.raises(UsageError, match="is SD 1.5, the model to train is SDXL"):
        resolve_variant(wrong)
    # The command decides it before anything else: one line, exit 2.
    args = ["train", "consistentid", "--dataset", str(tmp_path), "--output-dir", str(tmp_path),
            "--base-model", str(tiny_sd15), "--set", "variant=sdxl", "--no-prefect"]  # fmt: skip
    assert run_cli(app, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is SD 1.5, the model to train is SDXL" in err
