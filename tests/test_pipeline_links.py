"""Pipelines as linked engines: what the direct hand-off between stages promises.

A worker hands its value straight into the next stage (docs/design.md, "How it is built"):
the item keeps its place in its stage until it is handed on (the bound of ``stage()``'s
docstring), stage observers are still told of every success, a stopped next stage makes a
finished item ``Unfinished`` there with no attempt, and the batching stage's split retries
its parts by the policy. Time is virtual (``autojump_clock``).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor import Batch, Failed, Retry, Succeeded, Unfinished
from conveyor._batch import Collector


class _Counts(conveyor.Observer):
    """Per pool: the successes, failures and unfinished items it was told of."""

    def __init__(self) -> None:
        self.told: dict[str, dict[str, int]] = {}

    def opened(self, info: conveyor.PoolInfo) -> conveyor.Observer:
        counts = self.told.setdefault(info.name, {"succeeded": 0, "failed": 0, "unfinished": 0})

        class Mine(conveyor.Observer):
            def succeeded(self, record: Succeeded[Any]) -> None:
                counts["succeeded"] += 1

            def failed(self, record: Failed) -> None:
                counts["failed"] += 1

            def unfinished(self, record: Unfinished) -> None:
                counts["unfinished"] += 1

        return Mine()


async def _odd_fails(x: int) -> int:
    await trio.sleep(0.01)
    if x % 2:
        raise ValueError(x)
    return x


async def _slow(x: int) -> int:
    await trio.sleep(1)
    return x


@pytest.mark.parametrize("form", ["run", "map", "bare", "open"])
async def test_stage_observers_are_told_every_item_of_their_stage(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    counts = _Counts()
    pipe = conveyor.pipeline(
        conveyor.stage(_slow, name="first", workers=3),
        conveyor.stage(_odd_fails, name="second", workers=2),
    )
    items = list(range(10))
    if form == "run":
        report = await pipe.run(items, observers=[counts])
    elif form == "map":
        stream = pipe.map(items, observers=[counts])
        async with stream as records:
            assert len([r async for r in records]) == 10
        report = stream.report()
    elif form == "bare":
        stream = pipe.map(items, observers=[counts])
        assert len([r async for r in stream]) == 10
        report = stream.report()
    else:
        async with pipe.open(observers=[counts]) as p:
            for item in items:
                await p.submit(item)
        report = p.report()
    assert counts.told["first"] == {"succeeded": 10, "failed": 0, "unfinished": 0}
    assert counts.told["second"] == {"succeeded": 5, "failed": 5, "unfinished": 0}
    for name, stats in report.stages.items():
        assert counts.told[name]["succeeded"] == stats.succeeded
        assert counts.told[name]["failed"] == stats.failed


async def test_a_full_next_stage_holds_the_item_in_its_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The item whose value cannot be handed on keeps its place: the first stage holds at
    most buffer + workers items, its waiting output included, so intake stops there."""
    gate = trio.Event()
    started: list[int] = []

    async def first(x: int) -> int:
        started.append(x)
        return x

    async def blocked(x: int) -> int:
        await gate.wait()
        return x

    pipe = conveyor.pipeline(
        conveyor.stage(first, workers=2, buffer=3),   # holds at most 5
        conveyor.stage(blocked, workers=1, buffer=0),  # holds at most 1
    )
    taken: list[int] = []

    def items() -> Any:
        for i in range(100):
            taken.append(i)
            yield i

    async with trio.open_nursery() as nursery:
        report: list[conveyor.Report] = []

        async def run() -> None:
            report.append(await pipe.run(items()))

        nursery.start_soon(run)
        await trio.sleep(10)
        # 1 in the blocked stage; 5 in the first: its 2 workers done and waiting to hand
        # their values on (so they start nothing more), 3 queued behind them.
        assert len(started) == 1 + 2
        assert len(taken) == 1 + 5
        gate.set()
    assert len(report[0].succeeded) == 100


async def test_a_value_finished_during_the_drain_is_unfinished_in_the_next_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def next_stage(x: int) -> int:  # pragma: no cover - never started
        raise AssertionError("started after the stop")

    pipe = conveyor.pipeline(
        conveyor.stage(_slow, name="slow", workers=2),
        conveyor.stage(next_stage, name="after", workers=2),
    )
    async with pipe.open(drain=5) as p:
        await p.submit(1)
        await p.submit(2)
        await trio.sleep(0.5)
        p.stop()
    report = p.report()
    assert sorted(r.item for r in report.unfinished) == [1, 2]
    for record in report.unfinished:
        assert (record.stage, record.stage_item, record.attempts) == ("after", record.item, 0)
    assert report.stages["slow"].succeeded == 2
    assert report.stages["after"].unfinished == 2
    assert report.stages["after"].attempts == 0


