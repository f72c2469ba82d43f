"""Per-trace (conversation, user) state for the ``runaway`` alert rules: agent loops,
repeated prompts and cost per trace, evaluated in the stream.

:class:`TraceTracker` is pure logic fed by the alerting stage with every stored call
(:meth:`TraceTracker.observe`) and read by the rule evaluator
(:meth:`TraceTracker.value`) at an event time ``now``: the figure of one group over the
rolling window ``(now - window, now]``, at the resolution of its buckets.

Bounded state:

- at most ``max_groups`` groups (trace, conversation or user ids) per dimension; past it
  the group least recently fed is dropped and counted in :attr:`TraceTracker.evicted`
  (an alert of a dropped group then resolves for lack of data);
- buckets older than the longest window are pruned (:meth:`TraceTracker.prune`);
- at most ``max_prompts`` distinct prompt hashes per group (the oldest dropped).

Ownership: each bucket remembers the (app, model) key of its calls, so
:meth:`TraceTracker.retain` keeps exactly the calls of the keys a worker owns after a
rebalance. A trace that calls several models (or tools, whose events are keyed
``app/``) has its calls on several partitions: with one worker every call is counted;
with several, each worker counts the calls of the partitions it holds, so a runaway
rule sees a lower bound of the trace's figures (it never over-counts, it can miss a
loop split evenly across workers). ``trace_summary`` (ClickHouse) is exact either way.

Prompts are compared by a hash of their normalised text (:func:`prompt_key`): NFKC,
casefolded, every run of digits read as ``0``, whitespace collapsed. Retries that differ
only in a counter, a timestamp or spacing count as the same prompt. Embedding similarity
is not used: the drift stage embeds a sample of the events only (about 60 texts/s on a
CPU), so most calls of a loop have no embedding to compare.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AGENT_TOOL_OPERATIONS", "TraceTracker", "prompt_key"]

#: operations that are not model calls (schemas/event.py MODEL_OPTIONAL_OPERATIONS)
AGENT_TOOL_OPERATIONS = frozenset({"execute_tool", "invoke_agent", "create_agent", "invoke_workflow"})
_DIGITS = re.compile(r"\d+")
# the figures kept per bucket, in this order
_CALLS, _LLM, _TOOL, _ERR, _TOK, _COST = range(6)
_INDEX = {"calls.count": _CALLS, "llm_calls.count": _LLM, "tool_calls.count": _TOOL,
          "errors.count": _ERR, "tokens.sum": _TOK, "cost_usd.sum": _COST}


def prompt_key(text: str) -> str:
    """The hash of a prompt's normalised text (module docstring), 16 hex digits."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    t = " ".join(_DIGITS.sub("0", text.casefold()).split())
    return hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


@dataclass(slots=True)
class _Group:
    """One trace (conversation, user): the app of its first call, its newest event time,
    per (bucket start, app, model) the figures, per prompt hash its calls per bucket."""

    app: str
    newest_ms: int
    buckets: dict[tuple[int, str, str], list[float]] = field(default_factory=dict)
    prompts: dict[str, dict[tuple[int, str, str], int]] = field(default_factory=dict)
    #: the figures summed over every bucket held, and the most calls of one prompt over them:
    #: upper bounds of any window's figures, so most groups are skipped without a scan
    totals: list[float] = field(default_factory=lambda: [0.0] * 6)
    top_prompt: int = 0
    #: calls per prompt hash over every bucket held
    prompt_n: dict[str, int] = field(default_factory=dict)
    #: the oldest bucket start held (prune skips the groups with nothing to drop)
    oldest_ms: int = 1 << 62

    def recount(self) -> None:
        """``totals`` and ``top_prompt`` from the buckets held (after buckets were dropped)."""
        t = [0.0] * 6
        for v in self.buckets.values():
            for i in range(6):
                t[i] += v[i]
        self.totals = t
        self.prompt_n = {pk: sum(per.values()) for pk, per in self.prompts.items()}
        self.top_prompt = max(self.prompt_n.values(), default=0)
        self.oldest_ms = min((k[0] for k in self.buckets), default=1 << 62)


