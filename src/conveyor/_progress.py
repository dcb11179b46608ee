"""The live progress line of ``run(..., progress=True)``: an observer of the pool.

On a terminal, one line on stderr redrawn in place every ``interval`` (carriage return and
"erase to end of line"), fitted to the terminal's width (:func:`terminal_width`, fields
dropped in the order of :data:`DROP_ORDER`) so it never wraps; anywhere else (a log file, CI,
a pipe), a plain, full line every ``interval`` (10 s by default), so logs stay readable.
The final state is always written once more when the pool ends (:meth:`Progress.closed`),
also after a cancel. It only reads the pool's stats: no effect on results.

:class:`Progress` is an :class:`~conveyor.Observer` that only overrides ``opened``,
``snapshot`` and ``closed``: the pool calls ``snapshot`` every ``interval`` on trio's clock
(testable under ``autojump_clock``), and nothing per item. The standard library is enough for
one line of text; users who already show a tqdm or rich display feed that instead
(:class:`conveyor.TqdmProgress`, :class:`conveyor.RichProgress`, in ``conveyor._bars``).
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

import trio

from ._observe import Observer, PoolInfo, notify, open_all, overrides

if TYPE_CHECKING:
    from ._pipeline import Stage
    from ._records import Report
    from ._stats import Stats

from ._options import check_bool, check_count, check_seconds, invalid

__all__ = [
    "DROP_ORDER",
    "PIPELINE_DROP_ORDER",
    "PipelineProgress",
    "Progress",
    "format_duration",
    "format_line",
    "format_stage",
    "terminal_width",
]


class _Counts(Protocol):
    """What the progress line reads (``conveyor.Stats`` has all of it)."""

    @property
    def succeeded(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def unfinished(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def submitted(self) -> int: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def throughput(self) -> float: ...


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _rate(per_second: float) -> str:
    if per_second >= 100:
        return f"{per_second:,.0f}/s"
    if per_second >= 10:
        return f"{per_second:.1f}/s"
    return f"{per_second:.2f}/s"


def format_line(
    stats: _Counts,
    total: int | None = None,
    width: int | None = None,
    stages: Mapping[str, _Counts] | None = None,
) -> str:
    """One progress line: done / total, rate, ETA, in flight, queued, retries, failures.

    ``total`` is the number of items when known (``len(items)``); without it the line shows
    how many were accepted so far.

    ``stages`` (a pipeline's, by name, in order): ``stats`` counts the pipeline's inputs, and
    each stage gets a part of its own (:func:`format_stage`) in place of the in flight,
    queued and retries of the whole, which are the stages' summed.

    ``width`` (the terminal's columns) fits the line to ``width - 1`` characters, so the
    cursor never reaches the last column and the line never wraps: fields are dropped, least
    useful first, in the order of :data:`DROP_ORDER` (with ``stages``:
    :data:`PIPELINE_DROP_ORDER`), keeping the others in their place; if even the count alone
    is too long, it is cut. Without ``width``, the full line.
    """
    done = stats.succeeded + stats.failed + stats.unfinished
    rate = stats.throughput
    fields: list[tuple[str, str]] = [("label", "conveyor")]
    if total is not None and total > 0:
        fields.append(("done", f"{done:,}/{total:,} {100 * done / total:.1f}%"))
    else:
        fields.append(("done", f"{done:,} done of {stats.submitted:,} accepted"))
    fields.append(("rate", _rate(rate)))
    if total is not None and total > done:
        fields.append(("eta", f"ETA {format_duration((total - done) / rate) if rate > 0 else '?'}"))
    if stages is None:
        fields.append(("in_flight", f"in flight {stats.in_flight:,}"))
        if stats.queued:
            fields.append(("queued", f"queued {stats.queued:,}"))
        fields.append(("retries", f"retries {stats.retried:,}"))
    fields.append(("failed", f"failed {stats.failed:,}"))
    if stats.unfinished:
        fields.append(("unfinished", f"unfinished {stats.unfinished:,}"))
    if stages is not None:
        fields += [("stages", format_stage(name, counts)) for name, counts in stages.items()]
    fields.append(("elapsed", f"elapsed {format_duration(stats.elapsed)}"))
    if width is None:
        return " | ".join(text for _, text in fields)
    limit = max(width - 1, 0)
    for name in DROP_ORDER if stages is None else PIPELINE_DROP_ORDER:
        line = " | ".join(text for _, text in fields)
        if len(line) <= limit:
            return line
        if name in _STAGE_DETAIL and stages is not None:
            detail = _STAGE_DETAIL[name]
            parts = iter([format_stage(n, counts, detail) for n, counts in stages.items()])
            fields = [(field, next(parts) if field == "stages" else text)
                      for field, text in fields]
        fields = [field for field in fields if field[0] != name]
    return " | ".join(text for _, text in fields)[:limit]


DROP_ORDER = (
    "queued", "retries", "elapsed", "label", "in_flight", "rate", "eta", "unfinished", "failed",
)
"""The fields a narrow terminal loses, first to last (see :func:`format_line`).

Kept longest: how many items are done (of how many, and the percentage), then the failures
and unfinished items (what needs attention), the ETA and the rate (when it will end), how many
run now, the ``conveyor`` label; dropped first: elapsed time, retries, queued items. The
count itself is never dropped, only cut when even it does not fit.
"""

PIPELINE_DROP_ORDER = (
    "elapsed", "stage_details", "label", "stage_failures", "rate", "stages", "eta",
    "unfinished", "failed",
)
"""What a pipeline's line loses on a narrow terminal, first to last: the elapsed time; each
stage's in flight, queued and retries (``stage_details``: ``fetch: 1,300 done, 1 failed``);
the ``conveyor`` label; each stage's failures (``stage_failures``: ``fetch 1,300``, how
many it has done); the rate; the stages' parts; then as :data:`DROP_ORDER`: the ETA, the
unfinished and failed inputs. The count of inputs done is never dropped."""

StageDetail = Literal["full", "brief", "done"]
_STAGE_DETAIL: dict[str, StageDetail] = {"stage_details": "brief", "stage_failures": "done"}


def format_stage(name: str, counts: _Counts, detail: StageDetail = "full") -> str:
    """A pipeline stage's part of the line, its own items: ``fetch: 1,300 done, 20 in
    flight, 40 queued, 7 retries, 1 failed, 2 unfinished`` (counts of 0 left out, but for
    ``done``: succeeded, failed and unfinished). Narrower: ``detail="brief"``, ``fetch:
    1,300 done, 1 failed, 2 unfinished``; ``detail="done"``, ``fetch 1,300``."""
    done = counts.succeeded + counts.failed + counts.unfinished
    if detail == "done":
        return f"{name} {done:,}"
    parts = [f"{done:,} done"]
    if detail == "full":
        parts += [f"{n:,} {what}" for n, what in (
            (counts.in_flight, "in flight"), (counts.queued, "queued"),
            (counts.retried, "retries"),
        ) if n]
    parts += [f"{n:,} {what}" for n, what in (
        (counts.failed, "failed"), (counts.unfinished, "unfinished"),
    ) if n]
    return f"{name}: {', '.join(parts)}"


def terminal_width(stream: object) -> int:
    """The columns to fit a redrawn line to.

    The ``COLUMNS`` environment variable when it is a whole number > 0 (the convention of
    :func:`shutil.get_terminal_size`, so a user can override it), else the size of the
    terminal behind ``stream``'s file descriptor, else 80.
    """
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(stream.fileno()).columns  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # no fd, not a terminal, closed
        columns = 0
    return columns if columns > 0 else 80


class Progress(Observer):
    """The live progress line: an observer that writes a pool's counters as one line.

    ``progress=True`` on ``run``, ``map`` and ``open_pool`` (and on a pipeline's ``run``,
    ``map`` and ``open``: one line for its inputs and each stage) is
    ``progress=Progress()``; a
    ``Progress`` is also an :class:`~conveyor.Observer` like any other: ``opened`` takes the
    pool's item count as the total, ``snapshot`` (every ``interval``) writes the line,
    ``closed`` writes the final line, the pool's final account, also after a cancel.

    Args:
        stream: where to write, an object with a ``write(str)`` method (default
            ``sys.stderr`` at the time of writing).
        total: the number of items (an int >= 0), when known. Without it, each pool shows
            the number of its own items when it knows it (``len(items)``), so a
            ``Progress`` used for several runs shows each run's count, never the last one's.
        interval: seconds between lines (a finite number > 0); default 0.2 s on a terminal,
            10 s otherwise.
        tty: redraw in place, fitted to the terminal's width (True), or write plain,
            full lines (False); default: whether ``stream`` is a terminal.

    Every argument is checked here, at the call.
    """

    snapshot_every: float

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        total: int | None = None,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        if stream is not None and (
            not callable(getattr(stream, "write", None))
            or isinstance(stream, io.RawIOBase | io.BufferedIOBase)
        ):
            given: object = stream
            count = type(given) is int and given >= 0
            raise invalid(
                "stream", stream, "a text stream (e.g. sys.stdout, an open text file) or None",
                f"stream=None, total={given!r} (the number of items goes in total=)" if count
                else "stream=sys.stdout", owner="Progress", kind=TypeError,
            )
        check_count("total", total, minimum=0, allow_none=True, owner="Progress")
        check_seconds("interval", interval, above=0, allow_none=True, owner="Progress",
                      example="interval=1.0")
        check_bool("tty", tty, allow_none=True, owner="Progress")
        self._stream = stream
        self._total = total
        self._run_total = total  # this pool's: total, else the count of its items if known
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                tty = bool(isatty()) if isatty is not None else False
            except ValueError:  # a closed stream
                tty = False
        self.tty = tty
        self.snapshot_every = interval if interval is not None else (0.2 if tty else 10.0)
        self.lines = 0  # how many times it wrote (tests)
        self._stages: Callable[[], Mapping[str, _Counts]] | None = None  # a pipeline's

    @property
    def interval(self) -> float:
        """Seconds between lines (the observer's :attr:`snapshot_every`)."""
        return self.snapshot_every

    def opened(self, info: PoolInfo) -> Progress:
        """A pool starts: show its item count (``info.total``) as the total, unless
        ``total`` was given. A pipeline (``info.stages`` set): show each stage too."""
        self.begin(info.total)
        self._stages = info.stages
        return self

    def snapshot(self, stats: _Counts) -> None:
        """Write the line (every :attr:`interval` while the pool runs)."""
        if self._stages is None:
            self.write(stats)
        else:
            self.write(stats, stages=self._stages())

    def closed(self, report: Report) -> None:
        """Write the final line, the pool's final account (and end the redrawn line on a
        terminal); a pipeline's with each stage's final counts (``report.stages``)."""
        if self._stages is None:
            self.write(report.stats, final=True)
        else:
            self.write(report.stats, final=True, stages=report.stages)

    def begin(self, items: int | None) -> None:
        """A run starts: show ``items`` as its total, unless ``total`` was given."""
        self._run_total = self._total if self._total is not None else items

    @property
    def total(self) -> int | None:
        """The total given (``None``: each run's own count); setting it shows it from now on.

        The journal sets it, once it knows how many items a resumed run has left.
        """
        return self._total

    @total.setter
    def total(self, total: int | None) -> None:
        self._total = self._run_total = total

    @property
    def stream(self) -> TextIO:
        """Where the line goes (``sys.stderr`` at the time of writing by default)."""
        return self._stream if self._stream is not None else sys.stderr

    def write(
        self, stats: _Counts, final: bool = False, stages: Mapping[str, _Counts] | None = None
    ) -> None:
        """Write one line (redrawn in place on a terminal); ``stages``: a pipeline's, each
        stage's counts by name (see :func:`format_line`)."""
        try:
            if self.tty:
                line = format_line(stats, self._run_total, terminal_width(self.stream), stages)
                self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
            else:
                self.stream.write(format_line(stats, self._run_total, stages=stages) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            return  # stderr closed or gone: progress is best effort, never an error
        self.lines += 1




class PipelineProgress:
    """How a pipeline run tells its ``progress=`` observer what happens (``_pipeline._Run``).

    :meth:`open`: ``opened`` once, with a :class:`~conveyor.PoolInfo` of the whole pipeline
    (name ``"pipeline"``, its inputs' stats and total, ``stages`` each stage's stats);
    :meth:`tick` (a task): ``snapshot`` every ``snapshot_every`` until :meth:`stop` (the run's
    tasks have ended); :meth:`close`: ``closed`` once with the final report, however the run
    ended. Errors of the observer are logged once and ignored, as for a pool's observers.
    With no observer, each call does nothing.
    """

    __slots__ = ("_feeds", "_info", "_observers", "_scope")

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self._observers = observers
        self._feeds: list[Observer] = []
        self._info: PoolInfo | None = None
        self._scope = trio.CancelScope()

    def open(
        self,
        stages: Sequence[Stage],
        total: int | None,
        stats: Callable[[], Stats],
        stage_stats: Callable[[], Mapping[str, Stats]],
    ) -> None:
        """The run starts: tell each observer (``opened``), keep what each returns."""
        if not self._observers:
            return
        retries = [s.options["retry"] for s in stages]
        self._info = info = PoolInfo(
            name="pipeline",
            workers=sum(s.options["workers"] for s in stages),
            retry_attempts=max(1 if r is None else r.attempts for r in retries),
            total=total,
            stats=stats,
            stages=stage_stats,
        )
        self._feeds.extend(open_all(self._observers, info))

    async def tick(self) -> None:
        """Tell each observer the pipeline's stats every ``snapshot_every`` seconds, until
        :meth:`stop`."""
        info = self._info
        ticking = [f for f in self._feeds
                   if f.snapshot_every is not None and overrides(f, "snapshot")]
        if info is None or not ticking:
            return
        with self._scope:
            async with trio.open_nursery() as nursery:
                for feed in ticking:
                    nursery.start_soon(self._every, feed, info.stats)

    @staticmethod
    async def _every(feed: Observer, stats: Callable[[], Stats]) -> None:
        every = feed.snapshot_every
        assert every is not None
        while True:
            await trio.sleep(every)
            notify(feed.snapshot, stats())

    def stop(self) -> None:
        """No more snapshots (the run's tasks have ended)."""
        self._scope.cancel()

    def close(self, report: Callable[[], Report]) -> None:
        """The run has ended and every input has settled: ``closed`` with its report, once."""
        self._scope.cancel()
        feeds = [f for f in self._feeds if overrides(f, "closed")]
        self._feeds = []
        if feeds:
            final = report()
            for feed in feeds:
                notify(feed.closed, final)
