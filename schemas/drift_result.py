"""Result type of one drift test: one :class:`DriftResult` per detector, key and field.

:meth:`DriftResult.to_row` gives the detector's columns of the ClickHouse table
``drift_scores`` (``method, statistic, p_value, threshold, drifted, n_ref, n_cur,
explanation``); the stream stage adds ``ts, app, model, prompt_version, field``.

How ``threshold`` is read depends on the test and is spelled out in
``explanation["rule"]``: for a test with a p-value it is the significance level
(``drifted`` means ``p_value < threshold``); for a score without one (PSI, the
centroid distance) it is the bound on ``statistic`` (``drifted`` means
``statistic > threshold``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DriftResult"]


@dataclass(frozen=True, slots=True)
class DriftResult:
    """The outcome of one two-sample drift test (reference window vs current window).

    Parameters
    ----------
    method
        Detector name, e.g. ``"mmd"``, ``"topic_mix"``, ``"ks"``.
    statistic
        The test statistic (finite).
    p_value
        The test's p-value in ``[0, 1]``, or ``None`` for scores without one (PSI).
    threshold
        The decision bound; see ``explanation["rule"]``.
    drifted
        The verdict.
    n_ref, n_cur
        Sample sizes of the reference and the current window.
    explanation
        JSON-serialisable details (checked on creation: plain ``str``/``int``/
        ``float``/``bool``/``None``/``list``/``dict`` only, no NaN).

    Examples
    --------
    >>> r = DriftResult("ks", 0.31, 0.001, 0.05, True, 500, 400, {"rule": "p_value < threshold"})
    >>> r.to_row()["drifted"], r.to_row()["explanation"]
    (1, '{"rule": "p_value < threshold"}')
    """

    method: str
    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool
    n_ref: int
    n_cur: int
    explanation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.method:
            raise ValueError("method must be a non-empty string")
        if not math.isfinite(self.statistic):
            raise ValueError(f"statistic must be finite, got {self.statistic!r}")
        if self.p_value is not None and not 0.0 <= self.p_value <= 1.0:
            raise ValueError(f"p_value must be in [0, 1] or None, got {self.p_value!r}")
        if self.n_ref < 0 or self.n_cur < 0:
            raise ValueError("n_ref and n_cur must be >= 0")
        # Fails here (TypeError/ValueError), not later in the sink.
        json.dumps(self.explanation, allow_nan=False)

    def to_row(self) -> dict[str, Any]:
        """The ``drift_scores`` columns this result fills (``drifted`` as 0/1, ``explanation`` as JSON)."""
        return {
            "method": self.method,
            "statistic": float(self.statistic),
            "p_value": None if self.p_value is None else float(self.p_value),
            "threshold": float(self.threshold),
            "drifted": int(self.drifted),
            "n_ref": int(self.n_ref),
            "n_cur": int(self.n_cur),
            "explanation": json.dumps(self.explanation, sort_keys=True, allow_nan=False),
        }
