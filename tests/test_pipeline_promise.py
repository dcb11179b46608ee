"""The pipeline's documented promises, each checked in every way in that applies.

The ways in: ``await pipe.run(items)`` ("run"), ``async with pipe.map(items) as records``
("map_with"), the bare ``async for record in pipe.map(items)`` ("map_bare") and
``async with pipe.open() as p`` fed by hand ("open"). Only the public API is used and only
what README.md ("Pipelines"), docs/design.md ("## Pipelines") and the docstrings of
``conveyor.stage``/``pipeline``/``Pipeline``/``PipelineRun`` say is asserted, so these tests
hold across a rewrite of the pipeline's insides. Time is virtual (``autojump_clock``): every
duration here is exact.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import aclosing
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor import Batch, Failed, Record, Report, Retry, Succeeded, Unfinished

FORMS = ("run", "map_with", "map_bare", "open")
STREAMS = ("map_with", "map_bare", "open")  # the forms that hand records out as they settle

Items = Iterable[Any] | AsyncIterable[Any]


# ------------------------------------------------------------------ helpers


async def through(
    pipe: conveyor.Pipeline,
    items: Items,
    form: str,
    *,
    drain: float = 0.0,
    ordered: bool = False,
    window: int | None = None,
    observers: Sequence[conveyor.Observer] = (),
) -> tuple[list[Record], Report]:
    """Run ``pipe`` over ``items`` to its end in ``form``: (records handed out, report)."""
    seen: list[Record] = []
    if form == "run":
        return seen, await pipe.run(items, drain=drain, observers=observers)
    if form in ("map_with", "map_bare"):
        stream = pipe.map(items, drain=drain, ordered=ordered, window=window,
                          observers=observers)
        if form == "map_with":
            async with stream as records:
                async for record in records:
                    seen.append(record)
        else:
            async for record in stream:
                seen.append(record)
        return seen, stream.report()
    assert form == "open"
    async with pipe.open(drain=drain, observers=observers) as p, trio.open_nursery() as nursery:

        async def feed() -> None:
            await submit_all(p.submit, items)
            p.close()

        nursery.start_soon(feed)
        async for record in p.results():
            seen.append(record)
    return seen, p.report()


async def submit_all(submit: Callable[[Any], Awaitable[None]], items: Items) -> None:
    """``submit`` each of ``items``, from a plain or an async iterable."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            await submit(item)
    else:
        for item in items:
            await submit(item)


def every_record(seen: list[Record], report: Report) -> list[Record]:
    """The records handed out and those of the report, each once (a failure is in both)."""
    records = [*seen, *report.succeeded, *report.failed, *report.unfinished]
    return list({id(r): r for r in records}.values())


def check_ledger(records: list[Record], inputs: Sequence[Any], report: Report) -> None:
    """Every input taken ends as exactly one record, with the input as its item; the counts
    of the pipeline and of each stage add up."""
    taken = report.stats.submitted
    indexes = Counter(r.index for r in records)
    assert sorted(indexes) == list(range(taken)), indexes
    assert all(count == 1 for count in indexes.values()), indexes
    for r in records:
        assert r.item == inputs[r.index], r
    s = report.stats
    assert s.submitted == s.succeeded + s.failed + s.unfinished
    assert (s.succeeded, s.failed, s.unfinished) == (
        sum(type(r) is Succeeded for r in records),
        sum(type(r) is Failed for r in records),
        sum(type(r) is Unfinished for r in records),
    )
    for name, stats in report.stages.items():
        assert stats.submitted == stats.succeeded + stats.failed + stats.unfinished, (name, stats)


def by_item(records: list[Record]) -> dict[Any, Record]:
    return {r.item: r for r in records}


# ------------------------------------------------------------------ stop, drain


