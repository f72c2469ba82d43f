"""A combining detector: an embedding detector whose verdict is taken at a level set per test.

A stage that runs many tests (keys x fields x methods) controls its false alarms with a
per-test level that changes as keys appear (Bonferroni: ``alpha / family size``). The
wrapped detector keeps its seeded test stream across those changes (rebuilding it at each
new level would restart its permutations), so the level is given to :meth:`AtLevel.score`
and the verdict is taken here, by :func:`drifted_at`, never by the caller:

``drifted = p_value < level`` (a missing p-value never alarms), and for topic mix also
``total_variation >= min_effect`` (the wrapped :class:`~driftline.detectors.topic_mix.TopicMixDrift`'s
own effect size), which is the wrapped detector's own rule at that level. Pure: no I/O, no clock.

Examples
--------
>>> import numpy as np
>>> from driftline.detectors.centroid import CentroidDrift
>>> rng = np.random.default_rng(0)
>>> det = AtLevel(CentroidDrift(n_permutations=999, seed=1)).fit(np.ones(8) + rng.normal(size=(300, 8)))
>>> for shift in (0.0, 1.0):
...     cur = np.ones(8) + rng.normal(size=(200, 8))
...     cur[:, 0] += shift
...     r = det.score(cur, alpha=0.01)
...     print(f"shift={shift}: drifted={r.drifted} threshold={r.threshold}")
shift=0.0: drifted=False threshold=0.01
shift=1.0: drifted=True threshold=0.01
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Self

import numpy.typing as npt

from driftline.schemas.drift_result import DriftResult

from ._checks import _check_alpha
from .base import Detector

__all__ = ["AtLevel", "drifted_at"]

#: the detectors whose rule is ``p_value < alpha`` (topic mix: and an effect size)
P_VALUE_METHODS = ("mmd", "classifier_auc", "topic_mix", "centroid_cosine")


def drifted_at(result: DriftResult, alpha_test: float, min_effect: float = 0.0) -> bool:
    """The verdict on one test at level ``alpha_test``: ``p < alpha_test`` (a missing
    p-value never alarms), and for topic mix also a total variation of at least ``min_effect``."""
    p = result.p_value if result.p_value is not None else 1.0
    drifted = p < alpha_test
    if result.method == "topic_mix":
        drifted = drifted and result.explanation.get("total_variation", 0.0) >= min_effect
    return bool(drifted)


class AtLevel:
    """``detector`` judged at the level passed to each :meth:`score` (see the module docstring).

    Parameters
    ----------
    detector
        An embedding detector (MMD, classifier, topic mix, centroid); its own ``alpha`` is
        not used. A detector with another rule (PSI, Wasserstein's effect size) raises
        ``ValueError``.
    level
        How the caller derives the level, quoted in each result's ``explanation["rule"]``
        (the wrapped detector's rule moves to ``explanation["detector_rule"]``).
    """

    def __init__(self, detector: Detector, *, level: str = "alpha") -> None:
        if detector.method not in P_VALUE_METHODS:
            raise ValueError(f"AtLevel judges the p-value detectors {P_VALUE_METHODS}, "
                             f"not {type(detector).__name__} (method {detector.method!r})")
        self._detector = detector
        self._level = level
        # only topic mix has an effect-size condition; the others' rule is p < level alone
        self._min_effect = float(getattr(detector, "min_effect", 0.0))

    @property
    def detector(self) -> Detector:
        return self._detector

    @property
    def level(self) -> str:
        return self._level

    def fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None = None) -> Self:
        """Fit the wrapped detector on ``reference``."""
        self._detector.fit(reference, texts=texts)
        return self

    def score(self, current: npt.ArrayLike, texts: Sequence[str] | None = None, *,
              alpha: float) -> DriftResult:
        """Score ``current`` with the wrapped detector and decide at level ``alpha``:
        the result's ``threshold`` is ``alpha`` and ``drifted`` is :func:`drifted_at`."""
        _check_alpha(alpha)
        r = self._detector.score(current, texts=texts)
        expl = dict(r.explanation)
        expl.update({"detector_rule": expl.get("rule"),
                     "rule": f"drifted = p_value < threshold (threshold = {self._level})"})
        return replace(r, threshold=alpha, drifted=drifted_at(r, alpha, self._min_effect), explanation=expl)