class TraceTracker:
    """Rolling per-group figures for runaway rules (module docstring).

    ``dims``: the group dimensions the rules use (``trace_id``, ``conversation_id``,
    ``user_id``); ``keep_ms``: the longest window; ``bucket_ms``: the time resolution.
    """

    def __init__(self, dims: tuple[str, ...], keep_ms: int, *, bucket_ms: int = 1000,
                 max_groups: int = 10_000, max_prompts: int = 256) -> None:
        if keep_ms <= 0 or bucket_ms <= 0:
            raise ValueError("keep_ms and bucket_ms must be > 0")
        if max_groups < 1 or max_prompts < 1:
            raise ValueError("max_groups and max_prompts must be >= 1")
        self.dims = dims
        self.keep_ms = keep_ms
        self.bucket_ms = bucket_ms
        self.max_groups = max_groups
        self.max_prompts = max_prompts
        self._groups: dict[str, dict[str, _Group]] = {d: {} for d in dims}
        #: groups dropped to stay under ``max_groups``, per dimension
        self.evicted: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    # -- input -----------------------------------------------------------------------------
    def observe(self, ts_ms: int, app: str, model: str, ids: dict[str, str | None], *, operation: str,
                status: str, tokens: int, cost_usd: float | None, prompt: str | None) -> None:
        """One stored call; ``ids`` maps each dimension to the call's id (None/'': not in a group)."""
        b = ts_ms - ts_ms % self.bucket_ms
        bk = (b, app, model)
        tool = operation == "execute_tool"
        llm = operation not in AGENT_TOOL_OPERATIONS
        pk = prompt_key(prompt) if llm and prompt else None
        priced = cost_usd is not None and cost_usd == cost_usd
        add = (1.0, float(llm), float(tool), float(status == "error"), float(tokens),
               float(cost_usd) if priced else 0.0)  # type: ignore[arg-type]
        for dim, groups in self._groups.items():
            gid = ids.get(dim)
            if not gid:
                continue
            g = groups.pop(gid, None)
            if g is None:
                g = _Group(app, ts_ms)
                if len(groups) >= self.max_groups:
                    del groups[next(iter(groups))]  # the least recently fed
                    self.evicted[dim] = self.evicted.get(dim, 0) + 1
            groups[gid] = g  # most recently fed last
            g.newest_ms = max(g.newest_ms, ts_ms)
            v = g.buckets.get(bk)
            if v is None:
                g.buckets[bk] = list(add)
                if b < g.oldest_ms:
                    g.oldest_ms = b
            else:
                g.buckets[bk] = [x + y for x, y in zip(v, add, strict=True)]
            g.totals = [x + y for x, y in zip(g.totals, add, strict=True)]
            if pk is not None:
                per = g.prompts.pop(pk, None)
                if per is None:
                    per = {}
                    if len(g.prompts) >= self.max_prompts:
                        gone = next(iter(g.prompts))
                        del g.prompts[gone]
                        g.prompt_n.pop(gone, None)
                g.prompts[pk] = per
                per[bk] = per.get(bk, 0) + 1
                n = g.prompt_n[pk] = g.prompt_n.get(pk, 0) + 1
                if n > g.top_prompt:
                    g.top_prompt = n

    # -- reads -----------------------------------------------------------------------------
    def groups(self, dim: str) -> Iterator[tuple[str, str]]:
        """(id, app of its first call) of every group of ``dim``."""
        for gid, g in self._groups.get(dim, {}).items():
            yield gid, g.app

    def bound(self, dim: str, gid: str, metric: str) -> float:
        """An upper bound of :meth:`value` for any window (the figure over every call held)."""
        g = self._groups[dim][gid]
        return float(g.top_prompt) if metric == "prompt.repeats" else g.totals[_INDEX[metric]]

    def value(self, dim: str, gid: str, metric: str, window_ms: int, now_ms: int) -> tuple[float, int] | None:
        """(the figure, the newest bucket start read) of a group over ``(now - window, now]``;
        None when the group has no call in that window."""
        g = self._groups[dim].get(gid)
        if g is None:
            return None
        lo = now_ms - window_ms
        newest = -1
        for (b, _a, _m) in g.buckets:
            if lo < b <= now_ms and b > newest:
                newest = b
        if newest < 0:
            return None
        if metric == "prompt.repeats":
            best = 0
            for per in g.prompts.values():
                n = sum(c for (b, _a, _m), c in per.items() if lo < b <= now_ms)
                best = max(best, n)
            return float(best), newest
        i = _INDEX[metric]
        return float(sum(v[i] for (b, _a, _m), v in g.buckets.items() if lo < b <= now_ms)), newest

    # -- upkeep ----------------------------------------------------------------------------
    def prune(self, now_ms: int) -> None:
        """Drop the buckets at or before ``now - keep_ms`` and the groups left empty."""
        lo = now_ms - self.keep_ms
        for groups in self._groups.values():
            for gid in [gid for gid, g in groups.items() if g.newest_ms <= lo]:
                del groups[gid]
            for g in groups.values():
                if g.oldest_ms > lo:
                    continue
                old = [k for k in g.buckets if k[0] <= lo]
                for k in old:
                    del g.buckets[k]
                if old:
                    for pk in list(g.prompts):
                        per = g.prompts[pk]
                        for k in [k for k in per if k[0] <= lo]:
                            del per[k]
                        if not per:
                            del g.prompts[pk]
                    g.recount()

    def retain(self, owned: Callable[[str, str], bool]) -> None:
        """Keep the calls of the (app, model) keys ``owned`` (a rebalance); drop groups left empty."""
        for groups in self._groups.values():
            for gid in list(groups):
                g = groups[gid]
                g.buckets = {k: v for k, v in g.buckets.items() if owned(k[1], k[2])}
                for pk in list(g.prompts):
                    per = {k: c for k, c in g.prompts[pk].items() if owned(k[1], k[2])}
                    if per:
                        g.prompts[pk] = per
                    else:
                        del g.prompts[pk]
                if not g.buckets:
                    del groups[gid]
                else:
                    g.recount()

    def apps(self) -> set[str]:
        """The apps of every call held."""
        return {k[1] for groups in self._groups.values() for g in groups.values() for k in g.buckets}

    # -- checkpoint ------------------------------------------------------------------------
    def get_state(self) -> list[Any]:
        """The groups as plain JSON-ready data (see :meth:`set_state`)."""
        return [[dim, gid, g.app, g.newest_ms,
                 [[b, a, m, v] for (b, a, m), v in g.buckets.items()],
                 [[pk, [[b, a, m, c] for (b, a, m), c in per.items()]] for pk, per in g.prompts.items()]]
                for dim, groups in self._groups.items() for gid, g in groups.items()]

    def set_state(self, state: list[Any]) -> None:
        """Restore :meth:`get_state` output (dimensions no rule uses any more are dropped)."""
        self._groups = {d: {} for d in self.dims}
        for dim, gid, app, newest, buckets, prompts in state:
            if dim not in self._groups:
                continue
            g = _Group(str(app), int(newest))
            g.buckets = {(int(b), str(a), str(m)): [float(x) for x in v] for b, a, m, v in buckets}
            g.prompts = {str(pk): {(int(b), str(a), str(m)): int(c) for b, a, m, c in per}
                         for pk, per in prompts}
            g.recount()
            self._groups[dim][str(gid)] = g
