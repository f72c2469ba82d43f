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
