"""Pure statistics: drift detectors and what they share. No I/O, no clock, no stage state.

One detector per module (River's layout); the family modules re-export their detectors, so
``from driftline.detectors.semantic import MMDDrift`` and the like keep working:

- embeddings (:mod:`.drift`): :mod:`.mmd`, :mod:`.classifier`, :mod:`.topic_mix`, :mod:`.centroid`,
  on :mod:`.base` (the ``Detector`` base) and :mod:`.permutation` (permutation tests and
  their sizing); :mod:`.at_level` judges one of them at a level set per test (the drift stage's
  Bonferroni level), so the stage reports the detector's verdict as it is;
- numeric fields (:mod:`.numeric`): :mod:`.ks`, :mod:`.psi`, :mod:`.wasserstein`;
- change points (:mod:`.changepoint`): :mod:`.page_hinkley`, :mod:`.adwin`;
- :mod:`.sequential`: anytime-valid confidence sequences comparing two populations (A/B of
  prompt versions or models; ``driftline compare`` / ``gate``);
- :mod:`.sampling` (hash sampling of events), :mod:`.calibration` (false-alarm budgets),
  :mod:`.sketch` (quantiles), :mod:`.guardrails`
  and :mod:`.redact` (text scanning), :mod:`.semantic_guard` (known-attack similarity of embeddings).

This ``__init__`` imports nothing, so importing one light module (redact, guardrails) does not
pull in scipy or scikit-learn.
"""
