"""The domain-classifier drift test (one detector: :class:`ClassifierDrift`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from driftline.schemas.drift_result import DriftResult

from .base import RULE_P, Detector, FloatArray, _as_matrix, _texts, decode_array, encode_array

__all__ = ["ClassifierDrift"]


class ClassifierDrift(Detector):
    """Domain-classifier two-sample test: can a model tell current from reference?

    Sample-split design (one model, held-out scores). Each test draws, with its
    seeded random stream, a ``train_fraction`` share of the reference rows and
    the same share of the current rows as the training set; the rest is held
    out. On the training set a shrinkage linear discriminant is fitted in
    closed form (numpy): features standardised by the pooled within-class
    standard deviation, the pooled within-class covariance shrunk towards a
    scaled identity (``shrinkage``: ``None`` = the Ledoit-Wolf estimate of the
    shrinkage intensity, else a fixed value in ``[0, 1]``), direction
    ``w = Σ⁻¹ (mean_cur - mean_ref)``. The held-out points are scored with that
    one model, ``s = x · w``. The statistic is the held-out ROC AUC of
    "current" vs "reference" (0.5 = indistinguishable); the p-value is the
    one-sided Mann-Whitney U test of the held-out scores (AUC = U /
    (n_ref_test · n_cur_test), alternative AUC > 0.5). Rule:
    ``drifted = p_value < alpha``.

    Why this design: under no drift all rows are i.i.d. and the held-out rows
    are independent of the training rows, so given the fitted model their
    scores are i.i.d. as well, and the Mann-Whitney test is valid whatever the
    classifier learnt (its level is exact up to the normal approximation of U,
    which at hundreds of points is far finer than α). Cross-fitting (every
    point held out once, scored by different fold models) uses all points but
    its pooled scores are not exchangeable, and a permutation p-value would
    refit the models hundreds of times. The split costs half the points in
    the AUC; the closed-form discriminant costs one ``d x d`` solve per test,
    some 25-50x less than a cross-fitted logistic regression
    (``benchmarks/RESULTS.md``, "Module speed notes").

    When current texts are given, the explanation lists up to three held-out
    current texts the classifier finds most "current-like" (what is new;
    training points are left out because the model has partly memorised them).

    Parameters
    ----------
    alpha, seed
        Level of one test; seed of the train / held-out split (per test).
    train_fraction
        Share of each sample used to train the classifier (in ``(0, 1)``);
        the rest is held out for the AUC.
    shrinkage
        Covariance shrinkage in ``[0, 1]``, or ``None`` for Ledoit-Wolf.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = ClassifierDrift(seed=1).fit(rng.normal(size=(400, 8)))
    >>> for shift in (0.0, 0.5):
    ...     r = det.score(rng.normal(size=(400, 8)) + shift)
    ...     print(f"shift={shift}: drifted={r.drifted}")
    shift=0.0: drifted=False
    shift=0.5: drifted=True
    """

    method = "classifier_auc"

    def __init__(
        self,
        *,
        alpha: float = 0.05,
        seed: int = 0,
        train_fraction: float = 0.5,
        shrinkage: float | None = None,
    ) -> None:
        super().__init__(alpha=alpha, seed=seed)
        if not (
            isinstance(train_fraction, int | float)
            and not isinstance(train_fraction, bool)
            and 0.0 < train_fraction < 1.0
        ):
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        if shrinkage is not None and not (
            isinstance(shrinkage, int | float)
            and not isinstance(shrinkage, bool)
            and 0.0 <= shrinkage <= 1.0
        ):
            raise ValueError(f"shrinkage must be None or in [0, 1], got {shrinkage!r}")
        self._train_fraction = float(train_fraction)
        self._shrinkage = None if shrinkage is None else float(shrinkage)
        self._ref: FloatArray = np.empty((0, 0))

    @property
    def train_fraction(self) -> float:
        return self._train_fraction

    @property
    def shrinkage(self) -> float | None:
        return self._shrinkage

    def _settings(self) -> dict[str, Any]:
        return {"train_fraction": self._train_fraction, "shrinkage": self._shrinkage}

    def _split_sizes(self, n: int, name: str) -> int:
        """Training rows out of ``n``; at least 2 for training and 1 held out."""
        n_train = min(max(int(round(self._train_fraction * n)), 2), n - 1)
        if n < 3:
            raise ValueError(f"{name} needs >= 3 rows (2 to train, 1 held out), got {n}")
        return n_train

    def _fit(self, reference: npt.ArrayLike, texts: Sequence[str] | None) -> None:
        ref = _as_matrix(reference, "reference")
        self._split_sizes(ref.shape[0], "reference")
        self._ref = ref
        self._n_ref = ref.shape[0]

    def _fitted_state(self) -> dict[str, Any]:
        return {"reference": encode_array(self._ref)}

    def _load_fitted_state(self, data: dict[str, Any]) -> None:
        self._ref = decode_array(data["reference"])
        self._n_ref = self._ref.shape[0]

    def _direction(self, x0: FloatArray, x1: FloatArray) -> tuple[FloatArray, float]:
        """Shrinkage-LDA direction from training rows of class 0 / 1, and the shrinkage used."""
        mu0, mu1 = x0.mean(axis=0), x1.mean(axis=0)
        z = np.vstack([x0 - mu0, x1 - mu1])  # class-centred (pooled within-class)
        nz, d = z.shape
        sd = np.sqrt((z * z).sum(axis=0) / nz)
        sd = np.where(sd > 1e-12 * max(1.0, float(sd.max(initial=0.0))), sd, 1.0)
        z = z / sd
        s = (z.T @ z) / nz  # within-class covariance of the standardised features
        mu_t = float(np.trace(s)) / d
        if self._shrinkage is None:
            # Ledoit-Wolf (2004) optimal intensity towards mu_t·I. beta =
            # sum_i ||z_i z_i' - s||_F^2 / nz^2 = (sum_i ||z_i||^4 / nz - ||s||_F^2) / nz:
            # the same number as ((z*z)'(z*z) / nz - s*s).sum() / nz without that d x d product
            sq = np.einsum("ij,ij->i", z, z)
            beta = (float(sq @ sq) / nz - float((s * s).sum())) / nz
            delta = float(((s - mu_t * np.eye(d)) ** 2).sum())
            lam = 1.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
        else:
            lam = self._shrinkage
        cov = (1.0 - lam) * s
        cov[np.diag_indices(d)] += lam * mu_t
        diff = (mu1 - mu0) / sd
        try:
            w = np.linalg.solve(cov, diff)
        except np.linalg.LinAlgError:  # singular (shrinkage 0 with d > n)
            w = np.linalg.lstsq(cov, diff, rcond=None)[0]
        return w / sd, lam

    def _score(
        self, current: npt.ArrayLike, texts: Sequence[str] | None, rng: np.random.Generator
    ) -> DriftResult:
        cur = _as_matrix(current, "current")
        cur_texts = _texts(texts, cur.shape[0], "current")
        if cur.shape[1] != self._ref.shape[1]:
            raise ValueError(f"current has d={cur.shape[1]}, reference d={self._ref.shape[1]}")
        n, m = self._n_ref, cur.shape[0]
        n_tr, m_tr = self._split_sizes(n, "reference"), self._split_sizes(m, "current")
        perm_r, perm_c = rng.permutation(n), rng.permutation(m)
        tr_r, te_r = perm_r[:n_tr], np.sort(perm_r[n_tr:])
        tr_c, te_c = perm_c[:m_tr], np.sort(perm_c[m_tr:])
        w, lam = self._direction(self._ref[np.sort(tr_r)], cur[np.sort(tr_c)])
        s_ref, s_cur = self._ref[te_r] @ w, cur[te_c] @ w
        mw = stats.mannwhitneyu(s_cur, s_ref, alternative="greater")
        auc = float(mw.statistic) / (s_ref.size * s_cur.size)
        p = float(mw.pvalue)
        explanation: dict[str, Any] = {
            "rule": RULE_P,
            "auc": auc,
            "n_train": [int(n_tr), int(m_tr)],
            "n_test": [int(s_ref.size), int(s_cur.size)],
            "shrinkage": lam,
            "p_value_method": "one-sided Mann-Whitney U of held-out scores (one model)",
        }
        if cur_texts is not None:
            top = np.argsort(-s_cur, kind="stable")[:3]
            explanation["most_current_like"] = [cur_texts[int(te_c[i])] for i in top]
        return DriftResult(
            method=self.method,
            statistic=auc,
            p_value=min(max(p, 0.0), 1.0),
            threshold=self._alpha,
            drifted=p < self._alpha,
            n_ref=n,
            n_cur=m,
            explanation=explanation,
        )
