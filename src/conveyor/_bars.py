"""Feeding a tqdm bar or a rich progress display from a pool: two observers.

Users who already show a tqdm or rich progress display pass one of these in ``observers=``
instead of ``progress=True``. Like :class:`conveyor.Progress`, they only override ``opened``,
``snapshot`` and ``closed``: the display is updated every ``interval`` from the pool's
counters, on trio's clock, and nothing happens per item (a worker pays nothing for them).

tqdm and rich are optional (``pip install 'conveyor[bars]'``); they are imported when one of
these observers is created, never by ``import conveyor``.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._observe import Observer, PoolInfo
from ._options import check_seconds, invalid

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichDisplay
    from rich.progress import TaskID

    from ._records import Report
    from ._stats import Stats

__all__ = ["RichProgress", "TqdmProgress"]


def _require(module: str, owner: str) -> ModuleType:
    """Import ``module`` (tqdm or rich) for ``owner``, or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.partition(".")[0]
        raise ImportError(
            f"conveyor.{owner} needs {package}, which is not installed: "
            f"pip install 'conveyor[bars]' (or pip install {package})"
        ) from error


def _counts(stats: Stats) -> dict[str, int]:
    """What a bar shows besides its count: successes, failures, retries, and the items a
    stop left unfinished when there are any."""
    counts = {"ok": stats.succeeded, "failed": stats.failed, "retried": stats.retried}
    if stats.unfinished:
        counts["unfinished"] = stats.unfinished
    return counts


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for name, count in counts.items():
        into[name] = into.get(name, 0) + count


# --- tqdm --------------------------------------------------------------------------------


class TqdmProgress(Observer):
    """Shows a pool's progress on a tqdm bar: yours, or one it creates for each pool.

    The bar counts settled items (succeeded, failed or unfinished) against the pool's
    total (``len(items)`` when ``items`` has one), with ``ok``, ``failed`` and ``retried``
    (and ``unfinished`` after a stop) as its postfix; it is updated every ``interval``
    seconds, not per item, and brought to the final account when the pool ends, also after
    a cancel.

    Args:
        bar: your ``tqdm`` bar (any tqdm class: ``tqdm.auto``, ``tqdm.rich``...), or None
            to create one per pool. Yours is never closed here: it keeps counting across
            the pools you give it to (each pool's items are added to its count, its postfix
            adds up their counts, and when you created it without a total, each pool adds
            its own total to the bar's). A created bar (``tqdm.auto.tqdm``, described by the
            pool's name) shows one pool and is closed when that pool ends.
        interval: seconds between updates (a finite number > 0; default 0.2).
        **tqdm_kwargs: options for the bars it creates (``desc``, ``file``, ``leave``,
            ``total``...), checked here against tqdm's own; only without ``bar``.

    Raises:
        ImportError: tqdm is not installed (``pip install 'conveyor[bars]'``).
    """

    snapshot_every: float

    def __init__(self, bar: Any = None, *, interval: float = 0.2, **tqdm_kwargs: Any) -> None:
        std = _require("tqdm.std", "TqdmProgress")
        if bar is not None and not isinstance(bar, std.tqdm):
            raise invalid("bar", bar, "a tqdm progress bar, or None (a bar per pool, made here)",
                          "bar=None", owner="TqdmProgress", kind=TypeError)
        if bar is not None and tqdm_kwargs:
            raise invalid(
                "bar", bar, f"None when options for the bars it makes are given "
                f"({', '.join(sorted(tqdm_kwargs))}): set those on your bar instead",
                "bar=None", owner="TqdmProgress", kind=TypeError,
            )
        known = set(inspect.signature(std.tqdm.__init__).parameters) - {
            "self", "iterable", "kwargs"
        }
        unknown = sorted(set(tqdm_kwargs) - known)
        if unknown:
            raise invalid(
                unknown[0], tqdm_kwargs[unknown[0]],
                f"no such option: tqdm's options are {', '.join(sorted(known))}",
                "desc='items' (a tqdm option)", owner="TqdmProgress", kind=TypeError,
            )
        check_seconds("interval", interval, above=0, owner="TqdmProgress",
                      example="interval=0.2")
        self.bar = bar
        self.snapshot_every = interval
        self._options = tqdm_kwargs
        self._make = _require("tqdm.auto", "TqdmProgress").tqdm
        # A given bar without a total: each pool adds its own to it (see _TqdmFeed.closed).
        self._grows = bar is not None and bar.total is None
        # Counts of the pools that ended, shown on a bar that is given (it spans them).
        self._ended: dict[str, int] = {}
        self._feeds: list[_TqdmFeed] = []

    def opened(self, info: PoolInfo) -> _TqdmFeed:
        """A pool starts: create its bar (or take yours) with the pool's total."""
        if self.bar is None:
            options = {"desc": info.name, "total": info.total, **self._options}
            feed = _TqdmFeed(self, self._make(**options), own=True)
        else:
            bar = self.bar
            feed = _TqdmFeed(self, bar, own=False)
            if self._grows and info.total is not None:
                # This pool's items join the bar's total (counted so far, if unset).
                bar.total = (bar.n if bar.total is None else bar.total) + info.total
                feed.planned = info.total
                bar.refresh()
            self._feeds.append(feed)
        feed.snapshot_every = self.snapshot_every
        return feed

    def _postfix(self) -> dict[str, int]:
        """The counts on a given bar: those of the pools that ended plus the running ones."""
        counts = dict(self._ended)
        for feed in self._feeds:
            _add(counts, feed.counts)
        return counts


