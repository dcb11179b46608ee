"""TqdmProgress and RichProgress: a real tqdm bar and a real rich display fed from a pool."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from rich.console import Console
from rich.progress import Progress as RichDisplay
from tqdm import tqdm

import conveyor
from conveyor._observe import overrides

PER_ITEM = ["attempt_started", "attempt_ended", "retry_scheduled", "succeeded", "failed",
            "unfinished"]


class Recorder(conveyor.Observer):
    """Keeps the report the pool hands to ``closed``."""

    def __init__(self) -> None:
        self.report: conveyor.Report | None = None

    def closed(self, report: conveyor.Report) -> None:
        self.report = report


class Snapshots(conveyor.Observer):
    """Counts the snapshots it is given."""

    snapshot_every = 0.3  # never at the instant a 1-second item ends (no same-instant race)

    def __init__(self) -> None:
        self.count = 0

    def snapshot(self, stats: conveyor.Stats) -> None:
        self.count += 1


async def observed_run(
    fn: Callable[[Any], Awaitable[Any]], items: Iterable[Any],
    observers: list[conveyor.Observer], *, name: str = "pool", workers: int = 10,
    buffer: int = 256, retry: conveyor.Retry | None = None,
) -> None:
    """``conveyor.run(fn, list(items), observers=observers, ...)``: the pool calls the
    observers (opened with its total, snapshot every snapshot_every on trio's clock, closed
    with the report, also after a cancel)."""
    await conveyor.run(fn, list(items), workers=workers, buffer=buffer, retry=retry,
                       name=name, observers=observers)


_attempts: dict[int, int] = {}


async def work(item: int) -> int:
    """One second per attempt; multiples of 5 always fail, 3 mod 7 fail their first attempt."""
    _attempts[item] = _attempts.get(item, 0) + 1
    await trio.sleep(1)
    if item % 5 == 0 or (item % 7 == 3 and _attempts[item] == 1):
        raise ValueError(item)
    return item


RETRY = conveyor.Retry(attempts=2, backoff=None)


@pytest.fixture(autouse=True)
def _fresh_attempts() -> None:
    _attempts.clear()


def last_frame(text: str) -> str:
    """What a tqdm bar shows last (it redraws after a carriage return)."""
    return text.rstrip("\n").rsplit("\r", 1)[-1]


def tqdm_counts(frame: str) -> dict[str, int]:
    return {name: int(count) for name, count in re.findall(r"(\w+)=(\d+)", frame)}


# --- tqdm --------------------------------------------------------------------------------


async def test_tqdm_bar_ends_with_the_reports_counts_failures_included(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    recorder = Recorder()
    await observed_run(work, range(40), [conveyor.TqdmProgress(file=out), recorder],
                       workers=4, retry=RETRY)
    stats = recorder.report.stats  # type: ignore[union-attr]
    assert stats.failed == 8 and stats.retried > 8  # the run has failures and retries
    frame = last_frame(out.getvalue())
    assert frame.startswith("pool: 100%|") and "| 40/40 [" in frame
    assert tqdm_counts(frame) == {"ok": stats.succeeded, "failed": 8,
                                  "retried": stats.retried}
    assert out.getvalue().endswith("]\n")  # the bar it created was closed


async def test_tqdm_bar_moves_with_snapshots_not_items(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A bar it creates shows the pool's total at once and is brought up to date at each
    snapshot (with mininterval=0, each update is drawn)."""
    out = io.StringIO()
    await observed_run(work, range(1, 5), [conveyor.TqdmProgress(file=out, mininterval=0,
                                                                 interval=0.5)], workers=1)
    frames = out.getvalue().rstrip("\n").split("\r")[1:]
    assert frames[0].startswith("pool:   0%|") and "| 0/4 [" in frames[0]
    assert [re.search(r"\| (\d)/4 \[", frame).group(1) for frame in frames] == [  # type: ignore[union-attr]
        "0", "1", "2", "3", "4", "4",  # one per second (an item), then the final close
    ]


