"""Limits held around every attempt, behind one small protocol so that they stack.

The protocol
------------
The pool holds a tuple of :class:`Limit` objects and, in the worker task, around *every*
attempt (retries included)::

    tokens = []
    try:
        for limit in limits:                       # in order
            tokens.append(await limit.acquire(item))
        ... run the attempt, error = the exception or None ...
    finally:
        for limit, token in reversed(list(zip(limits, tokens))):
            limit.release(token, error)             # in reverse order

``acquire`` is cancellation-safe: if it is cancelled, nothing is held.

Checkpoints: when there is nothing to wait for, ``acquire`` returns without a checkpoint
(a scheduling round costs about as much as a no-op attempt); the pool's worker loop takes
its own checkpoints, so a cancel is seen there. When it has to wait, it waits in trio's
usual cancellable way. The token is whatever
the limit needs to undo its acquire; that is how :class:`Adaptive` learns an attempt's latency
without a wider ``release`` signature (its token carries the start time). A retry waiting for
its backoff holds no token: tokens are held by attempts, not by items.

Refinement for per-key limits
-----------------------------
A :class:`PerKey` limit must not pin a worker while its key is busy: if workers simply waited
for a slow host, all of them could end up waiting on it while other hosts' items sit in the
channel. So the pool calls :class:`PerKey` first, before the plain limits, in its parking
form, with its own job object and a ``resend`` callback::

    claim, job.claim = job.claim, None
    token = await per_key.admit(item, job, resend, claim)
    if token is None:
        continue        # parked: the limit owns the job until it calls resend(job, claim, due)

When the key has room, ``admit`` returns a token at once. When it does not, the job is parked
in the key's line (FIFO) and the worker takes another item. When the key frees a slot, the
limit calls ``resend(job, claim, due)`` (``due`` later than now when the key's rate says so):
the pool sends the job back into its work channel at trio time ``due`` (as its retry
scheduler does), and a worker that picks it up passes the claim back to ``admit``.

A claim does not hold a slot while the job travels: a worker already in hand takes a free
slot first. Holding it would deadlock when every worker waits on that key while the job that
holds its slot sits in the channel with no worker free to take it. Parking is bounded
(``max_parked`` jobs in all); past that, ``admit`` waits like a plain limit, so memory stays
bounded by the pool's buffer, its workers and ``max_parked``. A stopping pool gives back its
parked jobs with :meth:`PerKey.withdraw` and its travelling claims with :meth:`PerKey.discard`.

Algorithms: :class:`Rate` is GCRA (the "virtual scheduling" form of the generic cell rate
algorithm, https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm), on trio's clock, so it
is exact under a ``MockClock``. :class:`Adaptive` is AIMD (additive increase, multiplicative
decrease, as TCP congestion avoidance), at most one decrease per "window" of attempts.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar, final, runtime_checkable

import trio

from ._options import (
    check_callable,
    check_count,
    check_number,
    check_seconds,
    check_type,
    describe_callable,
    invalid,
)
from ._retry import exception_classes, plain_predicate

logger = logging.getLogger("conveyor")

__all__ = [
    "Adaptive",
    "CapacityLimit",
    "Claim",
    "Limit",
    "PerKey",
    "Rate",
    "capacity_limit",
]

J = TypeVar("J")


@runtime_checkable
class Limit(Protocol):
    """What the pool calls around every attempt (see the module docstring)."""

    async def acquire(self, item: Any) -> object:
        """Wait until an attempt on ``item`` may start; return a token for :meth:`release`."""
        ...

    def release(self, token: object, error: BaseException | None) -> None:
        """The attempt that got ``token`` ended; ``error`` is None on success."""
        ...


# The largest count kept exactly in a float (Rate's burst and Adaptive's limit are floats).
_MAX_COUNT = 2**53
_COUNT_EXPECTED = "an int >= 1 (at most 2**53)"


# ----------------------------------------------------------------------------------- rate


class _Gcra:
    """GCRA state: the theoretical arrival time (TAT) kept as ``anchor + count / rate``.

    Counting slots from an anchor instead of adding ``1 / rate`` again and again keeps the slot
    times exact (``k / 10`` is the float nearest to k tenths; a running sum drifts).
    """

    __slots__ = ("_anchor", "_count", "_per_second", "_tolerance", "_trio_token")

    def __init__(self, per_second: float, burst: int) -> None:
        self._per_second = per_second
        # A request conforms while now >= TAT - tolerance; burst b allows b at once.
        self._tolerance = (burst - 1) / per_second
        self._anchor = -math.inf
        self._count = 0
        self._trio_token: object = None

    def reserve(self, now: float) -> float:
        """Reserve the next slot; return its time (>= now)."""
        tat = self._anchor + self._count / self._per_second
        if tat <= now:
            # Idle long enough that the bucket is full again: restart counting from now.
            self._anchor, self._count, tat = now, 0, now
        self._count += 1
        return max(now, tat - self._tolerance)

    def ticket(self) -> tuple[float, int]:
        """Identifies the latest reservation (for :meth:`unreserve`)."""
        return self._anchor, self._count

    def unreserve(self, ticket: tuple[float, int]) -> None:
        """Give back the latest reservation if it is still the latest (a cancelled wait)."""
        if (self._anchor, self._count) == ticket:
            self._count -= 1

    def idle_at(self) -> float:
        """The time from which this state is the same as a fresh one."""
        return self._anchor + self._count / self._per_second

    def check_run(self) -> None:
        # A Rate may outlive one trio.run (a module-level constant, tests): each run has its
        # own clock, so state from another run means nothing here.
        token = trio.lowlevel.current_trio_token()
        if token is not self._trio_token:
            self._trio_token = token
            self._anchor, self._count = -math.inf, 0


@final
class Rate:
    """At most ``per_second`` attempts start per second, at most ``burst`` at once after idling.

    GCRA on trio's clock: exact (under ``autojump_clock``, 100 attempts at ``Rate(10)`` start
    at 0.0, 0.1, ..., 9.9 s), first come first served, and shareable: pass the same ``Rate``
    to several pools and their attempts together keep to it.

    Args:
        per_second: attempts per second, a finite number > 0 (``Rate(0.5)``: one every 2 s).
        burst: how many attempts may start at the same moment after an idle spell (>= 1).

    Cancellation: a cancelled :meth:`acquire` gives its slot back when no later caller has
    reserved a slot behind it, so a cancel never makes the rate slower than asked for long.
    """

    __slots__ = ("_gcra", "burst", "per_second")

    def __init__(self, per_second: float, burst: int = 1) -> None:
        self.per_second: float = check_number(
            "per_second", per_second, above=0, owner="Rate", example="per_second=10.0")
        self.burst: int = check_count(
            "burst", burst, minimum=1, maximum=_MAX_COUNT, owner="Rate",
            expected=_COUNT_EXPECTED)
        self._gcra = _Gcra(self.per_second, self.burst)

    def __repr__(self) -> str:
        return f"Rate({self.per_second:g}, burst={self.burst})"

    async def acquire(self, item: Any = None) -> None:
        """Wait for this attempt's slot. Slots are reserved in call order."""
        # Conforming now: no wait and no checkpoint (see "Checkpoints" in the module doc).
        gcra = self._gcra
        gcra.check_run()
        now = trio.current_time()
        slot = gcra.reserve(now)
        if slot <= now:
            return
        ticket = gcra.ticket()
        try:
            await trio.sleep_until(slot)
        except BaseException:
            gcra.unreserve(ticket)
            raise

    def release(self, token: object, error: BaseException | None) -> None:
        """Nothing to give back: a rate limits starts, not attempts in progress."""


