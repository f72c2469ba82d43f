"""WorkerConfig refuses settings the worker cannot run with, naming the setting."""

from __future__ import annotations

import pytest

from driftline.streams.worker import WorkerConfig


def make(**kw: object) -> WorkerConfig:
    return WorkerConfig(kafka="127.0.0.1:9092", clickhouse="chdb:///tmp/x", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value"), [
    ("max_batch", 0),
    ("emit_interval_s", 0.0),
    ("auto_offset_reset", "newest"),
])
def test_bad_setting_is_refused_by_name(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        make(**{key: value})


def test_stop_ends_a_start_up_that_waits_for_clickhouse() -> None:
    # ClickHouse unreachable: start-up retries the schema forever; SIGINT/SIGTERM (serve_worker's
    # stop event) used to change nothing, the worker kept retrying until SIGKILL. Catches:
    # Worker.run awaiting start() without watching ``stop`` (wait_for times out).
    import asyncio

    from driftline.streams.worker import Worker, WorkerConfig

    async def main() -> float:
        w = Worker(WorkerConfig(kafka="127.0.0.1:1", clickhouse="http://127.0.0.1:1/driftline",
                                create_topics=False))
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        await asyncio.sleep(0.5)  # in the schema's retry loop by now
        assert not task.done() and w.metrics.sink_errors["creating"] >= 1
        stop.set()
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(task, 5)
        return asyncio.get_running_loop().time() - t0

    assert asyncio.run(main()) < 5
