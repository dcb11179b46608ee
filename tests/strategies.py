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


# ---------------------------------------------------------------------------------- wide
#
# The wide scenario (issue 9, C): every entry form, async sources (one raising midway), a
# stop or outside cancel at any virtual time (the instants attempts end included), drain,
# per-attempt timeout, rate, adaptive, per_key, limiter, and user callbacks that raise.

Source = Literal["sync", "async", "async_raises"]
Form = Literal[
    "run", "map", "map_with", "ordered", "ordered_with", "open_pool", "open_pool_results"
]
# cancel: a task cancels the caller's scope at stop_at; deadline: the scope's deadline is
# stop_at; stop: a task calls pool.stop(stop_drain) at stop_at; *_from_fn: the same, done by
# fn itself as the first attempt of item stop_item ends (the very instant, whatever the
# order trio runs that moment's tasks in); cancelled_scope: the pool opens in a cancelled scope.
StopHow = Literal[
    "none", "cancel", "deadline", "stop", "cancel_from_fn", "stop_from_fn", "cancelled_scope"
]
STOPS: tuple[StopHow, ...] = (
    "none", "cancel", "deadline", "stop", "cancel_from_fn", "stop_from_fn", "cancelled_scope"
)
Callback = Literal["class", "predicate", "raises"]

FORMS: tuple[Form, ...] = (
    "run", "map", "map_with", "ordered", "ordered_with", "open_pool", "open_pool_results"
)
MAP_FORMS: tuple[Form, ...] = ("map", "map_with", "ordered", "ordered_with")
# Attempts last 0, 0.5, 1, 2 or 3 s, so they end on the half seconds: a stop drawn from these
# lands on the very instant some attempt ends (and others are queued behind it).
INSTANTS = tuple(x / 2 for x in range(0, 21))


@dataclass(frozen=True)
class Wide:
    workers: int
    buffer: int
    attempts: int
    backoff: float | None
    plans: list[list[Step]]  # per item, per attempt (the last step repeats)
    source: Source = "sync"
    raise_at: int = 0  # async_raises: the source raises instead of yielding this index
    source_delay: float | None = None  # async sources: sleep this long before each item
    form: Form = "run"
    exit_at: int | None = None  # map forms: leave the loop after this many records
    exit_how: Literal["break", "raise"] = "break"
    stop_how: StopHow = "none"
    stop_at: float = 0.0  # virtual time of the stop or cancel
    stop_item: int = 0  # *_from_fn: the item whose first attempt stops the pool as it ends
    stop_drain: float | None = None  # stop_how == "stop": pool.stop(drain=...)
    drain: float = 0.0
    timeout: float | None = None  # never a possible duration: no tie with an attempt's end
    rate: tuple[float, int] | None = None  # Rate(per_second, burst)
    adaptive: Callback | None = None  # overload_on: RuntimeError, a predicate, a raising one
    limiter: int | None = None
    keys: int | None = None  # per_key=PerKey(key, limit=1), key(i) = i % keys
    key_raises: frozenset[int] = frozenset()  # the key function raises for these items
    retry_on: Callback = "class"  # retry_on: classes, a predicate, one raising for some
    raising: frozenset[int] = frozenset()  # the raising predicates raise for these items
    # observers=: none; a ledger of events and a LastReport; the same behind an observer
    # that raises in every event (issue 11: the observer seam)
    observe: Literal["none", "ledger", "raising"] = "none"

    def step(self, item: int, attempt: int) -> Step:
        plan = self.plans[item]
        return plan[min(attempt, len(plan)) - 1]

    def outcome(self, item: int, attempt: int) -> Outcome:
        """How this attempt ends: a timeout counts as a retryable error."""
        step = self.step(item, attempt)
        if self.timeout is not None and step.duration > self.timeout:
            return "retry"
        return step.outcome

    def expected(self, item: int) -> tuple[str, int]:
        """How the item ends if nothing stops the pool, and after how many attempts.

        ("any", n) when a raising retry_on predicate decides it (undecided behaviour).
        """
        if self.keys is not None and item in self.key_raises:
            return "fatal", 0
        for attempt in range(1, self.attempts + 1):
            outcome = self.outcome(item, attempt)
            if outcome != "retry":
                return outcome, attempt
            step = self.step(item, attempt)
            timed_out = self.timeout is not None and step.duration > self.timeout
            if (
                self.retry_on == "raises" and item in self.raising and not timed_out
                and attempt < self.attempts
            ):  # the predicate raises on this attempt's own error (not on a timeout)
                return "any", attempt
        return "retry", self.attempts


@st.composite
def wides(
    draw: st.DrawFn,
    *,
    sources: tuple[Source, ...] = ("sync", "async", "async_raises"),
    forms: tuple[Form, ...] = FORMS,
    stops: tuple[StopHow, ...] = STOPS,
    exits: bool = True,
    limits: bool = True,
    callbacks: bool = True,
) -> Wide:
    n = draw(st.integers(0, 20))
    form = draw(st.sampled_from(forms))
    source = draw(st.sampled_from(sources))
    stop_how = draw(st.sampled_from(stops))
    if form not in ("open_pool", "open_pool_results"):  # pool.stop() needs the pool
        stop_how = {"stop": "cancel", "stop_from_fn": "cancel_from_fn"}.get(stop_how, stop_how)
    keys = draw(st.none() | st.integers(1, 4)) if limits else None
    adaptive = draw(st.none() | st.sampled_from(["class", "predicate", "raises"]))
    retry_on: Callback = draw(st.sampled_from(["class", "predicate", "raises"]))
    if not callbacks:
        adaptive = None if adaptive is None or not limits else "class"
        retry_on = "class"
    some_items = st.frozensets(st.integers(0, max(0, n - 1)), max_size=3)
    return Wide(
        workers=draw(st.integers(1, 5)),
        buffer=draw(st.integers(0, 5)),
        attempts=draw(st.integers(1, 4)),
        backoff=draw(st.none() | st.sampled_from([0.0, 0.5, 2.0])),
        plans=draw(st.lists(st.lists(steps, min_size=1, max_size=4), min_size=n, max_size=n)),
        source=source,
        raise_at=draw(st.integers(0, n)),
        source_delay=draw(st.none() | st.sampled_from([0.0, 0.5, 1.0])),
        form=form,
        exit_at=draw(st.none() | st.integers(0, n)) if exits and form in MAP_FORMS else None,
        exit_how=draw(st.sampled_from(["break", "raise"])),
        stop_how=stop_how,
        stop_at=draw(st.sampled_from(INSTANTS) | st.floats(0, 12)),
        stop_item=draw(st.integers(0, n)),
        stop_drain=draw(st.none() | st.sampled_from([0.0, 1.5])),
        drain=draw(st.sampled_from([0.0, 0.0, 0.5, 2.0])),
        timeout=draw(st.none() | st.sampled_from([0.75, 1.5, 2.5])) if limits else None,
        rate=draw(st.none() | st.tuples(st.sampled_from([1.0, 4.0]), st.integers(1, 3)))
        if limits
        else None,
        adaptive=adaptive if limits else None,
        limiter=draw(st.none() | st.integers(1, 3)) if limits else None,
        keys=keys,
        key_raises=draw(some_items) if callbacks and keys is not None else frozenset(),
        retry_on=retry_on,
        raising=draw(some_items) if callbacks else frozenset(),
        observe=draw(st.sampled_from(["none", "ledger", "raising"])),
    )