class _TqdmFeed(Observer):
    """One pool's updates of a tqdm bar."""

    snapshot_every: float

    def __init__(self, owner: TqdmProgress, bar: Any, *, own: bool) -> None:
        self._owner = owner
        self.bar = bar
        self._own = own
        self._shown = 0  # settled items already added to the bar
        self.planned: int | None = None  # what this pool added to a given bar's total
        self.counts: dict[str, int] = {}

    def _show(self, stats: Stats) -> None:
        settled = stats.succeeded + stats.failed + stats.unfinished
        self.counts = _counts(stats)
        postfix = self.counts if self._own else self._owner._postfix()
        self.bar.set_postfix(postfix, refresh=False)
        if settled > self._shown:
            # update() redraws when tqdm's own mininterval has passed since the last redraw.
            self.bar.update(settled - self._shown)
            self._shown = settled

    def snapshot(self, stats: Stats) -> None:
        """Bring the bar to the pool's counters."""
        self._show(stats)

    def closed(self, report: Report) -> None:
        """Show the final account; close a bar it created (yours stays open)."""
        self._show(report.stats)
        if self._own:
            self.bar.close()
            return
        if self.planned is not None and self.planned != self._shown:
            # A stop left items of the input unread: the bar's total drops them again.
            self.bar.total += self._shown - self.planned
        owner = self._owner
        owner._feeds.remove(self)
        _add(owner._ended, self.counts)
        self.bar.refresh()


# --- rich --------------------------------------------------------------------------------


