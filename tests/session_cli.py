"""The real ``driftline`` CLI with a shorter consumer-group session timeout, for tests
that SIGKILL a worker: ``python tests/session_cli.py MS worker ...``.

The broker holds a new group's first assignment for about half the session timeout,
and a killed member keeps its partitions until its session expires, so a restart
after a kill waits on it; the product's default (``WorkerConfig.session_timeout_ms``,
10 s) made such tests wait about 15 s per restart. This sets the default to ``MS``
(argv[1], removed before the CLI parses its arguments) and changes nothing else.
"""

from __future__ import annotations

import dataclasses
import sys

import driftline.streams.worker as worker_module

SESSION_MS = int(sys.argv.pop(1))


@dataclasses.dataclass(frozen=True)
class _WorkerConfig(worker_module.WorkerConfig):
    session_timeout_ms: int = SESSION_MS


worker_module.WorkerConfig = _WorkerConfig  # type: ignore[misc]  # the CLI imports it when it runs

if __name__ == "__main__":
    from driftline.streams.cli.main import main

    main()