async def test_split_parts_are_retried_by_the_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A poison row (a 400, not retried) splits the batch; a part that then meets a 503
    (retried) is retried by the policy, so its good rows are not given up."""
    calls: list[list[int]] = []

    class Busy(Exception):
        pass

    async def score(rows: list[int]) -> list[int]:
        calls.append(list(rows))
        if 13 in rows:
            raise ValueError("400: bad row")
        if rows == [0, 1] and sum(1 for c in calls if c == [0, 1]) == 1:
            raise Busy("503")  # once, on the first part of the split
        return [r * 10 for r in rows]

    pipe = conveyor.pipeline(conveyor.stage(
        score, workers=1,
        retry=Retry(attempts=3, backoff=None, retry_on=(Busy,)),
        batch=Batch(4, max_wait=1, split=True),
    ))
    report = await pipe.run([0, 1, 13, 3])
    assert sorted(r.value for r in report.succeeded) == [0, 10, 30]
    assert [(r.item, type(r.error)) for r in report.failed] == [(13, ValueError)]
    assert calls.count([0, 1]) == 2  # the 503 retried that part


def test_collector_put_many_is_put_one_by_one() -> None:
    async def main() -> None:
        collector: Collector[int] = Collector(3, 100.0)
        collector.put_many([1, 2])
        collector.put_many([])
        collector.put_many([3, 4])
        assert await collector.take() == [1, 2, 3]
        collector.close()
        assert await collector.take() == [4]
        assert await collector.take() == []
        with pytest.raises(trio.ClosedResourceError):
            collector.put_many([5])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_put_many_wakes_a_taker_when_a_batch_fills(
    autojump_clock: trio.testing.MockClock,
) -> None:
    collector: Collector[int] = Collector(3, 100.0)
    got: list[list[int]] = []

    async def taker() -> None:
        got.append(await collector.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.sleep(1)
        collector.put_many([1])
        await trio.sleep(1)
        assert got == []  # one item: waits for more, or for max_wait
        collector.put_many([2, 3, 4])
        await trio.lowlevel.checkpoint()
    assert got == [[1, 2, 3]]
    assert trio.current_time() < 3  # woken by the full batch, not at max_wait


async def test_a_batching_first_stage_fed_in_chunks_keeps_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """map's window bounds the inputs between intake and the reader, also when the first
    stage is a batching one (fed in chunks)."""
    taken = 0

    def items() -> Any:
        nonlocal taken
        for i in range(50):
            taken += 1
            yield i

    async def fn(rows: list[int]) -> list[int]:
        return rows

    pipe = conveyor.pipeline(conveyor.stage(fn, batch=Batch(4, max_wait=0.1)))
    seen = 0
    async with pipe.map(items(), window=6) as records:
        async for _ in records:
            seen += 1
            assert taken - seen <= 6
            await trio.sleep(1)  # a slow reader
    assert seen == 50


def _index(record: Any) -> int:
    return int(record.index)


class _SourceBroke(LookupError):
    pass


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("last", [True, False])
async def test_a_batching_first_stage_keeps_every_input_taken_before_items_raises(
    autojump_clock: trio.testing.MockClock, window: int | None, last: bool,
) -> None:
    """The chunked feed of a batching first stage takes inputs in one go (no window) or one
    by one (a window): the inputs taken before ``items`` raises all run and settle, each
    once; the error comes out bare; a batch that succeeds whole is settled in one pass."""
    broke = _SourceBroke("source broke")

    def items() -> Any:
        yield from range(7)
        raise broke

    async def rows(xs: list[int]) -> list[int]:
        await trio.sleep(0.5)
        return [x * 10 for x in xs]

    async def plus(x: int) -> int:
        return x + 1

    stages: list[Any] = [conveyor.stage(rows, batch=Batch(4, max_wait=0.1))]
    if not last:
        stages.append(plus)
    pipe = conveyor.pipeline(*stages)
    seen: list[Any] = []
    with pytest.raises(_SourceBroke) as caught:
        if window is None:
            await pipe.run(items(), drain=5)
        else:
            async with pipe.map(items(), window=window, drain=5) as records:
                async for record in records:
                    seen.append(record)
    assert caught.value is broke
    if window is not None:
        # map with a window: what was taken before the error is every record read
        assert sorted(r.index for r in seen) == list(range(len(seen)))
        assert all(type(r) is Succeeded for r in seen)
        assert {(r.item, r.value) for r in seen} == {
            (i, i * 10 + (0 if last else 1)) for i in range(len(seen))
        }
        assert all(r.attempts == (1 if last else 2) for r in seen)


async def test_a_batching_last_stage_settles_a_whole_batch_with_the_same_records(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The one-pass settle of a batch that succeeded whole gives the records the per-item
    way gives: item, value, attempts counted over the stages, index; a batch with a failed
    item takes the per-item way."""

    failed_once: set[int] = set()

    async def first(x: int) -> int:
        if x % 2 and x not in failed_once:
            failed_once.add(x)
            raise ValueError("once")  # retried: attempts 2 in the first stage
        return x

    calls = 0

    async def rows(xs: list[int]) -> list[Any]:
        nonlocal calls
        calls += 1
        return [ValueError(f"bad {x}") if x == 9 else x * 10 for x in xs]

    pipe = conveyor.pipeline(
        conveyor.stage(first, retry=Retry(2, retry_on=lambda e: e.args == ("once",))),
        conveyor.stage(rows, batch=Batch(5, max_wait=0.1)),
    )
    report = await pipe.run(range(12))
    got = {r.index: (r.item, r.value, r.attempts) for r in report.succeeded}
    assert sorted(got) == [i for i in range(12) if i != 9]
    assert all(got[i] == (i, i * 10, 3 if i % 2 else 2) for i in got)
    assert [(f.index, f.stage, f.stage_item, str(f.error), f.attempts)
            for f in report.failed] == [(9, "rows", 9, "bad 9", 1)]  # that stage's
    assert report.stats.succeeded == 11 and report.stats.failed == 1
    assert calls == 3


