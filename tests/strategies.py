"""Hypothesis strategies shared by the property tests (grow them with each feature)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hypothesis import strategies as st

Outcome = Literal["ok", "retry", "fatal"]


@dataclass(frozen=True)
class Step:
    """What one attempt of an item does: how long it takes and how it ends."""

    outcome: Outcome
    duration: float


@dataclass(frozen=True)
class Scenario:
    workers: int
    buffer: int
    attempts: int
    backoff: float | None
    plans: list[list[Step]]  # per item, per attempt (the last step repeats)
    cancel_at: float | None
    mode: Literal["run", "map", "ordered", "open_pool"]
    limiter: int | None = None  # limiter=: at most this many attempts at once
    keys: int | None = None  # per_key=PerKey(item % keys, limit=1): one attempt per key

    def key(self, item: int) -> int:
        assert self.keys is not None
        return item % self.keys

    def step(self, item: int, attempt: int) -> Step:
        plan = self.plans[item]
        return plan[min(attempt, len(plan)) - 1]

    def expected_attempts(self, item: int) -> tuple[Outcome, int]:
        """How the item ends if nothing stops the pool, and after how many attempts."""
        for attempt in range(1, self.attempts + 1):
            outcome = self.step(item, attempt).outcome
            if outcome != "retry":
                return outcome, attempt
        return "retry", self.attempts


steps = st.builds(
    Step,
    outcome=st.sampled_from(["ok", "ok", "retry", "fatal"]),
    duration=st.sampled_from([0, 0.5, 1, 2, 3]),
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(0, 30))
    mode = draw(st.sampled_from(["run", "map", "ordered", "open_pool"]))
    return Scenario(
        workers=draw(st.integers(1, 6)),
        buffer=draw(st.integers(0, 6)),
        attempts=draw(st.integers(1, 4)),
        backoff=draw(st.none() | st.sampled_from([0.0, 0.5, 2.0])),
        plans=draw(st.lists(st.lists(steps, min_size=1, max_size=4), min_size=n, max_size=n)),
        cancel_at=None if mode == "run" else draw(st.none() | st.floats(0, 20)),
        mode=mode,
        limiter=draw(st.none() | st.integers(1, 3)),
        keys=draw(st.none() | st.integers(1, 4)),
    )