# ------------------------------------------------------------------------------- capacity


@final
class CapacityLimit:
    """A :class:`trio.CapacityLimiter` as a :class:`Limit`: one token per attempt.

    Each attempt borrows on behalf of a fresh token object (a worker task may hold several
    limits at once, and a shared limiter counts attempts from every pool that uses it).
    """

    __slots__ = ("limiter",)

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter

    async def acquire(self, item: Any = None) -> object:
        token = object()
        limiter = self.limiter
        try:
            # A free token at once: no scheduling round (acquire_on_behalf_of always takes
            # one, which costs about as much as a no-op attempt). Still first come first
            # served: the nowait form refuses while others wait.
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            await limiter.acquire_on_behalf_of(token)
        return token

    def release(self, token: object, error: BaseException | None) -> None:
        self.limiter.release_on_behalf_of(token)


def capacity_limit(limiter: trio.CapacityLimiter | int) -> CapacityLimit:
    """The ``limiter=`` option: a shared :class:`trio.CapacityLimiter`, or an int (private).

    Raises:
        ValueError: an int < 1.
        TypeError: neither an int nor a CapacityLimiter.
    """
    if isinstance(limiter, trio.CapacityLimiter):
        return CapacityLimit(limiter)
    size = check_count("limiter", limiter, minimum=1,
                       expected="an int >= 1, a trio.CapacityLimiter or None")
    return CapacityLimit(trio.CapacityLimiter(size))