async def test_two_displays_on_one_pool(autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    snapshots = Snapshots()
    await observed_run(work, range(1, 9), [conveyor.TqdmProgress(file=out), snapshots],
                       workers=2)
    assert snapshots.count == 13  # at 0.3, 0.6, ... 3.9: the pool ends at 4.0
    assert "| 8/8 [" in last_frame(out.getvalue())


def test_tqdm_progress_only_overrides_the_snapshot_and_the_end() -> None:
    observer = conveyor.TqdmProgress(file=io.StringIO())
    assert [name for name in PER_ITEM if overrides(observer, name)] == []
    info = conveyor.PoolInfo(name="p", workers=1, retry_attempts=1, total=3,
                             stats=conveyor.Stats)
    feed = observer.opened(info)
    assert [name for name in PER_ITEM if overrides(feed, name)] == []
    assert overrides(feed, "snapshot") and overrides(feed, "closed")
    assert feed.snapshot_every == observer.snapshot_every == 0.2
    feed.closed(conveyor.Report([], [], [], conveyor.Stats()))


async def test_your_tqdm_bar_spans_two_pools_and_stays_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    recorder = Recorder()
    with tqdm(file=out, desc="job", mininterval=0) as bar:
        observer = conveyor.TqdmProgress(bar)
        await observed_run(work, range(1, 11), [observer, recorder], workers=5)
        first = recorder.report.stats  # type: ignore[union-attr]
        assert bar.n == 10 and bar.total == 10 and not bar.disable
        await observed_run(work, range(11, 31), [observer, recorder], workers=5, retry=RETRY)
        second = recorder.report.stats  # type: ignore[union-attr]
        assert bar.n == 30 and bar.total == 30  # its total grew by the second pool's
        frame = last_frame(out.getvalue())
    assert "| 30/30 [" in frame
    assert tqdm_counts(frame) == {
        "ok": first.succeeded + second.succeeded, "failed": first.failed + second.failed,
        "retried": first.retried + second.retried,
    }
    assert second.failed == 4


async def test_two_pools_get_a_bar_each(autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    observer = conveyor.TqdmProgress(file=out)
    await observed_run(work, range(1, 5), [observer], name="first")
    _attempts.clear()
    await observed_run(work, range(1, 11), [observer], name="second")
    finals = [last_frame(line) for line in out.getvalue().split("\n")[:-1]]
    assert len(finals) == 2
    assert finals[0].startswith("first: 100%|") and "| 4/4 [" in finals[0]
    assert tqdm_counts(finals[0]) == {"ok": 3, "failed": 1, "retried": 0}  # 3 fails
    assert finals[1].startswith("second: 100%|") and "| 10/10 [" in finals[1]
    assert tqdm_counts(finals[1]) == {"ok": 7, "failed": 3, "retried": 0}  # 3, 5, 10


async def test_tqdm_after_a_cancel_shows_the_unfinished_items(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    recorder = Recorder()
    with trio.move_on_after(2.5):
        await observed_run(work, range(1, 21), [conveyor.TqdmProgress(file=out), recorder],
                           workers=4)
    stats = recorder.report.stats  # type: ignore[union-attr]
    assert stats.unfinished == 12 and stats.settled == 20
    frame = last_frame(out.getvalue())
    assert "| 20/20 [" in frame
    assert tqdm_counts(frame) == {"ok": stats.succeeded, "failed": stats.failed, "retried": 0,
                                  "unfinished": 12}


async def test_your_bar_after_a_cancelled_pool_still_ends_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stop leaves part of the input unread: its items leave the bar's total again, so the
    next pool on the bar ends at 100%, not short of it."""
    out = io.StringIO()
    recorder = Recorder()
    with tqdm(file=out, mininterval=0) as bar:
        observer = conveyor.TqdmProgress(bar)
        with trio.move_on_after(2.5):
            await observed_run(work, range(1, 21), [observer, recorder], workers=2, buffer=1)
        stopped = recorder.report.stats  # type: ignore[union-attr]
        assert stopped.submitted < 20 and bar.n == bar.total == stopped.settled
        await observed_run(work, range(21, 25), [observer])
        assert bar.n == bar.total == stopped.settled + 4
    assert tqdm_counts(last_frame(out.getvalue()))["unfinished"] == stopped.unfinished > 0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("bar",), {}, TypeError,
         r"^TqdmProgress: bar='bar' is not valid: expected a tqdm progress bar, or None "
         r"\(a bar per pool, made here\); e\.g\. bar=None$"),
        ((), {"totl": 5}, TypeError,
         r"^TqdmProgress: totl=5 is not valid: expected no such option: tqdm's options are "
         r".*\btotal\b"),
        ((), {"iterable": [1]}, TypeError, r"^TqdmProgress: iterable=\[1\] is not valid"),
        ((), {"interval": 0}, ValueError,
         r"^TqdmProgress: interval=0 is not valid: expected a finite number of seconds > 0; "
         r"e\.g\. interval=0\.2$"),
        ((), {"interval": True}, TypeError, r"^TqdmProgress: interval=True is not valid"),
        ((), {"interval": None}, TypeError, r"^TqdmProgress: interval=None is not valid"),
        ((), {"interval": float("nan")}, ValueError, r"^TqdmProgress: interval=nan is not valid"),
    ],
)
def test_tqdm_progress_refuses_bad_input_at_the_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        conveyor.TqdmProgress(*args, **kwargs)


def test_options_go_on_your_own_bar_as_the_message_says() -> None:
    out = io.StringIO()
    with tqdm(file=out, disable=True) as bar:
        with pytest.raises(TypeError, match=r"^TqdmProgress: bar=.* is not valid: expected "
                                            r"None when options for the bars it makes are "
                                            r"given \(desc\): set those on your bar instead"):
            conveyor.TqdmProgress(bar, desc="job")
        bar.set_description("job")  # the advice: set it on the bar
        conveyor.TqdmProgress(bar)


# --- rich --------------------------------------------------------------------------------


def console(out: io.StringIO) -> Console:
    return Console(file=out, force_terminal=False, width=120)


def rich_counts(line: str) -> dict[str, int]:
    found = re.search(r"\(([^)]*)\)", line)
    assert found, line
    return {name: int(count.replace(",", ""))
            for name, count in (part.split(" ") for part in found.group(1).split(", "))}


async def test_rich_display_ends_with_the_reports_counts_failures_included(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    recorder = Recorder()
    observer = conveyor.RichProgress(console=console(out))
    await observed_run(work, range(40), [observer, recorder], workers=4, retry=RETRY,
                       name="fetch")
    stats = recorder.report.stats  # type: ignore[union-attr]
    assert stats.failed == 8 and stats.retried > 8
    (line,) = out.getvalue().splitlines()  # a display that is not a terminal: the end only
    assert line.startswith("fetch (ok ") and " 100% " in line and " 40/40 " in line
    assert rich_counts(line) == {"ok": stats.succeeded, "failed": 8, "retried": stats.retried}
    assert observer._display is None  # its display was stopped


async def test_your_rich_display_gets_a_task_per_pool_with_its_fields(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    recorder = Recorder()
    with RichDisplay(console=console(out)) as display:
        observer = conveyor.RichProgress(display, description="resize")
        await observed_run(work, range(1, 11), [observer, recorder])
        first = recorder.report.stats  # type: ignore[union-attr]
        await observed_run(work, range(11, 31), [observer, recorder], retry=RETRY)
        second = recorder.report.stats  # type: ignore[union-attr]
        tasks = display.tasks
        assert [(task.completed, task.total, task.fields["failed"]) for task in tasks] == [
            (10, 10, 3), (20, 20, 4),  # 3, 5, 10 fail; then 15, 20, 25, 30
        ]
        assert tasks[1].fields["retried"] == second.retried > 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("resize (ok ") for line in lines)
    assert rich_counts(lines[0]) == {"ok": first.succeeded, "failed": 3, "retried": 0}
    assert rich_counts(lines[1]) == {"ok": second.succeeded, "failed": 4,
                                     "retried": second.retried}


async def test_rich_after_a_cancel_shows_the_unfinished_items(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    recorder = Recorder()
    observer = conveyor.RichProgress(console=console(out))
    with trio.move_on_after(2.5):
        await observed_run(work, range(1, 21), [observer, recorder], workers=4)
    stats = recorder.report.stats  # type: ignore[union-attr]
    assert stats.unfinished == 12
    (line,) = out.getvalue().splitlines()
    assert " 20/20 " in line
    assert rich_counts(line) == {"ok": stats.succeeded, "failed": stats.failed, "retried": 0,
                                 "unfinished": 12}
    assert observer._display is None


async def test_rich_pools_at_once_share_its_display_and_it_stops_after_the_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    observer = conveyor.RichProgress(console=console(out))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: observed_run(work, range(1, 5), [observer], name="a"))
        nursery.start_soon(lambda: observed_run(work, range(1, 11), [observer], name="b",
                                                workers=2))
        await trio.sleep(3)
        assert observer._display is not None and len(observer._display.tasks) == 2
    assert observer._display is None
    lines = out.getvalue().splitlines()
    lines.sort()  # the order the two pools opened in
    assert [line.split(" ")[0] for line in lines] == ["a", "b"]
    assert " 4/4 " in lines[0] and " 10/10 " in lines[1]


def test_rich_progress_only_overrides_the_snapshot_and_the_end() -> None:
    observer = conveyor.RichProgress(console=console(io.StringIO()))
    assert [name for name in PER_ITEM if overrides(observer, name)] == []
    info = conveyor.PoolInfo(name="p", workers=1, retry_attempts=1, total=None,
                             stats=conveyor.Stats)
    feed = observer.opened(info)
    assert [name for name in PER_ITEM if overrides(feed, name)] == []
    assert overrides(feed, "snapshot") and overrides(feed, "closed")
    assert feed.snapshot_every == 0.2
    feed.closed(conveyor.Report([], [], [], conveyor.Stats(submitted=3, succeeded=3)))
    assert observer._display is None


async def test_rich_unknown_total_becomes_the_settled_count_at_the_end() -> None:
    out = io.StringIO()
    observer = conveyor.RichProgress(console=console(out), description="stream")
    info = conveyor.PoolInfo(name="p", workers=1, retry_attempts=1, total=None,
                             stats=conveyor.Stats)
    feed = observer.opened(info)
    feed.snapshot(conveyor.Stats(submitted=9, succeeded=2))
    feed.closed(conveyor.Report([], [], [], conveyor.Stats(submitted=9, succeeded=9)))
    assert out.getvalue().startswith("stream (ok 9, failed 0, retried 0) ")
    assert " 100% " in out.getvalue() and " 9/9 " in out.getvalue()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("display",), {}, TypeError,
         r"^RichProgress: progress='display' is not valid: expected a rich\.progress\.Progress, "
         r"or None \(a display made here\); e\.g\. progress=None$"),
        ((), {"description": 5}, TypeError,
         r"^RichProgress: description=5 is not valid: expected a str, or None"),
        ((), {"console": sys.stderr}, TypeError,
         r"^RichProgress: console=<.* is not valid: expected a rich\.console\.Console, or None"),
        ((), {"interval": -1}, ValueError,
         r"^RichProgress: interval=-1 is not valid: expected a finite number of seconds > 0"),
        ((), {"interval": "1"}, TypeError, r"^RichProgress: interval='1' is not valid"),
        ((), {"interval": None}, TypeError, r"^RichProgress: interval=None is not valid"),
    ],
)
def test_rich_progress_refuses_bad_input_at_the_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        conveyor.RichProgress(*args, **kwargs)


def test_a_console_goes_on_your_own_display_as_the_message_says() -> None:
    out = io.StringIO()
    with pytest.raises(TypeError, match=r"^RichProgress: console=.* is not valid: expected "
                                        r"None when a progress is given \(it has its own "
                                        r"console: Progress\(console=\.\.\.\)\)"):
        conveyor.RichProgress(RichDisplay(), console=console(out))
    conveyor.RichProgress(RichDisplay(console=console(out)))  # the advice


# --- the optional extra ------------------------------------------------------------------


@pytest.mark.parametrize(("make", "package"), [(conveyor.TqdmProgress, "tqdm"),
                                               (conveyor.RichProgress, "rich")])
def test_without_the_package_the_error_names_the_extra(
    make: Callable[[], object], package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in [name for name in sys.modules if name.partition(".")[0] == package]:
        monkeypatch.setitem(sys.modules, module, None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, package, None)  # type: ignore[arg-type]
    with pytest.raises(ImportError, match=(
        rf"^conveyor\.{make.__name__} needs {package}, which is not installed: "  # type: ignore[attr-defined]
        rf"pip install 'conveyor\[bars\]' \(or pip install {package}\)$"
    )):
        make()


def test_the_bars_extra_installs_both_and_dev_has_them() -> None:
    """The advice, ``pip install 'conveyor[bars]'``: the extra exists and brings both."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra in ("bars", "dev"):
        names = {re.split(r"[<>=\[ ;]", requirement)[0] for requirement in extras[extra]}
        assert {"tqdm", "rich"} <= names, extra


def test_importing_conveyor_imports_neither() -> None:
    import subprocess

    code = "import sys, conveyor; print('tqdm' in sys.modules, 'rich' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_readme_shows_what_the_bars_show() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    info = conveyor.PoolInfo(name="pool", workers=4, retry_attempts=2, total=40,
                             stats=conveyor.Stats)
    final = conveyor.Report([], [], [], conveyor.Stats(submitted=40, succeeded=32, failed=8,
                                                       retried=13))
    out = io.StringIO()
    with tqdm(desc="fetch", file=out) as bar:
        conveyor.TqdmProgress(bar).opened(info).closed(final)
        frame = last_frame(out.getvalue())
    shown = re.sub(r"\[.*, ok=", "[00:04<00:00, 9.41it/s, ok=", frame)  # the rate: wall time
    assert "\n" + shown + "\n" in readme
    out = io.StringIO()
    with RichDisplay(console=console(out)) as display:
        conveyor.RichProgress(display, description="fetch").opened(info).closed(final)
    line = out.getvalue().rstrip("\n")
    assert line.startswith("fetch (ok 32, failed 8, retried 13) ━")
    assert line.endswith(" 100% 0:00:00")
    assert "\nfetch (ok 32, failed 8, retried 13) ━" in readme
    assert "━ 100% 0:00:00\n" in readme
