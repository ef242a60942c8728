from __future__ import annotations

import pytest
from pydantic import ValidationError

from fgid.config import BuildConfig


def test_yaml_sections_and_overrides(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("shard_size: 10\ndetect:\n  min_face_size: 80\nmodels:\n  set: lite\n")
    cfg = BuildConfig.from_yaml(path)
    assert (cfg.shard_size, cfg.detect.min_face_size, cfg.models.set) == (10, 80, "lite")
    cfg2 = cfg.with_overrides(**{"align.size": 256, "models.set": "full"})
    assert (cfg2.align.size, cfg2.models.set, cfg2.shard_size) == (256, "full", 10)


def test_unknown_or_invalid_settings_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="detcet"):
        BuildConfig.model_validate({"detcet": {}})
    with pytest.raises(ValidationError):
        BuildConfig().with_overrides(**{"models.set": "medium"})
    with pytest.raises(ValidationError):
        BuildConfig(shard_size=0)


def test_output_hash_tracks_content_settings_only():
    base = BuildConfig()
    assert base.output_hash() == BuildConfig().output_hash()
    assert base.output_hash() != base.with_overrides(**{"align.size": 256}).output_hash()
    # Speed settings do not change what a shard contains.
    assert base.output_hash() == base.with_overrides(workers=4, batch_size=2).output_hash()
    assert base.output_hash() == base.with_overrides(**{"models.device": "cpu"}).output_hash()