@pytest.mark.parametrize("buffer", [0, 1, 100])
async def test_a_hop_that_finds_no_room_in_the_channel_keeps_the_item_as_it_was(
    buffer: int,
) -> None:
    """A hop into a plain stage passes the Job itself on (``Engine.hand_on``). With no
    buffer, the next stage's ledger may have room while its channel has none (its worker is
    between two items): the hop then waits with the item unchanged. Values, attempts (over
    the stages, retries included) and per-stage counts come out exact."""
    tried: set[int] = set()

    async def a(x: int) -> int:
        await trio.lowlevel.checkpoint()
        if x % 7 == 0 and x not in tried:
            tried.add(x)
            raise ConnectionError("once")
        return x * 10

    async def b(y: int) -> int:
        return y + 1

    async def c(z: int) -> int:
        await trio.lowlevel.checkpoint()
        return z + 2

    pipe = conveyor.pipeline(
        conveyor.stage(a, workers=8, retry=Retry(2, retry_on=ConnectionError)),
        conveyor.stage(b, workers=1, buffer=buffer),
        conveyor.stage(c, workers=2, buffer=buffer),
    )
    report = await pipe.run(range(300))
    assert not report.failed and not report.unfinished
    got = {r.index: (r.item, r.value, r.attempts) for r in report.succeeded}
    assert got == {x: (x, x * 10 + 3, 4 if x % 7 == 0 else 3) for x in range(300)}
    stages = report.stages
    assert stages is not None
    assert [(s.submitted, s.succeeded, s.attempts) for s in stages.values()] == [
        (300, 300, 343), (300, 300, 300), (300, 300, 300),
    ]


