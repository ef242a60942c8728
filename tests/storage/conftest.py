"""One real S3-compatible server for the storage tests, and a client environment per test."""

from __future__ import annotations

import pytest
from s3_server import point_storage_at, running


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    point_storage_at(s3_server, monkeypatch)
    return s3_server
