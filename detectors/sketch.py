"""A DDSketch-style relative-error quantile sketch, vectorised for batches.

Values are counted in logarithmic buckets: bucket ``k`` holds the values in
``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + a) / (1 - a)`` for relative
accuracy ``a``, and reports ``2 * gamma**k / (gamma + 1)``, which is within a
relative error ``a`` of every value in the bucket (Masson, Rim and Lee,
*DDSketch*, VLDB 2019). Buckets are a dense ``int64`` array with an offset,
so a batch is one ``np.log``, one ``np.ceil`` and one ``np.bincount``.

We do not use the ``ddsketch`` PyPI package: its ``add`` is one Python call
per value, and the worker must keep up with 25,000+ events/s per core.

Guarantee
---------
For every ``q``, :meth:`QuantileSketch.quantile` returns ``x_hat`` with
``|x_hat - x| <= a * x`` where ``x`` is the exact rank-``r`` value, for every
positive ``x > min_positive`` — over the whole float range, because the
store never collapses buckets (at ``a = 0.01`` the full range
``1e-9 .. 1e308`` is at most ~36,500 buckets, 290 KB; latencies in ms span
a few hundred). Values ``<= min_positive`` (zeros included) are counted in a
zero bucket that reports ``0.0``, an absolute error of at most ``min_positive``.
Estimates are clamped into ``[min, max]``, and the extreme ranks return the
exact ``min`` / ``max``.

Rank rule
---------
The same as ClickHouse ``quantileExact(q)``: the value at 0-based index
``r = min(floor(q * n), n - 1)`` of the sorted values (no interpolation), so
sketch percentiles and SQL percentiles on ``llm_events`` agree up to ``a``.

Speed
-----
Prefer ``add_many``: one value at a time costs hundreds of times more per value
(figures: ``benchmarks/RESULTS.md``, "Module speed notes").

Examples
--------
>>> import numpy as np
>>> s = QuantileSketch(relative_accuracy=0.01)
>>> s.add_many(np.arange(1, 1001, dtype=float))
>>> s.count, s.min, s.max
(1000, 1.0, 1000.0)
>>> exact = 951.0  # sorted index floor(0.95 * 1000) = 950
>>> abs(s.quantile(0.95) - exact) <= 0.01 * exact
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["QuantileSketch"]

_STATE_VERSION = 1


class QuantileSketch:
    """Relative-error quantile sketch (DDSketch mapping, dense store, no collapsing).

    Parameters
    ----------
    relative_accuracy : float
        ``a`` in ``(0, 1)``; every quantile is within ``a`` relative error.
    min_positive : float
        Values ``<= min_positive`` (and zeros) go to the zero bucket.

    Examples
    --------
    >>> s = QuantileSketch(0.02)
    >>> s.add_many(np.array([0.0, 10.0, 20.0, 30.0]))
    >>> s.quantile(0.0), s.quantile(1.0), s.count
    (0.0, 30.0, 4)
    """

    __slots__ = (
        "_a",
        "_min_positive",
        "_gamma",
        "_inv_log_gamma",
        "_counts",
        "_offset",
        "_zero",
        "_count",
        "_sum",
        "_min",
        "_max",
    )

    def __init__(self, relative_accuracy: float = 0.01, min_positive: float = 1e-9) -> None:
        if not (isinstance(relative_accuracy, (int, float)) and 0.0 < relative_accuracy < 1.0):
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        if not (
            isinstance(min_positive, (int, float))
            and 0.0 < min_positive < 1.0
            and math.isfinite(min_positive)
        ):
            raise ValueError(f"min_positive must be in (0, 1), got {min_positive!r}")
        self._a = float(relative_accuracy)
        self._min_positive = float(min_positive)
        self._gamma = (1.0 + self._a) / (1.0 - self._a)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._counts: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._offset = 0  # key of _counts[0]
        self._zero = 0
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    # ---------------------------------------------------------------- properties

    @property
    def relative_accuracy(self) -> float:
        """The guaranteed relative accuracy ``a``."""
        return self._a

    @property
    def min_positive(self) -> float:
        """Values at or below this are counted as zero."""
        return self._min_positive

    @property
    def count(self) -> int:
        """Number of values added."""
        return self._count

    @property
    def sum(self) -> float:
        """Sum of the values added (exact up to float rounding)."""
        return self._sum

    @property
    def min(self) -> float | None:
        """Smallest value added (exact), or None when empty."""
        return self._min if self._count else None

    @property
    def max(self) -> float | None:
        """Largest value added (exact), or None when empty."""
        return self._max if self._count else None

    @property
    def mean(self) -> float | None:
        """Mean of the values added, or None when empty."""
        return self._sum / self._count if self._count else None

    # ---------------------------------------------------------------- updates

    def add_many(self, values: npt.ArrayLike) -> None:
        """Add a batch of values (any shape; flattened).

        Raises ``ValueError`` for negative, NaN or infinite values; the sketch
        is unchanged then.
        """
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        lo = float(v.min())
        hi = float(v.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("values must be finite (NaN or inf found)")
        if lo < 0.0:
            raise ValueError(
                f"values must be >= 0 (got {lo!r}); the sketch tracks non-negative quantities"
            )
        pos = v[v > self._min_positive] if lo <= self._min_positive else v
        if pos.size:
            keys = np.ceil(np.log(pos) * self._inv_log_gamma).astype(np.int64)
            kmin = int(keys.min())
            kmax = int(keys.max())
            self._reserve(kmin, kmax)
            self._counts[kmin - self._offset : kmax - self._offset + 1] += np.bincount(
                keys - kmin, minlength=kmax - kmin + 1
            )
        self._zero += int(v.size - pos.size)
        self._count += int(v.size)
        self._sum += float(v.sum())
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)

    def add(self, value: float) -> None:
        """Add one value (prefer :meth:`add_many` on the hot path)."""
        x = float(value)
        if not math.isfinite(x):
            raise ValueError("values must be finite (NaN or inf found)")
        if x < 0.0:
            raise ValueError(
                f"values must be >= 0 (got {x!r}); the sketch tracks non-negative quantities"
            )
        if x <= self._min_positive:
            self._zero += 1
        else:
            k = math.ceil(math.log(x) * self._inv_log_gamma)
            self._reserve(k, k)
            self._counts[k - self._offset] += 1
        self._count += 1
        self._sum += x
        self._min = min(self._min, x)
        self._max = max(self._max, x)

    def _reserve(self, kmin: int, kmax: int) -> None:
        n = self._counts.size
        if n == 0:
            self._offset = kmin
            self._counts = np.zeros(kmax - kmin + 1, dtype=np.int64)
            return
        lo = min(kmin, self._offset)
        hi = max(kmax, self._offset + n - 1)
        if lo == self._offset and hi == self._offset + n - 1:
            return
        # grow with slack so a drifting range does not reallocate on every batch
        slack = max(8, (hi - lo + 1) // 4)
        if lo < self._offset:
            lo -= slack
        if hi > self._offset + n - 1:
            hi += slack
        grown = np.zeros(hi - lo + 1, dtype=np.int64)
        grown[self._offset - lo : self._offset - lo + n] = self._counts
        self._counts = grown
        self._offset = lo

    def merge(self, other: QuantileSketch) -> None:
        """Add all of ``other``'s values into this sketch (same accuracy required)."""
        if other._a != self._a or other._min_positive != self._min_positive:
            raise ValueError(
                "cannot merge sketches with different settings: "
                f"relative_accuracy {self._a} vs {other._a}, min_positive {self._min_positive} vs {other._min_positive}"
            )
        if other._count == 0:
            return
        nz = np.flatnonzero(other._counts)
        if nz.size:
            kmin = other._offset + int(nz[0])
            kmax = other._offset + int(nz[-1])
            self._reserve(kmin, kmax)
            self._counts[kmin - self._offset : kmax - self._offset + 1] += other._counts[
                nz[0] : nz[-1] + 1
            ]
        self._zero += other._zero
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    # ---------------------------------------------------------------- queries

    def _value(self, key: int) -> float:
        est = 2.0 * self._gamma**key / (self._gamma + 1.0)
        return min(max(est, self._min), self._max)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (``0 <= q <= 1``) under the ClickHouse ``quantileExact`` rank rule.

        Returns None when the sketch is empty.
        """
        return self.quantiles([q])[0]

    def quantiles(self, qs: list[float] | tuple[float, ...]) -> list[float | None]:
        """Several quantiles with one cumulative pass (e.g. p50, p95, p99)."""
        for q in qs:
            if not (0.0 <= q <= 1.0):
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        n = self._count
        if n == 0:
            return [None for _ in qs]
        cum = np.cumsum(self._counts)
        out: list[float | None] = []
        for q in qs:
            r = min(math.floor(q * n), n - 1)
            if r == 0:
                out.append(self._min)
            elif r == n - 1:
                out.append(self._max)
            elif r < self._zero:
                out.append(min(max(0.0, self._min), self._max))
            else:
                i = int(np.searchsorted(cum, r - self._zero, side="right"))
                out.append(self._value(self._offset + i))
        return out

    # ---------------------------------------------------------------- state

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (sparse buckets: keys and counts)."""
        nz = np.flatnonzero(self._counts)
        return {
            "version": _STATE_VERSION,
            "relative_accuracy": self._a,
            "min_positive": self._min_positive,
            "keys": (nz + self._offset).tolist(),
            "counts": self._counts[nz].tolist(),
            "zero_count": self._zero,
            "count": self._count,
            "sum": self._sum,
            "min": self._min if self._count else None,
            "max": self._max if self._count else None,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Replace this sketch's contents (and settings) with a :meth:`get_state` snapshot."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported sketch state version {state.get('version')!r}")
        fresh = QuantileSketch(float(state["relative_accuracy"]), float(state["min_positive"]))
        keys = np.asarray(state["keys"], dtype=np.int64)
        counts = np.asarray(state["counts"], dtype=np.int64)
        if keys.shape != counts.shape or (counts.size and int(counts.min()) <= 0):
            raise ValueError("sketch state: keys and counts must be equal-length, counts > 0")
        zero = int(state["zero_count"])
        count = int(state["count"])
        if int(counts.sum()) + zero != count:
            raise ValueError("sketch state: bucket counts do not add up to count")
        if keys.size:
            fresh._reserve(int(keys.min()), int(keys.max()))
            np.add.at(fresh._counts, keys - fresh._offset, counts)
        fresh._zero = zero
        fresh._count = count
        fresh._sum = float(state["sum"])
        fresh._min = float(state["min"]) if count else math.inf
        fresh._max = float(state["max"]) if count else -math.inf
        for name in self.__slots__:
            setattr(self, name, getattr(fresh, name))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuantileSketch:
        """A new sketch from a :meth:`get_state` snapshot."""
        s = cls(float(state["relative_accuracy"]), float(state["min_positive"]))
        s.set_state(state)
        return s

    def copy(self) -> QuantileSketch:
        """An independent copy."""
        return QuantileSketch.from_state(self.get_state())

    def __repr__(self) -> str:
        return f"QuantileSketch(relative_accuracy={self._a}, count={self._count})"
