"""Hash sampling: which events a stage keeps, decided by the event id alone.

An event is kept when a 32-bit hash of its ``event_id`` is below ``rate * 2**32``
(CRC-32 at C speed, salted, finalised with murmur3's mixer so every input bit moves
every output bit). The decision depends on the event alone, so it is uniform within
every window and key, the same on every worker and after restarts. Pure: no I/O, no
clock, no state.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["keep_event", "sample_hash", "sample_mask"]


def _mix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser: every input bit moves every output bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def sample_hash(event_id: str, salt: int = 0) -> int:
    """32-bit hash of an event id: CRC-32 (C speed), salted and finalised with murmur3's mixer."""
    return _mix32(zlib.crc32(event_id.encode("utf-8", "replace")) ^ ((salt * 0x9E3779B9) & 0xFFFFFFFF))


def sample_mask(event_ids: Sequence[str], rate: float, salt: int = 0) -> npt.NDArray[np.bool_]:
    """:func:`keep_event` for many ids at once (CRC-32 per id, the mixer vectorised in numpy)."""
    n = len(event_ids)
    if rate >= 1.0:
        return np.ones(n, dtype=bool)
    crc = zlib.crc32
    h = np.fromiter((crc(e.encode("utf-8", "replace")) for e in event_ids), dtype=np.uint64, count=n)
    h ^= np.uint64((salt * 0x9E3779B9) & 0xFFFFFFFF)
    m = np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & m
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & m
    h ^= h >> np.uint64(16)
    return h < np.uint64(int(rate * 4294967296.0))


def keep_event(event_id: str, rate: float, salt: int = 0) -> bool:
    """Hash sampling: keep ``event_id`` when :func:`sample_hash` < ``rate * 2**32``."""
    if rate >= 1.0:
        return True
    return sample_hash(event_id, salt) < int(rate * 4294967296.0)
