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
from typing import TYPE_CHECKING, Protocol, TextIO

from ._observe import Observer, PoolInfo

if TYPE_CHECKING:
    from ._records import Report

from ._options import check_bool, check_count, check_seconds, invalid

__all__ = ["DROP_ORDER", "Progress", "format_duration", "format_line", "terminal_width"]


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


def format_line(stats: _Counts, total: int | None = None, width: int | None = None) -> str:
    """One progress line: done / total, rate, ETA, in flight, queued, retries, failures.

    ``total`` is the number of items when known (``len(items)``); without it the line shows
    how many were accepted so far.

    ``width`` (the terminal's columns) fits the line to ``width - 1`` characters, so the
    cursor never reaches the last column and the line never wraps: fields are dropped, least
    useful first, in the order of :data:`DROP_ORDER`, keeping the others in their place; if
    even the count alone is too long, it is cut. Without ``width``, the full line.
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
    fields.append(("in_flight", f"in flight {stats.in_flight:,}"))
    if stats.queued:
        fields.append(("queued", f"queued {stats.queued:,}"))
    fields.append(("retries", f"retries {stats.retried:,}"))
    fields.append(("failed", f"failed {stats.failed:,}"))
    if stats.unfinished:
        fields.append(("unfinished", f"unfinished {stats.unfinished:,}"))
    fields.append(("elapsed", f"elapsed {format_duration(stats.elapsed)}"))
    if width is None:
        return " | ".join(text for _, text in fields)
    limit = max(width - 1, 0)
    for name in DROP_ORDER:
        line = " | ".join(text for _, text in fields)
        if len(line) <= limit:
            return line
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

    ``progress=True`` on ``run``, ``map`` and ``open_pool`` is ``progress=Progress()``; a
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

    @property
    def interval(self) -> float:
        """Seconds between lines (the observer's :attr:`snapshot_every`)."""
        return self.snapshot_every

    def opened(self, info: PoolInfo) -> Progress:
        """A pool starts: show its item count (``info.total``) as the total, unless
        ``total`` was given."""
        self.begin(info.total)
        return self

    def snapshot(self, stats: _Counts) -> None:
        """Write the line (every :attr:`interval` while the pool runs)."""
        self.write(stats)

    def closed(self, report: Report) -> None:
        """Write the final line, the pool's final account (and end the redrawn line on a
        terminal)."""
        self.write(report.stats, final=True)

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

    def write(self, stats: _Counts, final: bool = False) -> None:
        """Write one line (redrawn in place on a terminal)."""
        try:
            if self.tty:
                line = format_line(stats, self._run_total, terminal_width(self.stream))
                self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
            else:
                self.stream.write(format_line(stats, self._run_total) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            return  # stderr closed or gone: progress is best effort, never an error
        self.lines += 1