class RichProgress(Observer):
    """Shows a pool's progress as a task of a rich progress display: yours, or its own.

    Each pool gets a task, described as ``description`` (default: the pool's name) followed
    by its counts, e.g. ``fetch (ok 1,204, failed 3, retried 17)`` (and ``unfinished`` after
    a stop); the counts are also the task's fields ``ok``, ``failed``, ``retried`` and
    ``unfinished``, for columns of your own (``TextColumn("{task.fields[failed]}")``). The
    task's total is the pool's (``len(items)`` when ``items`` has one; when unknown, the
    number of settled items once the pool ends). Updated every ``interval`` seconds, not
    per item, and brought to the final account when the pool ends, also after a cancel.

    Args:
        progress: your ``rich.progress.Progress`` (started, e.g. ``with Progress() as p``),
            or None for its own display: started when a pool starts, with a task per pool
            running at once, and stopped when the last of them ends.
        description: the task's description (default: the pool's ``name``).
        console: the ``rich.console.Console`` of its own display (default: rich's); only
            without ``progress``.
        interval: seconds between updates (a finite number > 0; default 0.2).

    Raises:
        ImportError: rich is not installed (``pip install 'conveyor[bars]'``).
    """

    snapshot_every: float

    def __init__(
        self,
        progress: RichDisplay | None = None,
        *,
        description: str | None = None,
        console: Console | None = None,
        interval: float = 0.2,
    ) -> None:
        rich_progress = _require("rich.progress", "RichProgress")
        if progress is not None and not isinstance(progress, rich_progress.Progress):
            raise invalid("progress", progress,
                          "a rich.progress.Progress, or None (a display made here)",
                          "progress=None", owner="RichProgress", kind=TypeError)
        if description is not None and not isinstance(description, str):
            raise invalid("description", description, "a str, or None (the pool's name)",
                          "description='items'", owner="RichProgress", kind=TypeError)
        if console is not None:
            if progress is not None:
                raise invalid(
                    "console", console, "None when a progress is given (it has its own "
                    "console: Progress(console=...))", "console=None", owner="RichProgress",
                    kind=TypeError,
                )
            if not isinstance(console, _require("rich.console", "RichProgress").Console):
                raise invalid("console", console, "a rich.console.Console, or None",
                              "console=None", owner="RichProgress", kind=TypeError)
        check_seconds("interval", interval, above=0, owner="RichProgress",
                      example="interval=0.2")
        self.progress = progress
        self.description = description
        self.snapshot_every = interval
        self._console = console
        self._module = rich_progress
        self._display: RichDisplay | None = None  # its own display, while a pool runs
        self._running = 0  # pools on its own display

    def opened(self, info: PoolInfo) -> _RichFeed:
        """A pool starts: add its task (starting its own display first if needed)."""
        display = self.progress
        if display is None:
            display = self._display
            if display is None:
                module = self._module
                display = self._display = module.Progress(
                    *module.Progress.get_default_columns()[:-1],  # all but time remaining:
                    module.MofNCompleteColumn(),
                    module.TimeElapsedColumn(),
                    console=self._console,
                    auto_refresh=False,  # refreshed at each snapshot: no thread of its own
                )
                display.start()
            self._running += 1
        description = self.description if self.description is not None else info.name
        task = display.add_task(description, total=info.total, **_counts_fields({}))
        feed = _RichFeed(self, display, task, description, info.total)
        feed.snapshot_every = self.snapshot_every
        return feed

    def _ended(self) -> None:
        if self.progress is None:
            self._running -= 1
            if self._running == 0 and self._display is not None:
                display, self._display = self._display, None
                display.stop()


def _counts_fields(counts: dict[str, int]) -> dict[str, Any]:
    """The task's fields: every count, 0 when absent (a column may name any of them)."""
    return {"ok": 0, "failed": 0, "retried": 0, "unfinished": 0, **counts}


class _RichFeed(Observer):
    """One pool's task on a rich display."""

    snapshot_every: float

    def __init__(
        self, owner: RichProgress, display: RichDisplay, task: TaskID, description: str,
        total: int | None,
    ) -> None:
        self._owner = owner
        self._display = display
        self._task = task
        self._description = description
        self._total = total

    def _show(self, stats: Stats, *, final: bool = False) -> None:
        counts = _counts(stats)
        settled = stats.succeeded + stats.failed + stats.unfinished
        text = ", ".join(f"{name} {count:,}" for name, count in counts.items())
        total = self._total if self._total is not None or not final else settled
        self._display.update(
            self._task, completed=settled, total=total,
            description=f"{self._description} ({text})", **_counts_fields(counts),
        )
        self._display.refresh()

    def snapshot(self, stats: Stats) -> None:
        """Bring the task to the pool's counters."""
        self._show(stats)

    def closed(self, report: Report) -> None:
        """Show the final account; stop its own display when no pool is left on it."""
        self._show(report.stats, final=True)
        self._owner._ended()
