"""The pipeline's wiring: which stage feeds which (filled in step by step)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from driftline.streams.worker import Stage

__all__ = ["link_stages"]


def link_stages(stages: Sequence[Stage]) -> None:
    """The links between stages: every drift test result of a drift stage also goes
    to each alerting stage's ``observe_drift`` (drift rules).

    A stage class exists only once its module is imported: the modules are looked up,
    not imported, so a worker without drift does not load the embedding stack.
    """
    drift_mod = sys.modules.get("driftline.streams.drift")
    alert_mod = sys.modules.get("driftline.streams.alert_stage")
    if drift_mod is None or alert_mod is None:
        return
    alerting = [st for st in stages if isinstance(st, alert_mod.AlertingStage)]
    for st in stages:
        if isinstance(st, drift_mod.DriftStage):
            for al in alerting:
                st.add_observer(al.observe_drift)
