"""The observer seam: how a pool reports what happens to whoever wants to know.

A pool is given observers (``observers=[...]`` on ``run``, ``map`` and ``open_pool``). When it
starts, it calls each one's :meth:`Observer.opened` with a :class:`PoolInfo`; what that returns
receives the pool's events (by default the observer itself; return a per-pool object to keep
per-pool state, e.g. metrics already labelled with the pool's name).

Every event is a method of :class:`Observer`, a no-op there. A pool looks, once at start, at
which methods each observer overrides, and only calls those. Per-item events that nobody
overrides cost nothing: with no observer that overrides ``attempt_started``,
``attempt_ended`` or ``succeeded``, the worker's hot path is the same as with no observer at
all (callgrind, ``python -m benchmarks --instructions``).

The logging (``conveyor`` logger) and the progress line are observers too
(:class:`LogObserver`, :class:`conveyor.Progress`).

Order of events for one attempt: ``attempt_started``; then, if it failed and the item will be
retried, ``retry_scheduled``; then ``attempt_ended``; then, if the item settled with this
attempt, ``succeeded`` or ``failed``. ``unfinished`` comes when the pool ends, then ``closed``.

Events are called synchronously from the pool's tasks, in the order they happen. An observer
must not block (no I/O that waits); an exception raised by an observer is logged once per
observer and method and otherwise ignored: a broken dashboard never loses an item.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._records import Failed, Report, Succeeded, Unfinished
    from ._stats import Stats

__all__ = ["Attempt", "Observer", "PoolInfo"]


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """What an observer is told about a pool when it starts.

    ``name``: the pool's name (``name=`` option; ``"pool"`` by default; the stage's name in a
    pipeline). ``workers``: the most attempts at once. ``retry_attempts``: attempts allowed
    per item (1 without a retry policy). ``total``: the number of items when it is known up
    front (``len(items)``), else None. ``stats``: a function returning a fresh
    :class:`~conveyor.Stats` snapshot (for observers that read gauges when scraped).

    ``stages``: None for a pool. For a whole pipeline (what ``progress=`` of
    :meth:`conveyor.Pipeline.run`, ``map`` and ``open`` is told: ``name`` ``"pipeline"``,
    ``stats`` and ``total`` counting its inputs, ``workers`` the sum of its stages',
    ``retry_attempts`` the most of any stage), a function returning each stage's own
    :class:`~conveyor.Stats` now, by stage name, in stage order.
    """

    name: str
    workers: int
    retry_attempts: int
    total: int | None
    stats: Callable[[], Stats]
    stages: Callable[[], Mapping[str, Stats]] | None = None


@dataclass(slots=True, eq=False)
class Attempt:
    """One attempt at one item, as seen by :meth:`Observer.attempt_started` and the events
    that follow it.

    ``index``: the item's position in the input (0-based, in submission order). ``number``:
    1 for the first attempt. ``queued``: seconds the item waited in the pool's queue before
    this attempt started (for a retry: since its backoff ended). ``started``: the trio clock
    (``trio.current_time()``) when the attempt started. ``queued`` and ``started`` are NaN in
    a :meth:`Observer.retry_scheduled` call to a pool where no observer wants attempt events
    (the pool did not measure them).

    Read-only by convention (one is made per attempt, only when an observer wants attempt
    events: a plain slotted class, cheaper to make than a frozen dataclass).
    """

    index: int
    item: Any
    number: int
    queued: float
    started: float


class Observer:
    """Base class of observers: every event is a no-op here; override the ones you need.

    Only the overridden methods are called (the pool checks once, at start), so an observer
    that only overrides :meth:`failed` and :meth:`closed` costs nothing per successful item.
    """

    #: Seconds between calls of :meth:`snapshot` while the pool runs; None: never.
    snapshot_every: float | None = None

    def opened(self, info: PoolInfo) -> Observer | None:
        """The pool starts. Return the observer for this pool's events: ``self`` (the
        default), another object (per-pool state), or None to receive nothing more.

        Called in the task that opened the pool, so context variables (the current
        OpenTelemetry span, say) are those of the code that opened it."""
        return self

    def attempt_started(self, attempt: Attempt) -> None:
        """An attempt is starting (its limits are held; ``fn`` is called next)."""

    def attempt_ended(
        self, attempt: Attempt, error: BaseException | None, duration: float
    ) -> None:
        """The attempt ended after ``duration`` seconds: ``error`` is None when it returned,
        the exception it raised otherwise (a :class:`trio.Cancelled` or other
        ``BaseException`` when the pool's stop cut it short)."""

    def retry_scheduled(self, attempt: Attempt, error: Exception, delay: float) -> None:
        """``attempt`` failed with ``error``; the item is retried in ``delay`` seconds.
        Called before that attempt's :meth:`attempt_ended` (a tracer can put it on the
        attempt's span)."""

    def succeeded(self, record: Succeeded[Any]) -> None:
        """An item settled as Succeeded."""

    def failed(self, record: Failed) -> None:
        """An item settled as Failed (gave up, or refused before an attempt)."""

    def unfinished(self, record: Unfinished) -> None:
        """An item settled as Unfinished (the pool stopped first)."""

    def snapshot(self, stats: Stats) -> None:
        """Every :attr:`snapshot_every` seconds while the pool runs."""

    def closed(self, report: Report) -> None:
        """The pool has ended and every item has settled: ``report`` is its final account
        (``report.stats`` the final counters). Called also when a cancel, an error or
        Ctrl-C ended it, before that propagates."""


def overrides(observer: object, method: str) -> bool:
    """Whether ``observer``'s class overrides ``Observer.<method>``."""
    return getattr(type(observer), method, None) is not getattr(Observer, method)


_logger = logging.getLogger("conveyor")
# (id of the observer, event) -> a reference to that observer. The id alone is not enough: once
# an observer is gone, a new one may get its id, and its first error must still be logged.
_failed_observers: dict[tuple[int, str], Callable[[], object]] = {}


def notify(event: Callable[..., None], *args: Any) -> None:
    """Call an observer's event; an error is logged (once per observer and event), never
    raised: a broken dashboard loses no item."""
    try:
        event(*args)
    except Exception as error:
        observer_failed(getattr(event, "__self__", event), event.__name__, error)


def observer_failed(observer: object, event: str, error: Exception) -> None:
    """Log that ``observer`` raised ``error`` in ``event`` (once per observer and event)."""
    key = (id(observer), event)
    held = _failed_observers.get(key)
    if held is not None and held() is observer:
        return
    try:
        held = weakref.ref(observer, lambda gone: _forget(key, gone))
    except TypeError:  # not weakly referenceable: keep it (one entry per broken observer)
        held = _Kept(observer)
    _failed_observers[key] = held
    _logger.error(  # the repr, not the observer: a kept log record must not keep it alive
        "observer %s raised in %s (ignored; logged once per observer and event)",
        repr(observer), event, exc_info=error,
    )


class _Kept:
    """A strong reference with a weak reference's call: ``kept()`` is the object."""

    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __call__(self) -> object:
        return self._obj


def _forget(key: tuple[int, str], gone: object) -> None:
    if _failed_observers.get(key) is gone:
        del _failed_observers[key]


def open_all(observers: Iterable[Observer], info: PoolInfo) -> list[Observer]:
    """Tell each observer a pool (or a pipeline) opens; the observers they return, in
    order (one whose ``opened`` raises is logged and left out)."""
    opened: list[Observer] = []
    for observer in observers:
        try:
            mine = observer.opened(info)
        except Exception as error:
            observer_failed(observer, "opened", error)
            continue
        if mine is not None:
            opened.append(mine)
    return opened


class LastReport(Observer):
    """An observer that keeps a pool's final report, however the pool ended.

    ``conveyor.run`` returns the report, but when the input raises, or Ctrl-C or a cancel
    ends the run, there is no return value. Pass one of these and read :attr:`report`
    afterwards::

        last = conveyor.LastReport()
        with trio.move_on_after(60):
            await conveyor.run(fetch, urls, observers=[last])
        print(last.report.stats)   # also when the minute ran out

    :attr:`report` is None until the pool has ended. Reused for several pools, it holds the
    last one's.
    """

    def __init__(self) -> None:
        self.report: Report | None = None

    def closed(self, report: Report) -> None:
        self.report = report