@pytest.mark.parametrize("size", [3, sys.maxsize + 1])
async def test_a_batching_first_stage_fed_in_several_chunks_keeps_order_and_every_input(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, size: int,
) -> None:
    """The chunked feed takes at most a chunk of inputs at a time, whatever room the stage
    has: a batch size beyond ``sys.maxsize`` (room without bound) is accepted at the call
    and runs; inputs past the first chunk keep their index and go in batches in order."""
    monkeypatch.setattr(conveyor._pipeline, "_CHUNK", 4)
    sizes: list[int] = []

    batches: list[list[int]] = []

    async def rows(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        batches.append(list(xs))
        await trio.sleep(0.01)
        return [x * 10 for x in xs]

    pipe = conveyor.pipeline(conveyor.stage(rows, batch=Batch(size, max_wait=0.1)))
    report = await pipe.run(range(11))
    assert sorted((r.index, r.item, r.value) for r in report.succeeded) == [
        (i, i, i * 10) for i in range(11)
    ]
    assert sum(sizes) == 11 and report.stats.succeeded == 11
    assert sorted(x for b in batches for x in b) == list(range(11))
    if size == 3:
        assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("buffer", [None, 0])
async def test_a_plain_first_stage_fed_in_chunks_settles_every_input_taken_before_items_raises(
    autojump_clock: trio.testing.MockClock, buffer: int | None, window: int | None,
) -> None:
    """The chunked feed of a plain first stage (Engine.hand_in_many) takes what its ledger,
    its channel and the window have room for; with ``buffer=0`` the ledger can have room
    while the channel has none, and an input goes in the per-input way. Every input taken
    before ``items`` raises has exactly one record, at its own index; the error comes out
    bare."""
    broke = _SourceBroke("source broke")

    def items() -> Any:
        yield from range(300)
        raise broke

    async def a(x: int) -> int:
        await trio.sleep(0.01)
        return x * 2

    async def b(y: int) -> int:
        return y + 1

    pipe = conveyor.pipeline(conveyor.stage(a, workers=4, buffer=buffer), b)
    seen: list[Any] = []
    stream = pipe.map(items(), window=window, drain=5)
    with pytest.raises(_SourceBroke) as caught:
        async with stream as records:
            async for record in records:
                seen.append(record)
    assert caught.value is broke
    report = stream.report()  # what was not read
    every = [*seen, *report.succeeded, *report.failed, *report.unfinished]
    every = list({id(r): r for r in every}.values())  # the report keeps what failed
    assert sorted(r.index for r in every) == list(range(300))  # every input, once
    assert all(r.item == r.index for r in every)
    done = [r for r in every if type(r) is Succeeded]
    assert done and all(r.value == r.item * 2 + 1 and r.attempts == 2 for r in done)


async def test_a_plain_first_stage_fed_in_chunks_stamps_the_sampled_queue_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The chunked intake starts the queue wait of every sampled input (all of the first
    1,024, then one in 64) when it goes in: on a clock far from zero, no wait is counted
    from zero."""
    autojump_clock.jump(10_000)

    async def a(x: int) -> int:
        await trio.sleep(0.001)
        return x

    pipe = conveyor.pipeline(conveyor.stage(a, name="a", workers=2), conveyor.stage(a, name="b"))
    report = await pipe.run(range(3000))
    assert len(report.succeeded) == 3000
    stages = report.stages
    assert stages is not None
    waits = stages["a"].queue_wait
    assert waits.count > 1024
    assert waits.max is not None and 0 < waits.max < 10  # not 10,000: each was stamped


@pytest.mark.parametrize("form", ["run", "map", "map window"])
async def test_inputs_known_by_their_index_settle_as_full_inputs_do_however_they_end(
    autojump_clock: trio.testing.MockClock, form: str,
) -> None:
    """A batching first stage fed in chunks knows an input by its index until it needs
    more (docs/design.md, "An input known by its index"). Each way such an input ends in
    that stage gives the record an input with its own ``_Input`` gets: a whole-batch
    success, an item's error answer, a batch that raises as a whole; each input once."""

    whole: list[int] = []  # the batch that raises

    async def rows(xs: list[int]) -> list[Any]:
        if 13 in xs:
            whole.extend(xs)
            raise ZeroDivisionError("the whole batch")
        return [ValueError(f"bad {x}") if x == 5 else x * 10 for x in xs]

    pipe = conveyor.pipeline(conveyor.stage(rows, batch=Batch(4, max_wait=0.1)))
    got: list[Any] = []
    if form == "run":
        report = await pipe.run(range(16))
    else:
        stream = pipe.map(range(16), window=3 if form == "map window" else None)
        async with stream as reading:
            got.extend([record async for record in reading])
        report = stream.report()
        # map hands out failures too; the report keeps them all
        assert sorted(report.failed, key=_index) == [r for r in got if type(r) is Failed]
    records: list[Any] = [*got, *report.succeeded, *report.unfinished]
    if form == "run":
        records += report.failed
    assert sorted(r.index for r in records) == list(range(16))
    assert not report.unfinished
    assert 13 in whole and 5 not in whole
    for r in records:
        assert r.item == r.index and r.attempts == 1
        if r.index == 5:
            assert (type(r), r.stage, r.stage_item, str(r.error)) == (Failed, "rows", 5, "bad 5")
        elif r.index in whole:
            assert (type(r), r.stage, r.stage_item) == (Failed, "rows", r.index)
            assert type(r.error) is ZeroDivisionError
        else:
            assert (type(r), r.value) == (Succeeded, r.index * 10)
    failed = 1 + len(whole)
    assert (report.stats.succeeded, report.stats.failed) == (16 - failed, failed)
    assert (report.stages["rows"].succeeded, report.stages["rows"].failed) == (16 - failed, failed)


@pytest.mark.parametrize("window", [None, 8])
async def test_inputs_known_by_their_index_left_by_a_stop_are_unfinished_where_they_were(
    autojump_clock: trio.testing.MockClock, window: int | None,
) -> None:
    """The stop finds inputs of a chunk-fed batching first stage in every place: in the
    next stage (running there, or on their way in, waiting for room) and in the batching
    stage (a batch queued, inputs in its collector). Each is Unfinished once, where it was,
    with its own item: those on their way to the next stage get their ``_Input`` once."""

    async def rows(xs: list[int]) -> list[int]:
        return [x * 10 for x in xs]

    async def after(x: int) -> int:
        await trio.sleep_forever()
        raise AssertionError("never")  # pragma: no cover

    pipe = conveyor.pipeline(
        conveyor.stage(rows, workers=1, buffer=1, batch=Batch(4, max_wait=0.1)),
        conveyor.stage(after, workers=1, buffer=0),
    )
    stream = pipe.map(range(40), window=window)
    async with stream as records:
        with trio.move_on_after(10):
            async for _ in records:  # pragma: no cover - nothing comes out
                raise AssertionError("nothing gets through `after`")
    report = stream.report()
    assert not report.succeeded and not report.failed
    unfinished = {r.index: r for r in report.unfinished}
    assert len(report.unfinished) == len(unfinished) == report.stats.submitted
    assert sorted(unfinished) == list(range(len(unfinished)))
    assert all(r.item == r.index for r in report.unfinished)
    # The first batch: 0 runs in `after` (1 attempt), 1 waits for room (no attempt),
    # 2 and 3 behind it: Unfinished in `after` with the value rows gave them.
    for i in range(4):
        r = unfinished[i]
        assert (r.stage, r.stage_item, r.attempts) == ("after", i * 10, 1 if i == 0 else 0)
    # The rest never left the batching stage: Unfinished there with the input as it
    # entered it.
    assert len(unfinished) > 4
    for i in range(4, len(unfinished)):
        r = unfinished[i]
        assert (r.stage, r.stage_item) == ("rows", i)
    assert report.stages["after"].unfinished == 4


@pytest.mark.parametrize("form", ["run", "map", "open"])
@pytest.mark.parametrize("last", ["plain, full", "batching", "fan-out"])
async def test_attempts_count_every_stage_however_the_input_goes_on(
    autojump_clock: trio.testing.MockClock, form: str, last: str,
) -> None:
    """A Succeeded record's attempts are those of every stage, whichever way the input
    went from stage to stage: the Job going on between two plain stages (its attempts
    carried as ``Job.prior``), the wait for room in a full stage (``pass_on``), into a
    batching stage, out of a fan-out; for inputs fed in chunks (known by their index) and
    submitted one by one. Stages 0 and 1 fail each item's first attempt (retried): 2 + 2,
    plus the last stage's 1."""
    tried: set[tuple[str, int]] = set()

    def flaky(name: str) -> Any:
        async def fn(x: int) -> int:
            if (name, x) not in tried:
                tried.add((name, x))
                raise ValueError("once")
            return x

        return fn

    async def slow(x: int) -> int:
        await trio.sleep(1)  # stage 1's successes wait for room here (pass_on)
        return x

    async def rows(xs: list[int]) -> list[int]:
        return xs

    async def fan(x: int) -> Any:
        yield x

    retry = Retry(2, retry_on=lambda e: e.args == ("once",), backoff=None)
    final: Any = {
        "plain, full": conveyor.stage(slow, name="last", workers=1, buffer=0),
        "batching": conveyor.stage(rows, name="last", batch=Batch(3, max_wait=0.1)),
        "fan-out": conveyor.stage(fan, name="last"),
    }[last]
    pipe = conveyor.pipeline(
        conveyor.stage(flaky("a"), name="a", workers=2, retry=retry),
        conveyor.stage(flaky("b"), name="b", workers=2, buffer=4, retry=retry),
        final,
    )
    n = 10
    got: list[Any] = []
    if form == "run":
        got = list((await pipe.run(range(n))).succeeded)
    elif form == "map":
        async with pipe.map(range(n)) as records:
            got = [record async for record in records]
    else:
        async with pipe.open() as p:
            for i in range(n):
                await p.submit(i)
            p.close()
            got = [record async for record in p.results()]
    assert sorted(r.index for r in got) == list(range(n))
    assert all(type(r) is Succeeded for r in got)
    assert [r.attempts for r in got] == [5] * n
    assert all(r.value == (r.item if last != "fan-out" else [r.item]) for r in got)
