"""`fgid convert consistentid` both ways on a small checkpoint in the released layout."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import app
from flows.cli_common import run_cli
from training.consistentid.config import ModelOptions
from training.consistentid.convert import (
    ReleaseShape,
    processor_order,
    sd15_processors,
    sdxl_processors,
    skeleton,
    to_reference,
)


def small_release(processors: list[str] | None = None) -> dict:
    """SD 1.5's 32 attention layers (or `processors`) at small widths, in the released layout."""
    hidden = {"down_blocks.0": 8, "down_blocks.1": 16, "down_blocks.2": 32, "mid_block": 32}
    hidden |= {"up_blocks.0": 32, "up_blocks.1": 32, "up_blocks.2": 16, "up_blocks.3": 8}
    layers = []
    for name in processors or sd15_processors():
        size = hidden[name.split(".attentions")[0]]
        cross = name.endswith("attn2")
        layers.append((name, size, 16 if cross else size, cross))
    options = ModelOptions(num_id_tokens=2, id_depth=1, facial_dim=16, facial_depth=1, lora_rank=2)
    shape = ReleaseShape(id_dim=8, clip_dim=12, width=16, options=options, processors=tuple(layers))
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) for k, v in skeleton(shape).state_dict().items()}
    assert sorted(sd15_processors(), key=processor_order) == sd15_processors()
    return to_reference(state)


class Result:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output


def run(*args):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(app, ["convert", "consistentid", *map(str, args)])
    return Result(code, err.getvalue())


def test_converts_both_ways(tmp_path):
    release = small_release()
    torch.save(release, tmp_path / "ConsistentID-v1.bin")
    result = run("--from-reference", tmp_path / "ConsistentID-v1.bin", "--out", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "ours" / "consistentid.json").read_text())
    assert meta["id_dim"] == 8 and meta["options"]["lora_rank"] == 2
    assert meta["options"]["facial_align"] is False
    result = run("--to-reference", tmp_path / "ours", "--out", tmp_path / "back.bin")
    assert result.exit_code == 0, result.output
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert back.keys() == release.keys()
    for group in release:
        assert back[group].keys() == release[group].keys()
        assert all(torch.equal(back[group][k], release[group][k]) for k in release[group])


def test_bad_files_fail_in_one_line(tmp_path):
    release = small_release()
    del release["FacialEncoder"]["fuse_module.layer_norm.bias"]
    release["image_proj"]["extra.weight"] = torch.zeros(1)
    torch.save(release, tmp_path / "broken.bin")
    result = run("--from-reference", tmp_path / "broken.bin", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "image_proj.extra.weight" in result.output

    del release["image_proj"]["extra.weight"]
    torch.save(release, tmp_path / "missing.bin")
    result = run("--from-reference", tmp_path / "missing.bin", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "missing: facial_encoder.norm.bias" in result.output
    assert result.output.strip().count("\n") == 0

    (tmp_path / "photo.bin").write_bytes(b"\x89PNG not a checkpoint")
    result = run("--from-reference", tmp_path / "photo.bin", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a torch checkpoint" in result.output
    assert result.output.strip().count("\n") == 0
    assert run("--out", tmp_path / "o").exit_code == 2


def test_the_sdxl_release_converts_both_ways_and_needs_an_sdxl_base(tmp_path, tiny_sd15):
    """Told apart by its 140 attention layers: the folder records the variant and SDXL base
    1.0; on an SD 1.5 base it is refused in one line, before any model loads."""
    from training.consistentid.convert import release_variant

    release = small_release(sdxl_processors())
    assert release_variant(release) == "sdxl"
    torch.save(release, tmp_path / "ConsistentID_SDXL-v1.bin")
    result = run("--from-reference", tmp_path / "ConsistentID_SDXL-v1.bin", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "o" / "consistentid.json").read_text())
    assert meta["variant"] == "sdxl"
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    result = run("--to-reference", tmp_path / "o", "--out", tmp_path / "back.bin")
    assert result.exit_code == 0, result.output
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert {g: back[g].keys() for g in back} == {g: release[g].keys() for g in release}
    assert all(torch.equal(back[g][k], release[g][k]) for g in release for k in release[g])

    from fgid.errors import UsageError
    from training.evaluation.config import GeneratorConfig, consistentid_base, load_generator

    weights = str(tmp_path / "ConsistentID_SDXL-v1.bin")
    assert consistentid_base(GeneratorConfig(kind="consistentid", weights=weights)) == (
        "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
    )  # fmt: skip
    config = GeneratorConfig(kind="consistentid", base_model=str(tiny_sd15), weights=weights)
    with pytest.raises(UsageError, match="SDXL release, .* is an SD 1.5 model: give an SDXL"):
        load_generator(config)