# -------------------------------------------------------------------------------- per key


class _Waiter:
    """A worker waiting for a key (only when parking is full)."""

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False


class _Parked(Generic[J]):
    __slots__ = ("job", "resend")

    def __init__(self, job: J, resend: Callable[[J, Claim, float], None]) -> None:
        self.job = job
        self.resend = resend


class _KeyState:
    __slots__ = ("calling", "gcra", "key", "line", "running", "waiters")

    def __init__(self, key: Hashable, gcra: _Gcra | None) -> None:
        self.key = key
        self.running = 0  # attempts holding a slot (in a worker's hands)
        self.calling = 0  # jobs resent with a claim, not yet back at admit()
        self.line: deque[_Parked[Any]] = deque()  # parked jobs, FIFO
        self.waiters: deque[_Waiter] = deque()  # workers waiting, FIFO
        self.gcra = gcra


@final
class Claim:
    """A parked job's ticket back in: its key had room (and its rate slot is paid) when it
    was resent. Opaque to the pool: carry it with the job and pass it to ``admit``."""

    __slots__ = ("state",)

    def __init__(self, state: _KeyState) -> None:
        self.state = state


@final
class PerKey(Generic[J]):
    """Concurrency and rate limits per key, the key computed from the item.

    ``PerKey(lambda url: urlsplit(url).hostname, limit=2, rate=Rate(5))``: at most 2
    attempts at once and 5 starts per second *per host*. Items of a busy key are parked, not
    waited for by a worker, so one slow host does not eat every worker while other hosts'
    items wait (see the module docstring for the pool side). Keys that go idle are forgotten:
    memory stays bounded however many distinct keys pass.

    Args:
        key: item -> a hashable key. An exception from it propagates from ``admit``.
        limit: attempts at once per key (>= 1), or None for no concurrency limit.
        rate: a :class:`Rate` used as a template: each key gets its own state with the same
            ``per_second`` and ``burst``. None for no rate limit.
        max_parked: how many jobs may be parked in all (>= 0); past that, ``admit`` waits
            like a plain limit (0: never park).

    Order: per key, parked jobs are resent first come first served; workers that had to wait
    (parking full) are served before parked jobs, since they hold a worker each. A parked job
    waiting for a rate slot is admitted at that slot's time and starts when a worker picks it
    up, never earlier.

    How far ahead a pool looks: parked items are accepted items, so they count against the
    pool's ``buffer + workers``. When one slow key's items fill that, the pool takes no more
    items until some settle; give it a larger ``buffer`` to look further past a slow key.

    Shareable: pass the same ``PerKey`` to several pools and the per-key limits hold across
    all of them (a stopping pool takes its parked items back).
    """

    def __init__(
        self,
        key: Callable[[Any], Hashable],
        *,
        limit: int | None = None,
        rate: Rate | None = None,
        max_parked: int = 1000,
    ) -> None:
        owner = "PerKey"
        check_callable("key", key, "a function item -> hashable key",
                       "key=lambda url: urlsplit(url).hostname", owner=owner)
        check_count("limit", limit, minimum=1, allow_none=True, owner=owner)
        check_type("rate", rate, Rate, "a conveyor.Rate or None", _rate_example(rate),
                   allow_none=True, owner=owner)
        if limit is None and rate is None:
            raise invalid("limit", limit, "an int >= 1 when rate is None (give a limit, a "
                          "rate, or both)", "limit=2", owner=owner)
        self.key = key
        self.limit: float = math.inf if limit is None else limit
        self.rate = rate
        self.max_parked: int = check_count(
            "max_parked", max_parked, minimum=0, owner=owner)
        self._states: dict[Hashable, _KeyState] = {}
        # (state, time it is fresh again) of idle keys whose rate state is still warm.
        self._idle: deque[tuple[_KeyState, float]] = deque()
        self._parked = 0  # jobs in lines + jobs resent with a claim, not yet back
        self._trio_token: object = None

    def __repr__(self) -> str:
        return f"<PerKey limit={self.limit} rate={self.rate} keys={self.keys} parked={self.parked}>"

    # --- introspection (stats, tests)
    @property
    def keys(self) -> int:
        """How many keys are remembered (busy, or idle with their rate state still warm)."""
        return len(self._states)

    @property
    def parked(self) -> int:
        """Jobs parked in lines, or resent with a claim and not yet back."""
        return self._parked

    def running(self, key: Hashable) -> int:
        """Attempts on ``key`` holding a slot now."""
        state = self._states.get(key)
        return 0 if state is None else state.running

    # --- the Limit form (pins the caller while the key is busy)
    async def acquire(self, item: Any) -> object:
        """Wait until ``item``'s key has room (and its rate slot has come)."""
        return await self._wait(self._state_for(item), paid=False)

    def release(self, token: object, error: BaseException | None = None) -> None:
        """The attempt holding ``token`` ended."""
        assert isinstance(token, _KeyState)
        token.running -= 1
        self._pump(token)

    # --- the parking form (the pool's worker loop)
    async def admit(
        self,
        item: Any,
        job: J,
        resend: Callable[[J, Claim, float], None],
        claim: Claim | None = None,
    ) -> object | None:
        """Admit an attempt on ``item`` now, or park ``job``.

        Returns a token for :meth:`release`, or None: the job is parked and comes back
        through ``resend(job, claim, due)``, which must not block: the pool sends the job
        back into its channel at trio time ``due`` and, when a worker picks it up, calls
        ``admit`` again with that ``claim`` (clear it from the job first: a claim is used
        once). A job dropped while it carries a claim must be given to :meth:`discard`.
        """
        if claim is not None:
            # No checkpoint on this path: nothing awaits between the claim and the token.
            state = claim.state
            state.calling -= 1
            self._parked -= 1
            if state.running < self.limit:
                state.running += 1
                return state
            # A waiting worker took the slot meanwhile: back to the front of the line.
            state.line.appendleft(_Parked(job, resend))
            self._parked += 1
            return None
        state = self._state_for(item)
        if not state.line and state.running + state.calling < self.limit:
            gcra = state.gcra
            now = trio.current_time()
            slot = now if gcra is None else gcra.reserve(now)
            if slot <= now:
                state.running += 1
                return state
            if self._parked < self.max_parked:
                state.calling += 1
                self._parked += 1
                resend(job, Claim(state), slot)
                return None
            return await self._hold(state, slot)
        if self._parked < self.max_parked:
            state.line.append(_Parked(job, resend))
            self._parked += 1
            return None
        return await self._wait(state, paid=False)

    def discard(self, claim: Claim) -> None:
        """The pool dropped a job that carried ``claim`` (it stopped before the job's turn)."""
        state = claim.state
        state.calling -= 1
        self._parked -= 1
        self._pump(state)

    def withdraw(self, resend: Callable[[J, Claim, float], None]) -> list[J]:
        """Take back the jobs parked with this ``resend`` (their pool is stopping)."""
        taken: list[J] = []
        now = trio.current_time()
        for state in list(self._states.values()):
            if not state.line:
                continue
            keep: deque[_Parked[Any]] = deque()
            for entry in state.line:
                if entry.resend == resend:  # == : a bound method is a new object each time
                    taken.append(entry.job)
                    self._parked -= 1
                else:
                    keep.append(entry)
            state.line = keep
            self._maybe_forget(state, now)
        return taken

    # --- internals
    def _state_for(self, item: Any) -> _KeyState:
        key = self.key(item)
        if self._trio_token is not trio.lowlevel.current_trio_token():
            # Another trio.run, another clock: nothing from the last run can still be held.
            self._trio_token = trio.lowlevel.current_trio_token()
            self._states.clear()
            self._idle.clear()
            self._parked = 0
        idle = self._idle
        if idle:
            now = trio.current_time()
            while idle and idle[0][1] <= now:
                self._maybe_forget(idle.popleft()[0], now)
        state = self._states.get(key)
        if state is None:
            if inspect.isawaitable(key):  # checked for new keys only: a coroutine always is
                close = getattr(key, "close", None)
                if close is not None:
                    close()  # no "coroutine was never awaited" warning
                raise TypeError(
                    f"the PerKey key function {describe_callable(self.key)!r} returned an "
                    f"awaitable ({type(key).__name__}), not a key: it must be a plain "
                    f"function that returns a hashable key at once"
                )
            rate = self.rate
            gcra = None
            if rate is not None:
                gcra = _Gcra(rate.per_second, rate.burst)
            state = self._states[key] = _KeyState(key, gcra)
        return state

    async def _wait(self, state: _KeyState, paid: bool) -> _KeyState:
        """Pin the caller until the key has a slot, then until its rate slot."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if state.running < self.limit and not state.waiters:
            # Jobs in the line or in transit do not hold slots: a worker in hand goes first,
            # else every worker could wait on a key whose next job no worker is free to take.
            state.running += 1
        else:
            waiter = _Waiter()
            state.waiters.append(waiter)
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.granted:
                    self.release(state)
                else:
                    state.waiters.remove(waiter)  # O(waiters); only when parking is full
                    self._maybe_forget(state, trio.current_time())
                raise
        gcra = state.gcra
        if gcra is None or paid:
            return state
        state.running -= 1  # _hold counts it again
        now = trio.current_time()
        return await self._hold(state, gcra.reserve(now))

    async def _hold(self, state: _KeyState, slot: float) -> _KeyState:
        """Hold a slot of ``state`` and sleep until the reserved rate ``slot``."""
        state.running += 1
        gcra = state.gcra
        assert gcra is not None
        ticket = gcra.ticket()
        try:
            await trio.sleep_until(slot)
        except BaseException:
            gcra.unreserve(ticket)
            self.release(state)
            raise
        return state

    def _pump(self, state: _KeyState) -> None:
        """Hand freed slots on: waiting workers first, then parked jobs (resent)."""
        waiters = state.waiters
        while waiters and state.running < self.limit:
            waiter = waiters.popleft()
            waiter.granted = True
            state.running += 1
            waiter.event.set()
        line = state.line
        now = trio.current_time()
        if line:
            gcra = state.gcra
            while line and state.running + state.calling < self.limit:
                entry = line.popleft()
                slot = now if gcra is None else gcra.reserve(now)
                state.calling += 1  # stays counted in _parked until back at admit()
                entry.resend(entry.job, Claim(state), slot)
        self._maybe_forget(state, now)

    def _maybe_forget(self, state: _KeyState, now: float) -> None:
        if state.running or state.calling or state.line or state.waiters:
            return
        if self._states.get(state.key) is not state:
            return
        gcra = state.gcra
        if gcra is not None:
            fresh_at = gcra.idle_at()
            if fresh_at > now:
                self._idle.append((state, fresh_at))
                return
        del self._states[state.key]


# ------------------------------------------------------------------------------- adaptive


@final
class _AdaptiveToken:
    __slots__ = ("epoch", "event", "granted", "start")

    def __init__(self) -> None:
        self.epoch = 0
        self.start = 0.0
        self.granted = False
        self.event: trio.Event | None = None  # set while waiting for a slot


OverloadOn = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool] | None
)


@final
class Adaptive:
    """A concurrency limit that finds what a service can take (AIMD), opt-in.

    Every attempt that ends without an overload signal adds ``increase / limit`` (so the limit
    grows by ``increase`` per window of ``limit`` good attempts); an overload signal multiplies
    it by ``decrease``, once per overload episode: an attempt that was granted its slot
    before the last decrease does not decrease it again, however its overload arrives
    (attempts belong to the window they were granted in). The limit stays within ``min`` ..
    ``max``. Other errors leave it alone.

    Args:
        overload_on: what signals overload: an exception class, a tuple of them, or a
            predicate on the exception (e.g. an HTTP 429 / 503 status), a plain function
            (an ``async def`` is refused). Only exceptions (:class:`Exception`) reach it (never
            ``trio.Cancelled`` or another ``BaseException``); if it raises, that attempt
            counts as no signal, its item keeps its own error (with a note saying what the
            predicate raised) and a WARNING goes to the ``"conveyor"`` logger.
        latency_target: optional; an attempt slower than this many seconds counts as an
            overload signal too. Measured from the moment this limit grants the slot (with a
            ``rate`` as well, that includes the wait for the rate's slot).
        min: the lowest limit (>= 1).
        max: the highest limit (>= min).
        initial: where to start (default ``min``).
        increase: additive step per window (a finite number > 0).
        decrease: multiplicative factor on overload (0 < decrease < 1).

    Its current value is :attr:`limit` (also in the pool's stats). Shareable between pools;
    slots are granted first come first served.
    """

    def __init__(
        self,
        *,
        overload_on: OverloadOn = None,
        latency_target: float | None = None,
        min: int = 1,
        max: int = 100,
        initial: int | None = None,
        increase: float = 1.0,
        decrease: float = 0.5,
    ) -> None:
        owner = "Adaptive"
        lo = check_count("min", min, minimum=1, maximum=_MAX_COUNT, owner=owner,
                         expected=_COUNT_EXPECTED, example="min=1")
        hi = check_count("max", max, minimum=1, maximum=_MAX_COUNT, owner=owner,
                         expected=_COUNT_EXPECTED)
        if lo > hi:
            raise invalid("min", lo, f"an int <= max ({hi})", f"min={hi}", owner=owner)
        start = lo if initial is None else check_count(
            "initial", initial, minimum=lo, maximum=hi, owner=owner,
            expected=f"an int within min..max ({lo}..{hi}), or None (min)")
        self.increase: float = check_number(
            "increase", increase, above=0, owner=owner, example="increase=1.0")
        self.decrease: float = check_number(
            "decrease", decrease, above=0, below=1, owner=owner, example="decrease=0.5")
        self.latency_target: float | None = check_seconds(
            "latency_target", latency_target, above=0, allow_none=True, owner=owner,
            example="latency_target=1.0")
        self.overload_on = overload_on
        self._is_overload = _overload_predicate(overload_on)
        if overload_on is None and latency_target is None:
            raise invalid("overload_on", overload_on, "an exception class, a tuple of them or "
                          "a predicate f(exc) -> bool when latency_target is None (give "
                          "overload_on, latency_target, or both)", "overload_on=TimeoutError",
                          owner=owner)
        self.min, self.max = lo, hi
        self._value = float(start)
        self._limit = start  # int(self._value)
        self._running = 0
        self._waiters: deque[_AdaptiveToken] = deque()
        self._epoch = 0
        self.decreases = 0  # how many times it backed off (stats, tests)

    def __repr__(self) -> str:
        return f"<Adaptive limit={self.limit} ({self.min}..{self.max}) running={self.running}>"

    @property
    def limit(self) -> int:
        """The current concurrency limit."""
        return self._limit

    @property
    def running(self) -> int:
        """Attempts holding a slot now."""
        return self._running

    async def acquire(self, item: Any = None) -> _AdaptiveToken:
        """Wait until the current limit has room for one more attempt; return its token."""
        token = _AdaptiveToken()
        if self._running < self._limit and not self._waiters:
            # A free slot at once: no scheduling round (as CapacityLimit.acquire).
            self._running += 1
            token.epoch = self._epoch
        else:
            token.event = trio.Event()
            self._waiters.append(token)
            try:
                await token.event.wait()
            except BaseException:
                if token.granted:
                    self._running -= 1
                    self._grant()
                else:
                    self._waiters.remove(token)  # O(waiters), on a cancel only
                raise
            token.event = None
        if self.latency_target is not None:
            token.start = trio.current_time()  # latency of the attempt, not of the wait
        return token

    def release(self, token: object, error: BaseException | None) -> None:
        """The attempt holding ``token`` ended (``error`` None: it succeeded): an overload
        lowers the limit (once per episode), a success raises it, a cancel leaves it."""
        assert isinstance(token, _AdaptiveToken)
        # The signal first, the slot after: a slot freed by an overloaded attempt must not
        # go to a waiter under the limit that was just found too high.
        overloaded = False
        if isinstance(error, Exception):  # never Cancelled, KeyboardInterrupt...
            try:
                overloaded = self._is_overload(error)
            except Exception as predicate_error:
                self._predicate_failed(error, predicate_error)
        elif error is not None:  # cut short (a cancel): it says nothing about the service
            self._running -= 1
            self._grant()
            return
        if not overloaded and self.latency_target is not None:
            overloaded = trio.current_time() - token.start > self.latency_target
        if overloaded:
            if token.epoch == self._epoch:  # one decrease per episode
                self._epoch += 1
                self.decreases += 1
                self._set(self._value * self.decrease)
        elif error is None:
            self._set(self._value + self.increase / self._value)
        self._running -= 1
        self._grant()

    def _predicate_failed(self, error: Exception, predicate_error: Exception) -> None:
        message = (
            f"conveyor: the Adaptive overload_on predicate "
            f"{describe_callable(self.overload_on)!r} raised on this error "
            f"({type(predicate_error).__name__}: {predicate_error}); counted as no "
            f"overload signal"
        )
        error.add_note(message)
        logger.warning("%s; the error was %s: %s", message, type(error).__name__, error)

    def _set(self, value: float) -> None:
        self._value = float(self.min if value < self.min else min(value, self.max))
        self._limit = int(self._value)

    def _grant(self) -> None:
        """Hand free slots to waiters, first come first served, in the current window."""
        waiters = self._waiters
        while waiters and self._running < self._limit:
            token = waiters.popleft()
            token.granted = True
            token.epoch = self._epoch  # the window it is granted in, not the one it ran in
            self._running += 1
            assert token.event is not None
            token.event.set()


def _overload_predicate(overload_on: OverloadOn) -> Callable[[Exception], bool]:
    if overload_on is None:
        return lambda error: False
    classes = exception_classes("overload_on", overload_on, "Adaptive",
                                "overload_on=TimeoutError")
    if classes is None:
        return plain_predicate(overload_on, "Adaptive overload_on")  # type: ignore[arg-type]
    return lambda error: isinstance(error, classes)


def _rate_example(rate: object) -> str:
    """``rate=10`` suggests ``rate=conveyor.Rate(10)``."""
    if type(rate) in (int, float) and 0 < rate < 1e9:  # type: ignore[operator]
        return f"rate=conveyor.Rate({rate!r})"
    return "rate=conveyor.Rate(10)"


def build_limits(
    *,
    limiter: object = None,
    rate: object = None,
    per_key: object = None,
    adaptive: object = None,
) -> tuple[tuple[Limit, ...], PerKey[Any] | None, Adaptive | None]:
    """Check the pool's limit options and stack them: ``(limits, per_key, adaptive)``.

    Order of ``limits``: the concurrency limits first (``limiter``, then ``adaptive``), the
    rate last, so an attempt's rate slot is taken right before it starts (a slot taken
    before a wait for concurrency could let starts bunch up). ``per_key`` is apart: the
    pool calls it before all of them, in its parking form.
    """
    limits: list[Limit] = []
    if limiter is not None:
        limits.append(capacity_limit(limiter))  # type: ignore[arg-type]
    if adaptive is not None:
        adaptive = check_type("adaptive", adaptive, Adaptive, "a conveyor.Adaptive or None",
                              "adaptive=conveyor.Adaptive(overload_on=TimeoutError)")
        limits.append(adaptive)  # type: ignore[arg-type]
    if rate is not None:
        limits.append(check_type("rate", rate, Rate, "a conveyor.Rate or None",
                                 _rate_example(rate)))
    per_key = check_type("per_key", per_key, PerKey, "a conveyor.PerKey or None",
               "per_key=conveyor.PerKey(lambda url: urlsplit(url).hostname, limit=2)",
               allow_none=True)
    return tuple(limits), per_key, adaptive  # type: ignore[return-value]
