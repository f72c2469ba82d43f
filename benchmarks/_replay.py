"""The replay data every benchmark draws its events from."""

from __future__ import annotations

from typing import Any


def replay_data(seed: int) -> tuple[Any, str]:
    """The real replay pool (AlpacaEval + safety sets, cached) and a label saying so;
    with no cache and no network, the synthetic pool, said loudly."""
    from driftline.streams.devdata.replay import ReplayData

    try:
        return ReplayData.load(), "real (AlpacaEval + safety sets via ReplayData.load())"
    except Exception as exc:  # noqa: BLE001 - no cache and no network: say so and go on
        print(f"!! real replay data unavailable ({type(exc).__name__}: {exc}); "
              "FALLING BACK TO SYNTHETIC data (ReplayData.synthetic)", flush=True)
        return ReplayData.synthetic(seed), "SYNTHETIC (ReplayData.synthetic fallback)"
