"""Drift tests for numeric fields (latency, tokens, response length): KS, PSI, Wasserstein.

Same interface as the embedding detectors in :mod:`driftline.detectors.semantic`:
``fit(reference)``, ``score(current) -> DriftResult``, ``get_state()`` /
``set_state()`` / ``from_state()``, settings under their constructor names,
``ValueError`` on bad settings. Inputs are 1-D arrays of finite numbers
(``texts`` is accepted for interface symmetry and ignored).

Decision rules (also in each result's ``explanation["rule"]``):

- :class:`KSDrift` — two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``),
  ``drifted = p_value < alpha``.
- :class:`PSIDrift` — population stability index on reference-quantile bins,
  ``drifted = PSI > threshold`` (0.2 by default, the conventional "significant
  shift" level; 0.1 is the usual "watch" level). No p-value.
- :class:`WassersteinDrift` — 1-D Wasserstein distance divided by the reference
  IQR (so it reads in "IQRs moved" and is comparable across fields), with a
  permutation p-value; ``drifted = p_value < alpha and statistic >= min_effect``.
"""

from __future__ import annotations

# one detector per module (River's layout); this module keeps the family's names importable
from .ks import KSDrift
from .psi import PSIDrift, psi
from .wasserstein import WassersteinDrift, wasserstein_batched

__all__ = ["KSDrift", "PSIDrift", "WassersteinDrift", "psi", "wasserstein_batched"]
