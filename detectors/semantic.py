"""Two-sample drift tests on embeddings: MMD², domain classifier, topic mix, centroid distance.

Every detector here (and in :mod:`driftline.detectors.numeric`) has the same shape:

- constructor settings, validated at construction (``ValueError``), kept under
  their constructor names and listed by :attr:`~Detector.settings`;
- ``fit(reference, texts=None)`` stores the reference (and what is derived from
  it: kernel bandwidth, clusters, ...);
- ``score(current, texts=None) -> DriftResult`` tests a current window against
  the reference. Scoring never changes the reference; the only state it moves
  is the test counter, from which each test's random stream is derived
  (``numpy.random.default_rng([seed, counter])``), so a detector restored with
  ``set_state(get_state())`` gives exactly the scores the original would have
  (:class:`MMDDrift` and :class:`CentroidDrift` use one permutation set per reference,
  the first test's; a restored :class:`MMDDrift` gives the same p-values and the
  statistic to float32 round-off, as it no longer holds the last window's products);
- ``get_state()`` / ``set_state()`` / ``from_state()``: a JSON-serialisable dict
  (arrays as base64 of little-endian float64) holding the settings, the
  reference and the counter.

Pure statistics: no I/O, no clock, no globals. ``alpha`` is the per-test level;
see :mod:`driftline.detectors.calibration` for turning a false-alarm budget over
many keys and fields into a per-test ``alpha``.
"""

from __future__ import annotations

# one detector per module (River's layout); this module keeps the family's names importable
from .base import Detector, NotFittedError, decode_array, encode_array
from .centroid import CentroidDrift
from .classifier import ClassifierDrift
from .mmd import MMDDrift
from .permutation import permutation_indicators
from .topic_mix import TopicMixDrift, default_n_clusters

__all__ = [
    "Detector",
    "NotFittedError",
    "MMDDrift",
    "ClassifierDrift",
    "TopicMixDrift",
    "CentroidDrift",
    "default_n_clusters",
    "permutation_indicators",
    "encode_array",
    "decode_array",
]