@pytest.mark.parametrize("form", STREAMS)
async def test_an_item_that_finishes_a_stage_during_the_drain_is_not_started_in_the_next(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    """design.md, Stop, cancel, drain: "An item that finishes a stage during the drain is not
    started in the next one (that stage is stopped too): it is Unfinished there, with
    attempts 0." Stopped at t=0 by leaving the loop (map) or p.stop(drain=2) (open)."""
    started_a: list[int] = []
    called_b: list[int] = []

    async def a(x: int) -> int:
        started_a.append(x)
        await trio.sleep(0 if x == 0 else 1)
        if x == 2:
            raise ConnectionError("fails during the drain")  # not retried: Unfinished in a
        return x * 10

    async def b(y: int) -> int:
        called_b.append(y)
        return y + 1

    pipe = conveyor.pipeline(
        conveyor.stage(a, workers=3, retry=Retry(attempts=3, backoff=None)),
        conveyor.stage(b, workers=3),
    )
    items = list(range(6))
    seen: list[Record] = []
    if form == "open":
        async with pipe.open() as p:
            for i in items:
                await p.submit(i)
            async for record in p.results():
                seen.append(record)
                p.stop(drain=2)
        report = p.report()
        assert trio.current_time() == 1  # the drain ended when the last attempt did
    else:
        stream = pipe.map(items, drain=2)
        if form == "map_with":
            async with stream as records:
                async for record in records:
                    seen.append(record)
                    break
            assert trio.current_time() == 1
        else:
            async for record in stream:
                seen.append(record)
                break
            await trio.sleep(10)  # the bare loop's run ends on its own
        report = stream.report()
    records = every_record(seen, report)
    check_ledger(records, items, report)
    assert [(r.item, r.value) for r in seen] == [(0, 1)]
    assert called_b == [0]  # nothing that finished a during the drain was started in b
    assert {1, 2} <= set(started_a)  # running when the stop came
    got = by_item(records)
    for x in items[1:]:
        r = got[x]
        assert isinstance(r, Unfinished), r
        if x == 2:  # failed during the drain: not retried, its error kept
            assert (r.stage, r.stage_item, r.attempts) == ("a", 2, 1)
            assert isinstance(r.last_error, ConnectionError)
        elif x in started_a:  # finished a during the drain: Unfinished in b, never run there
            assert (r.stage, r.stage_item, r.attempts, r.last_error) == ("b", x * 10, 0, None)
        else:  # queued in a: never started
            assert (r.stage, r.stage_item, r.attempts, r.last_error) == ("a", x, 0, None)
    assert report.stages["b"].submitted == len(started_a) - 1  # 0, and those drained out of a
    assert report.stages["b"].unfinished == len(started_a) - 2


async def test_a_cancelled_run_drains_and_starts_nothing_in_the_next_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same promise through ``run``: an outside cancel at t=0.5 gives the running
    attempts of a their ``drain``, and what finishes then is not started in b."""
    called_b: list[int] = []
    finished_a: list[int] = []

    async def a(x: int) -> int:
        await trio.sleep(0 if x == 0 else 1)
        finished_a.append(x)
        return x * 10

    async def b(y: int) -> int:
        called_b.append(y)
        return y + 1

    pipe = conveyor.pipeline(conveyor.stage(a, workers=3), conveyor.stage(b, workers=3))
    with trio.move_on_after(0.5) as scope:
        await pipe.run(range(6), drain=2)
    assert scope.cancelled_caught
    assert trio.current_time() == 1  # drained: the attempts of a finished at 1
    assert {1, 2} <= set(finished_a)
    assert called_b == [0]


@pytest.mark.parametrize(("first", "second", "ends_at"), [
    (5, None, 6),    # the drain: attempts cut at 1 + 5
    (5, 1, 3),       # a second stop during the drain shortens it: 2 + 1
    (5, 100, 6),     # ... and cannot lengthen it
    (20, None, 10),  # long enough: a's attempts finish at 10, and b starts none of them
])
async def test_a_stop_during_the_drain_can_only_shorten_it(
    first: float, second: float | None, ends_at: float, autojump_clock: trio.testing.MockClock
) -> None:
    """PipelineRun.stop: every stage stops "as conveyor.Pool.stop does", which says "Calling
    it again can only shorten the grace"; running attempts get ``drain`` seconds, "then they
    are cancelled"."""
    called_b: list[int] = []

    async def a(x: int) -> int:
        await trio.sleep(10)
        return x

    async def b(x: int) -> int:
        called_b.append(x)
        return x

    pipe = conveyor.pipeline(conveyor.stage(a, workers=2), b)
    async with pipe.open() as p:
        for i in range(4):
            await p.submit(i)
        await trio.sleep(1)
        p.stop(drain=first)
        if second is not None:
            await trio.sleep(1)
            p.stop(drain=second)
        seen = [r async for r in p.results()]
    assert trio.current_time() == ends_at
    report = p.report()
    check_ledger(every_record(seen, report), [0, 1, 2, 3], report)
    assert seen == [] and called_b == []
    got = {(r.item, r.stage, r.attempts) for r in report.unfinished}
    if ends_at == 10:  # finished a during the drain: Unfinished in b, not started there
        assert got == {(0, "b", 0), (1, "b", 0), (2, "a", 0), (3, "a", 0)}
    else:  # cut in a by the end of the drain
        assert got == {(0, "a", 1), (1, "a", 1), (2, "a", 0), (3, "a", 0)}


# ------------------------------------------------------------------ intake


def counting(pulled: list[int]) -> Iterator[int]:
    for i in itertools.count():
        pulled.append(i)
        yield i


async def acounting(pulled: list[int]) -> AsyncIterator[int]:
    for i in itertools.count():
        await trio.sleep(0.25)
        pulled.append(i)
        yield i


@pytest.mark.parametrize("source", ["sync", "async"])
@pytest.mark.parametrize("form", FORMS)
async def test_a_stop_stops_intake_at_the_first_stage(
    form: str, source: str, autojump_clock: trio.testing.MockClock
) -> None:
    """design.md: "intake stops at the first stage (no input is taken any more)", and
    "Every input taken is in the ledger". An endless source: after the stop it is not read
    any more, and every item it gave (an async source's included) has its record."""
    pulled: list[int] = []
    calls: list[int] = []

    async def a(x: int) -> int:
        calls.append(x)
        await trio.sleep(1)
        return x

    async def b(x: int) -> int:
        return x

    pipe = conveyor.pipeline(conveyor.stage(a, workers=2, buffer=1), b)
    items: Items = counting(pulled) if source == "sync" else acounting(pulled)
    seen: list[Record] = []
    report: Report | None = None
    submitted = 0
    if form == "run":
        with trio.move_on_after(3.5):
            await pipe.run(items)
    elif form == "open":
        async with pipe.open() as p:

            async def feed() -> None:
                nonlocal submitted
                with pytest.raises(trio.ClosedResourceError):
                    if isinstance(items, AsyncIterator):
                        async with aclosing(items) as source:
                            async for item in source:
                                await p.submit(item)
                                submitted += 1
                    else:
                        for item in items:
                            await p.submit(item)
                            submitted += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                async for record in p.results():
                    seen.append(record)
                    if trio.current_time() >= 3:
                        p.stop()
        report = p.report()
    else:
        stream = pipe.map(items)
        if form == "map_with":
            async with stream as records:
                async for record in records:
                    seen.append(record)
                    if trio.current_time() >= 3:
                        break
        else:
            async for record in stream:
                seen.append(record)
                if trio.current_time() >= 3:
                    break
    pulled_then, calls_then = len(pulled), len(calls)
    await trio.sleep(20)
    if form in ("map_with", "map_bare"):
        report = stream.report()  # complete once it has ended (the bare loop's: by now)
    assert (len(pulled), len(calls)) == (pulled_then, calls_then)  # nothing read or run since
    assert 0 < len(pulled) < 20
    if report is None:
        return  # run: a stopped run returns no value (use open for the account)
    records = every_record(seen, report)
    check_ledger(records, list(range(len(pulled))), report)
    if form == "open":
        # the item whose submit() was refused was not accepted; every other one is in
        assert report.stats.submitted == submitted == len(pulled) - 1
    else:
        assert report.stats.submitted == len(pulled)  # every item taken from items


# ------------------------------------------------------------------ backpressure


async def _stuck(form: str, batching: bool) -> tuple[Counter[str], int, tuple[int, int, int]]:
    """Three stages, the last stuck for good, fed from an endless source until t=100: the
    number of items each stage's fn was called with, the number pulled, the capacities. The
    middle stage is a plain one (workers=1, buffer=2) or a batching one (Batch(2), workers=1,
    default buffer: 1 batch)."""
    pulled: list[int] = []
    calls: Counter[str] = Counter()

    async def a(x: int) -> int:
        calls["a"] += 1
        await trio.sleep(0.1)
        return x

    async def b(x: int) -> int:
        calls["b"] += 1
        await trio.sleep(0.1)
        return x

    async def b_batch(batch: list[int]) -> list[int]:
        calls["b"] += len(batch)
        await trio.sleep(0.1)
        return batch

    async def c(x: int) -> int:
        calls["c"] += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    middle = (
        conveyor.stage(b_batch, name="b", workers=1, batch=Batch(2, max_wait=0.1)) if batching
        else conveyor.stage(b, workers=1, buffer=2)
    )
    pipe = conveyor.pipeline(
        conveyor.stage(a, workers=2, buffer=1), middle, conveyor.stage(c, workers=1, buffer=0)
    )
    with trio.move_on_after(100):
        if form == "open":
            async with pipe.open() as p:
                for item in counting(pulled):
                    await p.submit(item)
        else:
            await through(pipe, counting(pulled), form)
    # buffer + workers; a batching stage: (buffer + workers) batches and one being filled
    cap_b = (1 + 1 + 1) * 2 if batching else 2 + 1
    return calls, len(pulled), (1 + 2, cap_b, 0 + 1)


@pytest.mark.parametrize("batching", [False, True], ids=["plain", "batching"])
@pytest.mark.parametrize("form", FORMS)
async def test_a_blocked_last_stage_bounds_every_stage_before_it(
    form: str, batching: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """stage(): "The stage holds at most ``buffer + workers`` items, its output not yet taken
    by the next stage included (with ``batch``: that many batches, plus one being filled)";
    design.md, Backpressure: "memory is bounded by the sum of the stages' bounds". With the
    last stage stuck, count the items each stage's fn got: each is still in its stage or in
    a later one. (Before the linked stages, an item between two stages was counted in
    neither: b's fn got cap_b + cap_c + 1 items, a's cap_a + cap_b + cap_c + 2.)"""
    calls, pulled, (cap_a, cap_b, cap_c) = await _stuck(form, batching)
    assert calls["c"] == cap_c
    assert calls["b"] <= cap_b + cap_c, calls
    assert calls["a"] <= cap_a + cap_b + cap_c, calls
    # pulled from items: in a stage, or the one refused (open: submit() raised)
    assert pulled <= cap_a + cap_b + cap_c + (form == "open"), (pulled, calls)


# ------------------------------------------------------------------ callbacks that raise


@pytest.mark.parametrize("form", FORMS)
async def test_a_stage_function_that_raises_fails_its_input_naming_the_stage(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    async def a(x: int) -> int:
        await trio.sleep(0.1)
        return x + 100

    tries: Counter[int] = Counter()

    async def b(y: int) -> int:
        tries[y] += 1
        if y == 102:
            raise ValueError("bad 102")
        return y

    async def c(y: int) -> str:
        return f"<{y}>"

    pipe = conveyor.pipeline(a, conveyor.stage(b, retry=Retry(attempts=2, backoff=None)), c)
    items = list(range(5))
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    got = by_item(records)
    failed = got[2]
    assert isinstance(failed, Failed)
    assert (failed.stage, failed.stage_item, failed.attempts, failed.index) == ("b", 102, 2, 2)
    assert isinstance(failed.error, ValueError) and "ValueError: bad 102" in failed.traceback
    assert tries[102] == 2
    assert {x: r.value for x, r in got.items() if x != 2} == {x: f"<{x + 100}>" for x in
                                                               (0, 1, 3, 4)}
    if form != "run":
        assert failed in seen  # a failure is handed out as it settles
    assert report.stages["b"].failed == 1 and report.stages["c"].submitted == 4


@pytest.mark.parametrize("form", FORMS)
async def test_a_fan_out_that_raises_part_way_is_retried_whole_without_duplicates(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    tries: Counter[int] = Counter()

    async def explode(x: int) -> Any:
        tries[x] += 1
        for j in range(3):
            yield (x, j)
            await trio.sleep(0.1)
            if j == 1 and x % 2 == 1 and tries[x] == 1:
                raise ConnectionError("part way, once")
            if j == 1 and x == 4:
                raise KeyError("part way, always")

    sunk: list[tuple[int, int]] = []

    async def sink(pair: tuple[int, int]) -> tuple[int, int]:
        sunk.append(pair)
        return pair

    pipe = conveyor.pipeline(conveyor.stage(explode, retry=Retry(attempts=2, backoff=None)),
                             sink)
    items = list(range(6))
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    good = [x for x in items if x != 4]
    assert Counter(sunk) == Counter((x, j) for x in good for j in range(3))  # each once
    got = by_item(records)
    for x in good:
        r = got[x]
        assert isinstance(r, Succeeded)
        assert sorted(r.value) == [(x, 0), (x, 1), (x, 2)]
        assert r.attempts == tries[x] + 3  # explode's attempts, and one sink per output
    failed = got[4]
    assert isinstance(failed, Failed)
    assert (failed.stage, failed.stage_item, failed.attempts) == ("explode", 4, 2)
    assert isinstance(failed.error, KeyError)
    assert report.stages["sink"].submitted == 3 * len(good)


@pytest.mark.parametrize("form", FORMS)
async def test_a_batch_function_that_raises_fails_every_item_of_its_batch(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    batches: list[list[int]] = []

    async def pre(x: int) -> int:
        await trio.sleep(0.1 * x)
        return x * 10

    async def store(batch: list[int]) -> list[int]:
        batches.append(list(batch))
        if 40 in batch:
            raise ValueError("the store refused this batch")
        return [y + 1 for y in batch]

    pipe = conveyor.pipeline(
        conveyor.stage(pre, workers=10),
        conveyor.stage(store, batch=Batch(3, max_wait=1),
                       retry=Retry(attempts=2, retry_on=ValueError, backoff=None)),
    )
    items = list(range(9))
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    bad = [b for b in batches if 40 in b]
    assert len(bad) == 2 and bad[0] == bad[1]  # retried whole by the policy, then given up
    got = by_item(records)
    for x in items:
        r = got[x]
        if x * 10 in bad[0]:
            assert isinstance(r, Failed), r
            assert (r.stage, r.stage_item, r.attempts) == ("store", x * 10, 2)
            assert isinstance(r.error, ValueError)
        else:
            assert isinstance(r, Succeeded) and r.value == x * 10 + 1, r
    stats = report.stages["store"]
    assert (stats.submitted, stats.failed) == (9, len(bad[0]))  # items, not batches


def errno_5(error: Exception) -> bool:
    return error.errno == 5  # type: ignore[attr-defined]  # a ValueError has none


@pytest.mark.parametrize("form", FORMS)
async def test_a_retry_on_predicate_that_raises_fails_the_item_with_its_own_error(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    """README, Retry: "A predicate that raises does not end the run: that item fails with its
    own error, not retried, and a note on the error (in Failed.traceback) shows what the
    predicate raised." In a stage, the record also names the stage."""
    tries: Counter[int] = Counter()

    async def a(x: int) -> int:
        return x + 100

    async def b(y: int) -> int:
        tries[y] += 1
        if y == 103:
            raise ValueError("bad 103")
        if tries[y] == 1 and y % 2:
            raise OSError(5, "I/O error")
        return y

    pipe = conveyor.pipeline(a, conveyor.stage(b, retry=Retry(attempts=3, retry_on=errno_5,
                                                                backoff=None)))
    items = list(range(5))
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    got = by_item(records)
    failed = got[3]
    assert isinstance(failed, Failed)
    assert (failed.stage, failed.stage_item, failed.attempts) == ("b", 103, 1)
    assert type(failed.error) is ValueError and str(failed.error) == "bad 103"
    (note,) = failed.error.__notes__
    assert note.startswith("conveyor: the retry_on predicate 'errno_5' raised on this error")
    assert note in failed.traceback
    assert {x: (r.value, r.attempts) for x, r in got.items() if x != 3} == {
        0: (100, 2), 1: (101, 3), 2: (102, 2), 4: (104, 2)
    }


@pytest.mark.parametrize("form", FORMS)
async def test_a_per_key_function_that_raises_fails_the_item_before_an_attempt(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    """As for a pool (tests/test_stats.py): an item whose key raises fails with that error,
    attempts 0, not retried; fn never runs for it. In a stage the record names the stage and
    the item as it entered it."""
    called: list[dict[str, Any]] = []

    async def a(x: int) -> dict[str, Any]:
        return {"x": x} if x == 2 else {"x": x, "host": f"h{x % 2}"}

    async def b(row: dict[str, Any]) -> int:
        called.append(row)
        await trio.sleep(1)
        return int(row["x"])

    pipe = conveyor.pipeline(
        a, conveyor.stage(b, retry=Retry(attempts=3), per_key=conveyor.PerKey(
            lambda row: row["host"], limit=1)),
    )
    items = list(range(5))
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    failed = by_item(records)[2]
    assert isinstance(failed, Failed)
    assert (failed.stage, failed.stage_item, failed.attempts) == ("b", {"x": 2}, 0)
    assert isinstance(failed.error, KeyError)
    assert sorted(r["x"] for r in called) == [0, 1, 3, 4]
    assert sorted(r.value for r in records if isinstance(r, Succeeded)) == [0, 1, 3, 4]
    assert trio.current_time() == 2  # per key at most one at a time: two rounds of 1 s


class RaisingEverywhere(conveyor.Observer):
    """Raises in every event it can get (its `opened` keeps the default)."""

    snapshot_every = 0.5

    def __init__(self) -> None:
        self.calls = 0

    def _boom(self) -> None:
        self.calls += 1
        raise RuntimeError("observer broke")

    def attempt_started(self, attempt: conveyor.Attempt) -> None:
        self._boom()

    def attempt_ended(
        self, attempt: conveyor.Attempt, error: BaseException | None, duration: float
    ) -> None:
        self._boom()

    def retry_scheduled(self, attempt: conveyor.Attempt, error: Exception, delay: float) -> None:
        self._boom()

    def succeeded(self, record: Succeeded[Any]) -> None:
        self._boom()

    def failed(self, record: Failed) -> None:
        self._boom()

    def unfinished(self, record: Unfinished) -> None:
        self._boom()

    def snapshot(self, stats: conveyor.Stats) -> None:
        self._boom()

    def closed(self, report: Report) -> None:
        self._boom()


class RaisingWhenOpened(conveyor.Observer):
    """Raises in `opened` (not said by the docs; a single pool logs it and runs on)."""

    def opened(self, info: conveyor.PoolInfo) -> conveyor.Observer | None:
        raise RuntimeError("opened broke")


@pytest.mark.parametrize("where", ["events", "opened"])
@pytest.mark.parametrize("form", FORMS)
async def test_an_observer_that_raises_loses_no_item(
    form: str, where: str, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README, Observers: "An exception from an observer is logged once (per observer and
    event) and otherwise ignored: no item is lost for it." Given to a pipeline, it is given
    to every stage's pool; the account is the one without it."""
    tries: Counter[int] = Counter()

    async def a(x: int) -> int:
        tries[x] += 1
        await trio.sleep(1)
        if x % 3 == 0 and tries[x] == 1:
            raise ConnectionError("once")
        return x

    async def b(x: int) -> int:
        if x == 4:
            raise ValueError("four")
        return -x

    pipe = conveyor.pipeline(conveyor.stage(a, retry=Retry(attempts=2, backoff=None)), b)
    items = list(range(8))
    raising = RaisingEverywhere() if where == "events" else RaisingWhenOpened()
    last = conveyor.LastReport()
    with caplog.at_level(logging.ERROR, logger="conveyor"):
        seen, report = await through(pipe, items, form, observers=[raising, last])
    records = every_record(seen, report)
    check_ledger(records, items, report)
    got = by_item(records)
    assert {x: r.value for x, r in got.items() if x != 4} == {x: -x for x in items if x != 4}
    assert isinstance(got[4], Failed) and got[4].stage == "b"
    if isinstance(raising, RaisingEverywhere):
        assert raising.calls > len(items)
    assert last.report is not None  # the observer after the raising one is told all the same
    logged = [r for r in caplog.records if "observer" in r.getMessage()]
    assert logged
    events = Counter(
        (r.getMessage().split(" raised in ")[1].split(" ")[0], r.getMessage()) for r in logged
    )
    assert all(n == 1 for n in events.values())  # once per observer, event (and stage)


# ------------------------------------------------------------------ per-stage counts


@pytest.mark.parametrize("form", FORMS)
async def test_stage_counts_count_each_stages_own_items(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    """design.md, The one ledger: in ``report.stages``, "a fan-out's outputs each count in the
    next stage; a batching stage counts items, not batches"; for every stage, submitted ==
    succeeded + failed + unfinished once the pipeline has ended."""

    async def spread(x: int) -> Any:
        for j in range(x % 4):  # 0..3 outputs
            await trio.sleep(0.1)
            yield x * 10 + j

    async def store(batch: list[int]) -> list[Any]:
        await trio.sleep(0.5)
        return [ValueError(y) if y % 10 == 2 else y for y in batch]

    async def last(y: int) -> int:
        if y == 21:
            raise KeyError(y)
        return y

    pipe = conveyor.pipeline(
        spread, conveyor.stage(store, batch=Batch(4, max_wait=0.3)), last
    )
    items = list(range(10))
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    outputs = [x * 10 + j for x in items for j in range(x % 4)]
    into_last = [y for y in outputs if y % 10 != 2]
    counts = {name: (s.submitted, s.succeeded, s.failed, s.unfinished)
              for name, s in report.stages.items()}
    assert counts == {
        "spread": (10, 10, 0, 0),
        "store": (len(outputs), len(into_last), len(outputs) - len(into_last), 0),
        "last": (len(into_last), len(into_last) - 1, 1, 0),
    }
    assert report.stages["store"].attempts < len(outputs)  # batches, fewer than items
    failed_inputs = {y // 10 for y in outputs if y % 10 == 2} | {2}
    assert sorted(r.item for r in records if isinstance(r, Failed)) == sorted(failed_inputs)
    s = report.stats
    assert (s.submitted, s.failed, s.unfinished) == (10, len(failed_inputs), 0)


# ------------------------------------------------------------------ records


@pytest.mark.parametrize("form", FORMS)
async def test_records_value_attempts_and_index(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    """README, One ledger: ``Succeeded.value`` is the last stage's value (with a fan-out
    stage: the list of that input's final outputs); ``attempts`` counts the attempts of every
    stage on the input and its outputs; ``index`` is the input's position."""
    tries: Counter[tuple[str, Any]] = Counter()

    async def a(x: int) -> int:
        tries[("a", x)] += 1
        await trio.sleep(0.1 * (10 - x))  # later inputs finish first
        if x % 2 and tries[("a", x)] == 1:
            raise ConnectionError("once")
        return x * 10

    async def b(y: int) -> str:
        tries[("b", y)] += 1
        if y == 30 and tries[("b", y)] < 3:
            raise ConnectionError("twice")
        return f"v{y}"

    retry = Retry(attempts=3, backoff=None)
    items = [f"in{x}" for x in range(6)]

    async def a_of(name: str) -> int:
        return await a(int(name[2:]))

    plain = conveyor.pipeline(conveyor.stage(a_of, retry=retry), conveyor.stage(b, retry=retry))
    seen, report = await through(plain, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    for r in records:
        assert isinstance(r, Succeeded)
        x = int(r.item[2:])
        assert r.index == x and r.value == f"v{x * 10}"
        assert r.attempts == tries[("a", x)] + tries[("b", x * 10)]
    assert by_item(records)["in3"].attempts == 2 + 3
    if form == "run":  # nobody read the successes: all in the report, values in input order
        assert report.values(ordered=True) == [f"v{x * 10}" for x in range(6)]
        assert [r.index for r in report.records()] == list(range(6))

    async def twice(y: int) -> Any:
        tries[("twice", y)] += 1
        yield y
        yield -y

    async def c(y: int) -> int:
        return y + 1

    tries.clear()
    fans = conveyor.pipeline(conveyor.stage(a_of, retry=retry), twice, c)
    seen, report = await through(fans, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    for r in records:
        assert isinstance(r, Succeeded)
        x = int(r.item[2:])
        assert r.index == x
        assert sorted(r.value) == sorted([x * 10 + 1, -x * 10 + 1])  # a list, also for x=0
        assert r.attempts == tries[("a", x)] + 1 + 2  # a's, twice's one, c's one per output
    if form == "run":
        assert report.values(ordered=True) == [
            by_item(records)[f"in{x}"].value for x in range(6)
        ]


@pytest.mark.parametrize("buffer", [0, 1, 2])
@pytest.mark.parametrize("form", FORMS)
async def test_a_batch_call_counts_once_for_each_of_its_items_in_attempts(
    form: str, buffer: int, autojump_clock: trio.testing.MockClock
) -> None:
    """design.md, The one ledger: ``attempts`` "counts the attempts of every stage on this
    input and its outputs (a batch call counts once for each of its items)". A batching
    stage then a plain one: every success has 1 + 1 attempts, whatever the buffers. (Before
    804062a the next stage could settle the input before the batch's attempts were added:
    1 instead of 2.)"""

    async def score(batch: list[int]) -> list[int]:
        return [x * 10 for x in batch]

    async def keep(y: int) -> int:
        return y + 1

    pipe = conveyor.pipeline(
        conveyor.stage(score, workers=1, buffer=buffer, batch=Batch(1, max_wait=1)),
        conveyor.stage(keep, workers=1, buffer=0),
    )
    items = [1, 2, 3]
    seen, report = await through(pipe, items, form)
    records = every_record(seen, report)
    check_ledger(records, items, report)
    assert sorted((r.item, r.value, r.attempts) for r in records) == [
        (1, 11, 2), (2, 21, 2), (3, 31, 2)
    ]
    assert report.stats.attempts == 6


@pytest.mark.parametrize("form", ["map_with", "map_bare"])
async def test_ordered_map_yields_in_input_order(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    async def a(x: int) -> int:
        await trio.sleep(0.1 * (20 - x))  # later inputs finish first
        return x

    async def b(x: int) -> int:
        if x == 7:
            raise ValueError(x)
        return x

    items = list(range(20))
    seen, report = await through(conveyor.pipeline(conveyor.stage(a, workers=5), b), items,
                                 form, ordered=True, window=4)
    assert [r.index for r in seen] == items
    check_ledger(every_record(seen, report), items, report)


# ------------------------------------------------------------------ an error from items


class SourceBroke(LookupError):
    pass


@pytest.mark.parametrize("source", ["sync", "async"])
@pytest.mark.parametrize("form", ["run", "map_with", "map_bare"])
async def test_an_error_from_items_is_raised_bare_once_everything_settled(
    form: str, source: str, autojump_clock: trio.testing.MockClock
) -> None:
    """design.md: "an error from items bare once everything taken has settled"; README: "(a
    map loop first gets the records that settled)". Items 0 and 1 go through both stages;
    item 2 is in a when items raises, and finishes there during the drain: Unfinished in b.
    A sync source raises before any attempt started: everything is Unfinished in a."""
    broke = SourceBroke("source broke")
    running = 0

    async def a(x: int) -> int:
        nonlocal running
        running += 1
        try:
            await trio.sleep(1)
        finally:
            running -= 1
        return x * 10

    async def b(y: int) -> int:
        return y + 1

    def sync_items() -> Iterator[int]:
        yield 0
        yield 1
        yield 2
        raise broke

    async def async_items() -> AsyncIterator[int]:
        yield 0
        yield 1
        await trio.sleep(4.5)
        yield 2
        await trio.sleep(0.5)
        raise broke

    items: Items = sync_items() if source == "sync" else async_items()
    ended_at = 0.0 if source == "sync" else 5.5  # async: item 2's attempt 4.5..5.5
    pipe = conveyor.pipeline(a, b)
    seen: list[Record] = []
    with pytest.raises(SourceBroke) as caught:
        if form == "run":
            await pipe.run(items, drain=5)
        else:
            stream = pipe.map(items, drain=5)
            if form == "map_with":
                async with stream as records:
                    async for record in records:
                        seen.append(record)
            else:
                async for record in stream:
                    seen.append(record)
    assert caught.value is broke  # bare: the very object, not in a group
    assert running == 0
    assert trio.current_time() == ended_at  # after the drain: everything had settled
    if form == "run":
        return
    report = stream.report()
    records = every_record(seen, report)
    check_ledger(records, [0, 1, 2], report)
    if source == "async":
        assert sorted((r.item, r.value) for r in seen) == [(0, 1), (1, 11)]  # before the error
    if source == "sync":
        assert {(r.stage, r.stage_item, r.attempts) for r in report.unfinished} == {
            ("a", 0, 0), ("a", 1, 0), ("a", 2, 0)
        }
        return
    [unfinished] = [r for r in records if r.item == 2]
    assert isinstance(unfinished, Unfinished)
    assert (unfinished.stage, unfinished.stage_item, unfinished.attempts) == ("b", 20, 0)


async def test_an_error_in_the_open_block_comes_out_as_raised_after_everything_settled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """open's counterpart: the caller's own exception comes out as the very object raised,
    once every stage has drained."""
    broke = SourceBroke("caller broke")
    running = 0

    async def a(x: int) -> int:
        nonlocal running
        running += 1
        try:
            await trio.sleep(1)
        finally:
            running -= 1
        return x * 10

    async def b(y: int) -> int:
        return y + 1

    with pytest.raises(SourceBroke) as caught:
        async with conveyor.pipeline(a, b).open(drain=5) as p:
            for i in range(3):
                await p.submit(i)
            await trio.sleep(0.5)  # their attempts in a have started
            raise broke
    assert caught.value is broke and running == 0
    assert trio.current_time() == 1  # drained: a's attempts finished
    report = p.report()
    check_ledger(every_record([], report), [0, 1, 2], report)
    assert {(r.stage, r.stage_item, r.attempts) for r in report.unfinished} == {
        ("b", 0, 0), ("b", 10, 0), ("b", 20, 0)
    }


# ------------------------------------------------------------------ leaving a bare loop


class Left(Exception):
    pass


async def _leave(how: str, ordered: bool) -> bool:
    """One bare loop left after its 4th record; whether a stage function was called after
    the loop was left. Checks that nothing runs afterwards and that the account adds up."""
    calls: Counter[str] = Counter()
    running = 0

    async def step(x: int) -> int:
        nonlocal running
        calls["a"] += 1
        running += 1
        try:
            await trio.sleep(1)
        finally:
            running -= 1
        return x

    async def then(x: int) -> int:
        nonlocal running
        calls["b"] += 1
        running += 1
        try:
            await trio.sleep(0.5)
        finally:
            running -= 1
        return x

    pipe = conveyor.pipeline(conveyor.stage(step, workers=3), conveyor.stage(then, workers=2))
    stream = pipe.map(range(1000), ordered=ordered)
    got = 0
    with pytest.raises(Left) if how == "raise" else _nothing():
        async for _record in stream:
            got += 1
            if got == 4:
                if how == "raise":
                    raise Left
                break
    then_calls = dict(calls)  # "stops at once" (README, map): not even at this same instant
    await trio.sleep(100)
    assert running == 0  # nothing of it still runs
    report = stream.report()
    taken = report.stats.submitted
    assert taken <= calls["a"] + 256 + 3  # intake stopped too (within the first stage's bound)
    records = every_record([], report)
    assert len(records) + got == taken
    return dict(calls) != then_calls


RUNS = 100  # trio runs a moment's tasks in a random order: one run may not show it


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
@pytest.mark.parametrize("how", ["break", "raise"])
def test_leaving_a_bare_map_loop_stops_the_pipeline(how: str, ordered: bool) -> None:
    """Pipeline.map: "Leaving the loop early stops the pipeline", and README (map): leaving
    the loop "stops the pool at once: no new attempt starts". No stage function is called
    after the loop was left, not even at that same instant, and nothing of the pipeline
    still runs. (Before 0aef486 an ordered loop left let an attempt start at that instant in
    about 1 run in 6: the stop was only scheduled.)"""
    late = sum(
        trio.run(_leave, how, ordered, clock=trio.testing.MockClock(autojump_threshold=0))
        for _ in range(RUNS)
    )
    assert late == 0, f"a stage function was called after the loop was left in {late} runs"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
