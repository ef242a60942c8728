"""The caption flow: one task per shard, a failed shard retried from its journal, reruns skip."""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import pytest

pytestmark = pytest.mark.slow


class FailsOnce:
    """The real captioner, except that one call (in the whole test) raises."""

    def __init__(self, inner, fail_on_call: int) -> None:
        self.inner, self.name, self.fail_on_call = inner, inner.name, fail_on_call
        self.sizes: list[int] = []

    def caption(self, images, prompt, hints):
        self.sizes.append(len(images))
        if len(self.sizes) == self.fail_on_call:
            raise OSError(5, "Input/output error")
        return self.inner.caption(images, prompt, hints)


def test_caption_flow_retries_a_shard_from_its_journal(
    prefect_server, lite_config, lite_models, demo_inputs, tmp_path, monkeypatch
):
    from prefect.client.orchestration import PrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.caption as flow_module
    from fgid.captioning.captioners import load_captioner
    from fgid.captioning.recaption import recaption
    from fgid.captioning.run import DEFAULT_FIELDS
    from fgid.pipeline import build

    config = lite_config.with_overrides(**{"caption.batch_size": 2})
    out = tmp_path / "captioned"
    build([str(demo_inputs)], str(out), lite_config, lite_models)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    recaption(str(reference), config, DEFAULT_FIELDS, replace=True)

    captioner = FailsOnce(load_captioner(config), fail_on_call=3)  # shard 0, second batch

    @contextlib.contextmanager
    def lease(cfg):
        yield captioner

    monkeypatch.setattr(flow_module, "leased_captioner", lease)
    flow = flow_module.caption.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        record = flow(dataset=str(out), config=config, replace=True)
        assert record["status"] == "done" and record["shards"]["captioned"] == [0, 1, 2]
        # The retry captioned only shard 0's second batch (2 images x 2 prompts), not its first.
        assert captioner.sizes[:4] == [2, 2, 2, 2] and sum(captioner.sizes) == 2 * 8 + 2
        calls = len(captioner.sizes)
        again = flow(dataset=str(out), config=config, replace=True)
        assert again["id"] == record["id"] and len(captioner.sizes) == calls  # all skipped

    async def shard_runs():
        async with PrefectClient(api=prefect_server.api_url) as client:
            runs = await client.read_task_runs()
            flows = [
                f for f in await client.read_flow_runs() if f"caption-run:{record['id']}" in f.tags
            ]
            return [r for r in runs if r.name.startswith("captioned caption shard")], flows

    runs, flow_runs = asyncio.run(shard_runs())
    assert len(flow_runs) == 2  # the run and its rerun, each tagged on the flow run
    assert all({"fgid", "caption", "dataset:captioned"} <= set(f.tags) for f in flow_runs)
    assert sorted(r.name for r in runs) == [f"captioned caption shard {i:05d}" for i in range(3)]
    (retried,) = [r for r in runs if r.run_count == 2]
    assert retried.name.endswith("00000") and retried.state.is_completed()
    assert not retried.tags  # tags are on the flow run (see flows/caption.py)
    for path in sorted((reference / "shards").iterdir()):
        assert (out / "shards" / path.name).read_bytes() == path.read_bytes(), path.name
