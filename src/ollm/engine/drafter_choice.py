"""Content-aware drafting: per request and per span, the drafter that is being right.

Prompt lookup is free and right on copied spans (quotes, extraction, code edits); a draft model
costs a pass of its own per token and is right more often on prose. `ChoiceDrafter` keeps, per
request and drafter, an exponential average of the acceptance rate (recent steps weigh most, so
the choice follows the span being written) and drafters are tried cheapest first: a cheap
drafter's proposal is used when it has one and its rate is at least every costlier drafter's
(else it is still tried every ``probe``-th time it has one, so a new copied span is noticed); the
last drafter is the fallback. ``chosen`` names each request's current drafter, so the
`Speculator` counts proposals, drafted and accepted tokens per drafter (the choice, visible).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from ollm.engine.drafting import Draft, Drafter, DraftRequest


class ChoiceDrafter:
    """Chooses among ``drafters`` (cheapest first) per request and span (module docstring)."""

    def __init__(
        self, drafters: Sequence[Drafter], prior: float = 0.5, decay: float = 0.7, probe: int = 4
    ) -> None:
        if len(drafters) < 2:
            raise ValueError("a choice needs at least two drafters")
        self.drafters = list(drafters)
        self.name = "auto(" + ",".join(d.name for d in self.drafters) + ")"
        self.prior, self.decay, self.probe = prior, decay, probe
        self.rate: dict[tuple[str, str], float] = {}
        self.skipped: dict[tuple[str, str], int] = {}
        self.chosen: dict[str, str] = {}  # request -> drafter of its current draft
        # The last propose call's (chain tokens drafted, seconds) per drafter, taken or not:
        # the `Speculator` prices each drafter's tokens by its own cost.
        self.spent: dict[str, tuple[int, float]] = {}

    def _rate(self, rid: str, name: str) -> float:
        return self.rate.get((rid, name), self.prior)

    def _takes(self, rid: str, i: int) -> bool:
        """Whether drafter ``i``'s proposal wins over the costlier ones for ``rid``."""
        name = self.drafters[i].name
        if all(self._rate(rid, name) >= self._rate(rid, d.name) for d in self.drafters[i + 1 :]):
            return True
        key = (rid, name)
        self.skipped[key] = self.skipped.get(key, 0) + 1
        return self.skipped[key] % self.probe == 0

    def propose(self, requests: Mapping[str, DraftRequest]) -> dict[str, Draft]:
        out: dict[str, Draft] = {}
        left = dict(requests)
        self.spent = {}
        for i, drafter in enumerate(self.drafters):
            if not left:
                break
            last = i == len(self.drafters) - 1
            t0 = time.perf_counter()
            drafts = drafter.propose(left)
            chain = sum(len(left[r].widths) or len(d.tokens) for r, d in drafts.items())
            self.spent[drafter.name] = (chain, time.perf_counter() - t0)
            for rid, d in drafts.items():
                if d.tokens and (last or self._takes(rid, i)):
                    out[rid] = d
                    self.chosen[rid] = drafter.name
                    del left[rid]
        return out

    def feedback(self, rid: str, drafted: int, accepted: int) -> None:
        """The target verified ``rid``'s draft: ``accepted`` of ``drafted`` tokens (a tree's
        depth, not its nodes: the rate is how far along a draft the target agrees)."""
        name = self.chosen.get(rid)
        if name is None or not drafted:
            return
        a = self._rate(rid, name)
        w = self.decay**drafted  # each verified token is one observation
        self.rate[(rid, name)] = w * a + (1 - w) * accepted / drafted

    def forget(self, rid: str) -> None:
        """Drop a finished request's state."""
        self.chosen.pop(rid, None)
        for d in self.drafters:
            self.rate.pop((rid, d.name), None)
            self.skipped.pop((rid, d.name), None)

    def close(self) -> None:
        """Release what the drafters hold."""
        for d in self.drafters:
            close = getattr(d, "close", None)
            if close is not None:
                close()
