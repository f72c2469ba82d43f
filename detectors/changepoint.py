"""Streaming change-point detectors on per-window scalars: Page-Hinkley and ADWIN.

River-style: ``update(x)`` is the only method that changes state; the verdict is
read from the read-only property ``drift_detected``, which is ``True`` exactly
on the update at which a change was detected (the next ``update`` starts a new
run). Settings keep the constructor's names; bad settings raise ``ValueError``
at construction. ``get_state()`` returns a JSON-serialisable dict and
``set_state()`` restores it exactly, so a restarted worker resumes where it
stopped (``from_state()`` builds a detector from the saved settings).

No clock, no I/O: the caller feeds one scalar per window (p95 latency, a drift
score, a guardrail hit rate, ...).
"""

from __future__ import annotations

# one detector per module (River's layout); this module keeps the family's names importable
from .adwin import ADWIN
from .page_hinkley import PageHinkley

__all__ = ["PageHinkley", "ADWIN"]
