"""The options of ``run``, ``map`` and ``open_pool``, typed once: :class:`PoolOptions`.

The three entry points take ``**options: Unpack[PoolOptions]``, so a type checker checks
each option's name and type at the call (``conveyor.run(f, xs, wokers=3)`` is an error for
mypy), and :data:`DEFAULTS` holds every option's default, once. At run time,
:func:`resolve` refuses a name that is not an option (with the nearest one as the fix) and
fills in the defaults; the values are then checked by the entry point, before any work
starts.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypedDict

import trio

from ._limits import Adaptive, PerKey, Rate
from ._observe import Observer
from ._options import invalid
from ._progress import Progress
from ._retry import Retry

__all__ = ["DEFAULTS", "PoolOptions", "check_name", "check_observers", "resolve"]


class PoolOptions(TypedDict, total=False):
    """The keyword options of :func:`conveyor.run`, :func:`conveyor.map` and
    :func:`conveyor.open_pool`; every one is optional (its default in brackets).

    Use it to type a function that passes options on::

        def crawl(urls: list[str], **options: Unpack[conveyor.PoolOptions]) -> ...:
            return await conveyor.run(fetch, urls, **options)

    - ``workers`` [10]: how many attempts run at once (>= 1). Worker tasks start as items
      arrive, never more than there are items to work on.
    - ``buffer`` [None: ``max(256, workers)``]: the work channel's size (>= 0). The pool holds at
      most ``buffer + workers`` items taken and not yet settled, retries waiting for their
      backoff included: that bounds memory whatever the number of items. Give it room
      (buffer > 0) if workers should keep busy while retries wait.
    - ``retry`` [None: one attempt]: the retry policy, a :class:`conveyor.Retry`.
    - ``timeout`` [None: no limit]: seconds one attempt may take (> 0); a timed-out attempt
      raises :class:`conveyor.AttemptTimeout`, retried like any error.
    - ``drain`` [0.0: cancel at once]: the grace period, in seconds (>= 0), for attempts
      already running when the pool is stopped from outside (a cancel, Ctrl-C,
      ``pool.stop()``); then they are cancelled.
    - ``limiter`` [None]: at most this many attempts at once: an int (this pool's own
      limit) or a :class:`trio.CapacityLimiter` (share it between pools, and the limit holds
      across all of them: "at most 5 calls to this API in the whole program").
    - ``rate`` [None]: a :class:`conveyor.Rate`: attempts start no faster than it allows.
      Share one ``Rate`` between pools to hold it across them.
    - ``per_key`` [None]: a :class:`conveyor.PerKey`: concurrency and rate per key of the
      item (e.g. per host). A busy key's items are parked, not waited for by a worker, so
      one slow key does not hold up the others.
    - ``adaptive`` [None]: a :class:`conveyor.Adaptive` concurrency limit that finds what a
      service can take (AIMD on the overload errors it names); its current value is in
      ``stats.adaptive_limit``.
    - ``progress`` [False]: True for a live progress line on stderr (redrawn on a terminal,
      a plain line every 10 s otherwise), or a :class:`conveyor.Progress` to choose the
      stream and interval. No effect on results.
    - ``journal`` [None]: a file path: record each settled item by ``key`` in this SQLite
      file, so that running again with the same journal skips the items it holds as
      succeeded (they come back as ``Succeeded`` with the stored value and attempts) and
      runs the others. Committed every 100 records or 0.2 s, and on a stop before the
      exception propagates; values must be picklable. A file that is not a journal, was
      written with another key function, is in use by another run, or that another user
      owns or others can write, raises :class:`conveyor.JournalError` at the call.
    - ``key`` [None: the item itself]: with ``journal``: ``item -> str | int | bytes``,
      distinct per item, cheap and stable across runs. Identified across runs by its name
      and a hash of its code and the plain values it uses. An item whose key raises, is of
      another type or repeats another's fails (attempts 0).
    - ``name`` ["pool"]: the pool's name, a non-empty str, as observers see it
      (:attr:`conveyor.PoolInfo.name`: a metric label, a span name).
    - ``observers`` [()]: a list or tuple of :class:`conveyor.Observer` instances that the
      pool tells what happens (attempts, retries, settled items, snapshots, the end).

    Limits are held around every attempt, retries included (a retry waiting for its
    backoff holds none), in this order: ``per_key``, ``limiter``, ``adaptive``, ``rate``.
    """

    workers: int
    buffer: int | None
    retry: Retry | None
    timeout: float | None
    drain: float
    limiter: trio.CapacityLimiter | int | None
    rate: Rate | None
    per_key: PerKey[Any] | None
    adaptive: Adaptive | None
    progress: bool | Progress
    journal: str | os.PathLike[str] | None
    key: Callable[[Any], str | int | bytes] | None
    name: str
    observers: Sequence[Observer]


#: Every option's default (``buffer=None`` means ``max(256, workers)``).
DEFAULTS: Final[PoolOptions] = {
    "workers": 10,
    "buffer": None,
    "retry": None,
    "timeout": None,
    "drain": 0.0,
    "limiter": None,
    "rate": None,
    "per_key": None,
    "adaptive": None,
    "progress": False,
    "journal": None,
    "key": None,
    "name": "pool",
    "observers": (),
}

# Keyword arguments of one entry point only: a hint when another is given them.
_ELSEWHERE = {"ordered": "conveyor.map", "window": "conveyor.map"}


def resolve(api: str, options: Mapping[str, object]) -> PoolOptions:
    """``options`` with the defaults filled in; a name that is not an option is refused.

    ``api`` is the entry point's name, for the message (``"run"``). The values are not
    checked here: the entry point checks them.
    """
    unknown = [name for name in options if name not in DEFAULTS]
    if unknown:
        raise TypeError(_unknown_message(api, unknown[0]))
    return {**DEFAULTS, **options}  # type: ignore[typeddict-item]  # names checked above


def _unknown_message(api: str, name: str) -> str:
    message = f"{api}() got an unexpected keyword argument {name!r}"
    if name in _ELSEWHERE and _ELSEWHERE[name] != f"conveyor.{api}":
        return f"{message}: {name}= applies to {_ELSEWHERE[name]}() only"
    close = difflib.get_close_matches(name, list(DEFAULTS), n=1)
    fix = f"did you mean {close[0]}=? " if close else ""
    return f"{message}; {fix}the options are: {', '.join(DEFAULTS)}"


def check_name(name: object) -> None:
    """``name`` is a non-empty str."""
    if not isinstance(name, str) or not name:
        raise invalid("name", name, "a non-empty str naming the pool (metrics, displays)",
                      "name='fetch'", kind=ValueError if isinstance(name, str) else TypeError)


def check_observers(observers: object) -> tuple[Observer, ...]:
    """``observers`` is a list or tuple of :class:`conveyor.Observer` instances; returns a
    tuple of them (a later change to the caller's list does not reach the pool)."""
    expected = "a list or tuple of conveyor.Observer instances"
    if isinstance(observers, Observer):
        raise invalid("observers", observers, expected + " (one observer goes in a list)",
                      f"observers=[] (here: observers=[{type(observers).__qualname__}(...)])",
                      kind=TypeError)
    if not isinstance(observers, Sequence) or isinstance(observers, str | bytes | bytearray):
        raise invalid("observers", observers, expected, "observers=[]", kind=TypeError)
    for observer in observers:
        if isinstance(observer, type) and issubclass(observer, Observer):
            raise invalid("observers", observers, expected + ", not classes",
                          f"observers=[] (here: observers=[{observer.__qualname__}()])",
                          kind=TypeError)
        if not isinstance(observer, Observer):
            raise invalid("observers", observers,
                          expected + f" (a subclass's instance), not {observer!r:.40}",
                          "observers=[]", kind=TypeError)
    return tuple(observers)
