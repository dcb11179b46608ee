"""Pipelines: stages, one ledger per input, fan-out, batching, backpressure, stop, order.

Time is virtual (``autojump_clock``, or a MockClock under hypothesis): durations are exact.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor
from conveyor import Batch, Failed, Retry, Succeeded, Unfinished

EXAMPLES = int(os.environ.get("CONVEYOR_EXAMPLES", "200"))


async def double(x: int) -> int:
    await trio.sleep(0.1)
    return x * 2


async def plus_one(x: int) -> int:
    await trio.sleep(0.1)
    return x + 1


# ------------------------------------------------------------------ basics


async def test_two_stages_one_record_per_input(autojump_clock: trio.testing.MockClock) -> None:
    pipe = conveyor.pipeline(conveyor.stage(double, workers=4), plus_one)
    report = await pipe.run(range(10))
    got = sorted((r.item, r.value) for r in report.succeeded)
    assert got == [(i, 2 * i + 1) for i in range(10)]
    assert sorted(r.index for r in report.succeeded) == list(range(10))
    s = report.stats
    assert (s.submitted, s.succeeded, s.failed, s.unfinished) == (10, 10, 0, 0)
    assert s.attempts == 20
    assert list(report.stages) == ["double", "plus_one"]
    for stats in report.stages.values():
        assert (stats.submitted, stats.succeeded) == (10, 10)
    # 10 items, 4 workers then 10 workers: 3 rounds of 0.1 s, overlapped with the second stage
    assert trio.current_time() == pytest.approx(0.4)


async def test_failure_names_the_stage_and_the_item_as_it_entered() -> None:
    async def fails_on_six(x: int) -> int:
        if x == 6:
            raise ValueError("six")
        return x

    pipe = conveyor.pipeline(double, conveyor.stage(fails_on_six, retry=Retry(attempts=3,
                                                                               backoff=None)))
    report = await pipe.run([1, 3, 5])
    assert [r.item for r in report.failed] == [3]
    failed = report.failed[0]
    assert (failed.stage, failed.stage_item, failed.attempts, failed.index) == (
        "fails_on_six", 6, 3, 1
    )
    assert isinstance(failed.error, ValueError)
    assert "ValueError: six" in failed.traceback
    assert sorted(r.value for r in report.succeeded) == [2, 10]
    assert report.stages["fails_on_six"].failed == 1
    assert report.stages["double"].succeeded == 3


async def test_a_raising_fan_out_generator_is_retried_whole_without_duplicates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: Counter[int] = Counter()

    async def explode(x: int) -> Any:
        calls[x] += 1
        yield (x, 0)
        await trio.sleep(0.1)
        if x == 2 and calls[x] < 2:
            raise ConnectionError("half way")
        if x == 3:
            raise KeyError("always")
        yield (x, 1)

    seen: list[tuple[int, int]] = []

    async def sink(pair: tuple[int, int]) -> tuple[int, int]:
        seen.append(pair)
        return pair

    pipe = conveyor.pipeline(conveyor.stage(explode, retry=Retry(attempts=2, backoff=None)), sink)
    report = await pipe.run(range(4))
    assert Counter(seen) == Counter([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)])
    by_item = {r.item: r for r in (*report.succeeded, *report.failed)}
    assert sorted(by_item[2].value) == [(2, 0), (2, 1)]
    assert by_item[2].attempts == 2 + 2  # two attempts of explode, one sink per output
    failed = by_item[3]
    assert isinstance(failed, Failed)
    assert (failed.stage, failed.stage_item, failed.attempts) == ("explode", 3, 2)


async def test_fan_out_zero_outputs_is_a_success_with_no_values() -> None:
    async def nothing(x: int) -> Any:
        if False:
            yield x

    report = await conveyor.pipeline(nothing, double).run([1, 2])
    assert sorted((r.item, r.value) for r in report.succeeded) == [(1, []), (2, [])]
    assert report.stages["double"].submitted == 0


async def test_a_fan_out_branch_failing_fails_its_input_once_all_branches_settle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def three(x: int) -> Any:
        for i in range(3):
            yield x * 10 + i

    async def slow_or_bad(y: int) -> int:
        await trio.sleep(y % 10)
        if y % 10 == 0:
            raise ValueError(y)
        return y

    async with conveyor.pipeline(three, slow_or_bad).open() as p:
        await p.submit(1)
        p.close()
        records = [r async for r in p.results()]
    assert len(records) == 1 and isinstance(records[0], Failed)
    assert (records[0].stage, records[0].stage_item) == ("slow_or_bad", 10)
    # it came when the last branch (2 s) had settled, not at the failure (0 s)
    assert trio.current_time() == 2
    assert p.report().stages["slow_or_bad"].submitted == 3


# ------------------------------------------------------------------ batching


async def test_batches_by_size_or_time_exactly(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[tuple[float, list[int]]] = []

    async def store(batch: list[int]) -> list[int]:
        calls.append((trio.current_time(), batch))
        return [x * 2 for x in batch]

    arrivals = [0, 0.5, 1.0, 2.0, 6.0]

    async def arrive(x: int) -> int:
        await trio.sleep(arrivals[x])  # when each input reaches the batching stage
        return x

    pipe = conveyor.pipeline(
        conveyor.stage(arrive, workers=100),
        conveyor.stage(store, batch=Batch(3, max_wait=1.5)),
    )
    report = await pipe.run(range(5))
    assert calls == [
        (1.0, [0, 1, 2]),  # full: size 3
        (3.5, [3]),        # max_wait: 1.5 s after its first item (2.0)
        (6.0, [4]),        # the stage before ended: the batch goes at once
    ]
    assert sorted(r.value for r in report.succeeded) == [0, 2, 4, 6, 8]
    stats = report.stages["store"]
    assert (stats.submitted, stats.succeeded, stats.attempts) == (5, 5, 3)


async def test_split_isolates_the_poison_rows(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    class BadRow(ValueError):
        pass

    async def score(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if 13 in batch or 40 in batch:
            raise BadRow(f"bad row in {len(batch)}")
        return [x + 1000 for x in batch]

    pipe = conveyor.pipeline(
        conveyor.stage(score, batch=Batch(50, max_wait=5, split=True),
                       retry=Retry(attempts=3, retry_on=ConnectionError, backoff=None))
    )
    report = await pipe.run(range(50))
    assert sorted(r.item for r in report.failed) == [13, 40]
    assert all(isinstance(r.error, BadRow) and r.stage == "score" for r in report.failed)
    assert len(report.succeeded) == 48
    assert calls <= 1 + 2 * 2 * 6  # _batch's bound: 1 + 2 p ceil(log2 n)


async def test_whole_batch_failure_is_retried_by_the_policy_then_fails_every_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def flaky(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("503")
        return batch

    retry = Retry(attempts=3, backoff=None)
    report = await conveyor.pipeline(
        conveyor.stage(flaky, batch=Batch(10, max_wait=5, split=True), retry=retry)
    ).run(range(10))
    assert calls == 3 and len(report.succeeded) == 10  # retried whole, never split

    async def down(batch: list[int]) -> list[int]:
        raise ConnectionError("down")

    report = await conveyor.pipeline(
        conveyor.stage(down, batch=Batch(4, max_wait=0), retry=Retry(attempts=2, backoff=None))
    ).run(range(4))
    assert len(report.failed) == 4 and all(r.attempts == 2 for r in report.failed)


async def test_a_per_item_error_in_the_answer_fails_that_item_alone() -> None:
    async def answer(batch: list[int]) -> list[Any]:
        return [ValueError(x) if x == 2 else x for x in batch]

    report = await conveyor.pipeline(
        conveyor.stage(answer, batch=Batch(5, max_wait=0)), double
    ).run(range(5))
    assert [(r.item, r.stage) for r in report.failed] == [(2, "answer")]
    assert sorted(r.value for r in report.succeeded) == [0, 2, 6, 8]


# ------------------------------------------------------------------ backpressure, order


async def test_a_slow_last_stage_slows_the_first(autojump_clock: trio.testing.MockClock) -> None:
    started = 0
    finished = 0
    most = 0

    async def fast(x: int) -> int:
        nonlocal started, most
        started += 1
        most = max(most, started - finished)
        return x

    async def slow(x: int) -> int:
        nonlocal finished
        await trio.sleep(1)
        finished += 1
        return x

    pipe = conveyor.pipeline(
        conveyor.stage(fast, workers=2, buffer=3),
        conveyor.stage(slow, workers=1, buffer=2),
    )
    report = await pipe.run(range(100))
    assert report.stats.succeeded == 100
    # stage 1 holds <= 3 + 2, stage 2 <= 2 + 1, one in the forwarder's hand
    assert most <= (3 + 2) + (2 + 1) + 1
    assert trio.current_time() == 100


async def test_ordered_output_does_not_block_behind_a_slow_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    done_at: dict[int, float] = {}

    async def work(x: int) -> int:
        await trio.sleep(100 if x == 0 else 1)
        done_at[x] = trio.current_time()
        return x

    yielded = []
    async for record in conveyor.pipeline(conveyor.stage(work, workers=4), plus_one).map(
        range(20), ordered=True, window=10
    ):
        yielded.append(record.item)
    assert yielded == list(range(20))
    # the window (10 inputs) kept flowing behind item 0: items 1..9 were done long before it
    assert all(done_at[x] < 10 for x in range(1, 10))
    assert max(done_at[x] for x in range(10, 20)) > 100  # then it waited: the window is bounded


# ------------------------------------------------------------------ stops


def _check_ledger(records: list[Any], taken: int, report: conveyor.Report) -> None:
    indexes = Counter(r.index for r in records)
    assert sorted(indexes) == list(range(taken)), indexes
    assert all(count == 1 for count in indexes.values())
    s = report.stats
    assert s.submitted == taken == s.succeeded + s.failed + s.unfinished
    for stats in report.stages.values():
        assert stats.submitted == stats.succeeded + stats.failed + stats.unfinished


async def test_stop_from_open_drains_every_stage(autojump_clock: trio.testing.MockClock) -> None:
    running = 0

    async def step(x: int) -> int:
        nonlocal running
        running += 1
        try:
            await trio.sleep(1)
        finally:
            running -= 1
        return x

    pipe = conveyor.pipeline(conveyor.stage(step, name="a", workers=3),
                             conveyor.stage(step, name="b", workers=3))
    yielded = []
    async with pipe.open(drain=0.5) as p:
        for i in range(10):
            await p.submit(i)
        await trio.sleep(2.2)
        p.stop(drain=1.0)  # attempts running (b: 3, started at 2) finish in the grace
        with pytest.raises(trio.ClosedResourceError):
            await p.submit(99)
        yielded = [r async for r in p.results()]
    report = p.report()
    assert running == 0
    _check_ledger([*yielded, *report.failed, *report.unfinished], 10, report)
    assert {r.stage for r in report.unfinished} == {"a", "b"}
    # a finished 0-5 by t=2; b finished 0-2 by t=2, 3-5 during the drain; a's 6-8 finish at
    # 3 during the drain and are unfinished in b (never started there, attempts 0)
    assert sorted(r.item for r in yielded) == [0, 1, 2, 3, 4, 5]
    in_b = sorted((r.item, r.attempts) for r in report.unfinished if r.stage == "b")
    assert in_b == [(6, 0), (7, 0), (8, 0)]
    assert [(r.item, r.stage_item) for r in report.unfinished if r.stage == "a"] == [(9, 9)]


async def test_outside_cancel_of_open_keeps_the_account(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipe = conveyor.pipeline(conveyor.stage(double, workers=2), conveyor.stage(plus_one))
    with trio.move_on_after(0.25):
        async with pipe.open() as p:
            for i in range(10):
                await p.submit(i)
    report = p.report()
    _check_ledger([*report.succeeded, *report.failed, *report.unfinished], 10, report)
    assert len(report.succeeded) == 2  # 0, 1 went through both stages by 0.2


async def test_run_cancelled_propagates_and_leaves_nothing_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    running = 0

    async def step(x: int) -> int:
        nonlocal running
        running += 1
        try:
            await trio.sleep(1)
        finally:
            running -= 1
        return x

    with trio.move_on_after(1.5) as scope:
        await conveyor.pipeline(step, step2 := conveyor.stage(step, name="again")).run(range(50))
    assert scope.cancelled_caught and running == 0
    assert step2.name == "again"


async def test_bare_map_break_stops_and_async_with_map_break_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def step(x: int) -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return x

    pipe = conveyor.pipeline(conveyor.stage(step, workers=2), conveyor.stage(step, name="b"))
    stream = pipe.map(range(100))
    async for record in stream:
        assert isinstance(record, Succeeded)
        break
    await trio.sleep(5)
    after = calls
    await trio.sleep(5)
    assert calls == after <= 10  # stopped at t=2 (a: 0-5 started, b: 0-3): nothing more

    calls = 0
    stream = pipe.map(range(100))
    async with stream as records:
        async for record in records:  # noqa: B007 - the record is checked below
            break
    report = stream.report()
    assert calls <= 10  # as above: what started at t=2, nothing after
    _check_ledger([record, *report.succeeded, *report.failed, *report.unfinished],
                  report.stats.submitted, report)


async def test_an_error_from_items_is_raised_bare_after_everything_settled() -> None:
    def items() -> Any:
        yield 1
        yield 2
        raise LookupError("source broke")

    pipe = conveyor.pipeline(double, plus_one)
    stream = pipe.map(items())
    got = []
    with pytest.raises(LookupError, match="source broke"):
        async with stream as records:
            async for record in records:
                got.append(record)
    report = stream.report()
    assert report.stats.submitted == 2
    _check_ledger([*got, *report.failed, *report.unfinished, *report.succeeded], 2, report)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_refused_at_the_call() -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        conveyor.pipeline()
    with pytest.raises(ValueError, match="two stages are named 'double'"):
        conveyor.pipeline(double, double)
    with pytest.raises(ValueError, match="workers=0 is not valid: expected an int >= 1"):
        conveyor.stage(double, workers=0)
    with pytest.raises(TypeError, match=r"^Batch: size=True is not valid: expected an int "
                                        r">= 1; e\.g\. size=500$"):
        Batch(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^Batch: max_wait=nan is not valid: expected a "
                                         r"finite number of seconds >= 0"):
        Batch(5, max_wait=float("nan"))
    with pytest.raises(ValueError, match=r"per_key=.* is not valid: expected None on a "
                                         r"batching stage"):
        conveyor.stage(double, per_key=conveyor.PerKey(str, limit=1), batch=Batch(2))
    with pytest.raises(ValueError, match=r"^name='' is not valid: expected a non-empty str"):
        conveyor.stage(double, name="")
    pipe = conveyor.pipeline(double)
    with pytest.raises(TypeError, match="items='abc' is not valid: expected an iterable"):
        pipe.map("abc")
    with pytest.raises(ValueError, match=r"^window=0 is not valid: expected an int >= 1"):
        pipe.map([1], window=0)
    with pytest.raises(ValueError, match="drain=-1 is not valid"):
        pipe.open(drain=-1)
    with pytest.raises(ValueError, match=r"batch=.* is not valid: expected None for "
                                         r"'_fan', an async generator"):
        conveyor.stage(_fan, batch=Batch(2))
    # the suggested fixes work: distinct names; the per-key limit on a stage of its own
    conveyor.pipeline(double, conveyor.stage(double, name="double again"))
    conveyor.pipeline(conveyor.stage(double, per_key=conveyor.PerKey(str, limit=1)),
                      conveyor.stage(_answer, batch=Batch(2)))


async def _fan(x: int) -> Any:
    yield x


async def _answer(batch: list[int]) -> list[int]:
    return batch


async def test_a_batch_answer_of_the_wrong_length_fails_every_item_once() -> None:
    calls = 0

    async def short(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        return batch[:-1]

    report = await conveyor.pipeline(
        conveyor.stage(short, batch=Batch(3, max_wait=5), retry=Retry(attempts=3))
    ).run([1, 2, 3])
    assert calls == 1  # a bug in the batch function: not retried
    assert sorted(r.item for r in report.failed) == [1, 2, 3]
    assert all("returned 2 values for a batch of 3" in str(r.error) for r in report.failed)


# ------------------------------------------------------------------ the property


@st.composite
def pipelines(draw: st.DrawFn) -> dict[str, Any]:
    stages = draw(st.lists(st.fixed_dictionaries({
        "workers": st.integers(1, 3),
        "buffer": st.integers(0, 3),
        "fan": st.integers(-1, 2),          # -1: one output; n: (sum % (n + 1)) outputs
        "attempts": st.integers(1, 3),
        "transient": st.integers(0, 9),     # of 10 branches, this many fail attempt 1
        "fatal": st.integers(0, 3),         # of 10 branches, this many always fail
        "duration": st.integers(0, 3),
        "batch": st.none() | st.integers(1, 4),
        # seconds per attempt (not on a batching stage: a batch call's length depends on
        # what it holds); half-integers never tie with the whole-second attempt durations
        "timeout": st.none() | st.sampled_from([0.5, 1.5, 2.5, 4.5]),
    }), min_size=1, max_size=3))
    return {
        "stages": stages,
        "n": draw(st.integers(0, 12)),
        "form": draw(st.sampled_from([
            "run", "map", "ordered", "open", "open_cancel", "break",
            "bare", "bare_ordered", "bare_break", "open_stop",
        ])),
        "stop": draw(st.integers(0, 12)),
        "window": draw(st.none() | st.integers(1, 3)),   # map's reorder/intake window
        "drain": draw(st.sampled_from([0, 0, 0.5, 1.5, 2.5])),  # the entry's drain=
        "stop_drain": draw(st.none() | st.sampled_from([0, 0.5, 2.5])),  # open_stop's
        # open_stop: a second p.stop(drain=) that long after the first (it can only shorten)
        "restop": draw(st.none() | st.tuples(st.sampled_from([0.5, 1]),
                                             st.sampled_from([0, 0.5, 9]))),
    }


def _h(path: tuple[int, ...], k: int) -> int:
    return (sum(path) * 7 + len(path) * 3 + k * 5) % 10


@given(pipelines())
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_ledger_property(s: dict[str, Any]) -> None:
    trio.run(_ledger, s, clock=trio.testing.MockClock(autojump_threshold=0))


@given(pipelines(), st.integers(1, 3), st.sampled_from(["run", "map", "ordered", "bare"]))
@settings(max_examples=max(20, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_journal_resume_property(
    tmp_path_factory: pytest.TempPathFactory, s: dict[str, Any], every: int, form: str,
) -> None:
    """A first run over every ``every``-th input, then a rerun over all of them with the
    same journal, in each way in: every input has exactly one record at its own index; an
    input whose outputs all reached the end the first time runs in no stage and comes back
    with the same value; the others run again from the first stage."""
    journal = tmp_path_factory.mktemp("resume") / "pipe.journal"
    trio.run(_resume, s, every, form, journal, clock=trio.testing.MockClock(autojump_threshold=0))


async def _resume(s: dict[str, Any], every: int, form: str, journal: Any) -> None:
    specs = s["stages"]
    n = s["n"]
    calls: Counter[int] = Counter()  # attempts per input, over the stages

    async def one(k: int, path: tuple[int, ...]) -> list[tuple[int, ...]]:
        calls[path[0]] += 1
        h = _h(path, k)
        if h < specs[k]["fatal"]:
            raise ConnectionError(f"{k} {path}")
        fan = specs[k]["fan"]
        return [(*path, 0)] if fan < 0 else [(*path, j) for j in range(sum(path) % (fan + 1))]

    def make(k: int) -> conveyor.Stage:
        spec = specs[k]
        options: dict[str, Any] = {"name": f"s{k}", "workers": spec["workers"],
                                   "buffer": spec["buffer"]}
        if spec["batch"] is not None:
            async def batch_fn(paths: list[tuple[int, ...]]) -> list[Any]:
                answers: list[Any] = []
                for path in paths:
                    try:
                        got = await one(k, path)
                    except ConnectionError as error:
                        answers.append(error)
                    else:
                        answers.append(got[0] if got else ValueError("no output"))
                return answers
            return conveyor.stage(batch_fn, batch=Batch(spec["batch"], max_wait=1), **options)
        if spec["fan"] >= 0:
            async def gen(path: tuple[int, ...]) -> Any:
                for out in await one(k, path):
                    yield out
            return conveyor.stage(gen, **options)

        async def plain(path: tuple[int, ...]) -> tuple[int, ...]:
            return (await one(k, path))[0]
        return conveyor.stage(plain, **options)

    pipe = conveyor.pipeline(*(make(k) for k in range(len(specs))))
    key = {"journal": journal, "key": lambda item: item[0]}
    first = await pipe.run([(i,) for i in range(0, n, every)], **key)
    done = {r.item[0]: r.value for r in first.succeeded}
    calls.clear()
    items = [(i,) for i in range(n)]
    seen: list[Any] = []
    if form == "run":
        report = await pipe.run(items, **key)
    elif form == "bare":
        stream = pipe.map(items, **key)
        seen = [r async for r in stream]
        report = stream.report()
    else:
        stream = pipe.map(items, ordered=form == "ordered", **key)
        async with stream as records:
            seen = [r async for r in records]
        report = stream.report()
        if form == "ordered":
            assert [r.index for r in seen] == list(range(n))
    every_record = [*seen, *report.succeeded, *report.failed, *report.unfinished]
    every_record = list({id(r): r for r in every_record}.values())  # a failure is in both
    assert sorted(r.index for r in every_record) == list(range(n))
    assert all(r.item == (r.index,) for r in every_record)
    assert not report.unfinished
    again = {r.item[0]: r.value for r in every_record if type(r) is Succeeded}
    assert not set(done) & set(calls)  # finished the first time: run in no stage
    assert all(again[i] == value for i, value in done.items())
    assert set(calls) == set(range(n)) - set(done)  # the others: from the first stage


async def _ledger(s: dict[str, Any]) -> None:
    specs = s["stages"]
    n = s["n"]
    attempts: Counter[tuple[int, tuple[int, ...]]] = Counter()
    running = 0
    stopped_at: float | None = None  # when the pipeline was told to stop (or left)
    late: list[tuple[int, Any, float]] = []  # attempts started after that
    cancelled: list[tuple[int, float]] = []  # attempts cut short: (stage, when)
    deadline = float("inf")  # when a stop's drain ends

    def outputs(k: int, path: tuple[int, ...]) -> list[tuple[int, ...]]:
        fan = specs[k]["fan"]
        if fan < 0:
            return [(*path, 0)]
        return [(*path, j) for j in range(sum(path) % (fan + 1))]

    def fails(k: int, path: tuple[int, ...], attempt: int) -> bool:
        h = _h(path, k)
        return h < specs[k]["fatal"] or (attempt == 1 and h >= 10 - specs[k]["transient"])

    def duration(k: int, path: tuple[int, ...]) -> int:
        return int(specs[k]["duration"] * (1 + sum(path) % 2))

    def started(k: int, what: Any) -> None:
        if stopped_at is not None and trio.current_time() > stopped_at:
            late.append((k, what, trio.current_time()))

    async def one(k: int, path: tuple[int, ...], batched: bool = False) -> list[tuple[int, ...]]:
        nonlocal running
        attempts[(k, path)] += 1
        if not batched:
            started(k, path)  # (a batch call's items run one by one in its one attempt)
        running += 1
        try:
            await trio.sleep(duration(k, path))
        except trio.Cancelled:
            cancelled.append((k, trio.current_time()))
            raise
        finally:
            running -= 1
        if fails(k, path, attempts[(k, path)]):
            raise ConnectionError(f"{k} {path}")
        return outputs(k, path)

    def make(k: int) -> conveyor.Stage:
        spec = specs[k]
        retry = Retry(attempts=spec["attempts"], backoff=None) if spec["attempts"] > 1 else None
        if spec["batch"] is not None:
            async def batch_fn(paths: list[tuple[int, ...]]) -> list[Any]:
                started(k, paths)
                answers: list[Any] = []
                for path in paths:
                    try:
                        got = await one(k, path, batched=True)
                    except ConnectionError as error:
                        error.retryable = False  # type: ignore[attr-defined]
                        answers.append(error)
                    else:
                        answers.append(got[0] if got else ValueError("no output"))
                return answers
            return conveyor.stage(batch_fn, name=f"s{k}", workers=spec["workers"],
                                  buffer=spec["buffer"], retry=retry,
                                  batch=Batch(spec["batch"], max_wait=1))
        if spec["fan"] >= 0:
            async def gen(path: tuple[int, ...]) -> Any:
                for out in await one(k, path):
                    yield out
            return conveyor.stage(gen, name=f"s{k}", workers=spec["workers"],
                                  buffer=spec["buffer"], retry=retry, timeout=spec["timeout"])

        async def plain(path: tuple[int, ...]) -> tuple[int, ...]:
            return (await one(k, path))[0]
        return conveyor.stage(plain, name=f"s{k}", workers=spec["workers"],
                              buffer=spec["buffer"], retry=retry, timeout=spec["timeout"])

    pipe = conveyor.pipeline(*(make(k) for k in range(len(specs))))
    pulled = 0

    def items() -> Any:  # counts what the pipeline took from it
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield (i,)

    form = s["form"]
    stop_at = s["stop"]
    drain = s["drain"]
    window = s["window"]
    seen: list[Any] = []
    stopped = False
    ended_by_call = True  # the call returned once everything had ended (not a bare break)
    from_items = True  # inputs came from `items` (else: submitted by hand)
    submitted = 0
    if form == "run":
        report = await pipe.run(items(), drain=drain)
    elif form in ("map", "ordered"):
        stream = pipe.map(items(), ordered=form == "ordered", window=window, drain=drain)
        async with stream as records:
            seen = [r async for r in records]
        report = stream.report()
        if form == "ordered":
            assert [r.index for r in seen] == list(range(n))
    elif form in ("bare", "bare_ordered"):
        stream = pipe.map(items(), ordered=form == "bare_ordered", window=window, drain=drain)
        async for record in stream:  # the loop ends when the pipeline has ended
            seen.append(record)
        report = stream.report()
        if form == "bare_ordered":
            assert [r.index for r in seen] == list(range(n))
    elif form in ("break", "bare_break"):
        stream = pipe.map(items(), window=window, drain=drain)
        if form == "break":
            async with stream as records:
                async for record in records:
                    seen.append(record)
                    if len(seen) > stop_at % 4:
                        stopped = True
                        stopped_at = trio.current_time()
                        deadline = stopped_at + drain
                        break
        else:
            async for record in stream:
                seen.append(record)
                if len(seen) > stop_at % 4:
                    stopped = True
                    stopped_at = trio.current_time()
                    deadline = stopped_at + drain
                    break
            if stopped:
                # The bare loop's pipeline ends on its own, outside the caller's scopes:
                # by when its drain is over (README: use `async with` to wait for it).
                ended_by_call = False
                await trio.sleep(drain + 1)
        report = stream.report()
    elif form == "open_stop":
        from_items = False
        stop_drain = s["stop_drain"]
        async with pipe.open(drain=drain) as p, trio.open_nursery() as nursery:

            async def stopper() -> None:
                nonlocal stopped, stopped_at, deadline
                await trio.sleep(stop_at / 2)
                stopped, stopped_at = True, trio.current_time()
                p.stop(drain=stop_drain)  # None: the pipeline's drain=
                deadline = stopped_at + (drain if stop_drain is None else stop_drain)
                if s["restop"] is not None:
                    after, drain2 = s["restop"]
                    await trio.sleep(after)
                    p.stop(drain=drain2)  # during the drain: it can only shorten it
                    deadline = min(deadline, trio.current_time() + drain2)

            async def feed() -> None:
                nonlocal submitted
                try:
                    for item in items():
                        await p.submit(item)
                        submitted += 1
                except trio.ClosedResourceError:
                    assert stopped  # refused only once stopped
                p.close()

            nursery.start_soon(stopper)
            nursery.start_soon(feed)
            async for record in p.results():
                seen.append(record)  # a record handed out is the caller's to keep
            nursery.cancel_scope.cancel()  # ended before the stop: no stop
        report = p.report()
    else:
        from_items = False
        with trio.move_on_after(stop_at) as scope:
            async with pipe.open(drain=drain) as p:
                for item in items():
                    await p.submit(item)
                    submitted += 1
                if form == "open":
                    p.close()
                    async for record in p.results():
                        seen.append(record)  # a record handed out is the caller's to keep
                else:
                    await trio.sleep_forever()
        stopped = scope.cancelled_caught
        if stopped:
            stopped_at = stop_at
            deadline = stop_at + drain
        report = p.report()

    if ended_by_call:
        assert running == 0  # nothing of the pipeline still runs after its call
        assert trio.current_time() <= deadline  # and it ended by the end of the drain
    await trio.sleep(max(drain, s["stop_drain"] or 0) + 10)
    assert running == 0
    # Running attempts get the drain, then they are cancelled: exactly at its end (a stage
    # with a timeout also cuts its own attempts, at other times).
    assert all(t == deadline for k, t in cancelled if specs[k]["timeout"] is None), (
        cancelled, deadline)
    # A stop starts nothing new (intake stops; nothing queued or due for a retry starts):
    # no attempt began after the instant of the stop.
    assert not late, late
    records = [*seen, *report.succeeded, *report.failed]
    records += report.unfinished
    records = list({id(r): r for r in records}.values())  # a failure is in both
    taken = report.stats.submitted
    _check_ledger(records, taken, report)
    assert taken == (pulled if from_items else submitted)  # every input taken, and only those
    names = [f"s{k}" for k in range(len(specs))]
    for r in records:
        assert r.item == (r.index,)
        if isinstance(r, Failed | Unfinished):
            assert r.stage in names
            assert r.stage_item[0] == r.index
        if isinstance(r, Failed):
            k = names.index(r.stage)
            assert r.attempts <= specs[k]["attempts"]
        # attempts: a Failed's are those of its stage; an Unfinished's too (0: it was not
        # started there, e.g. it finished the stage before during the drain); a success's
        # are those of every stage on the input and its outputs. (A batch call that a stop
        # cut may not have reached each of its items: Unfinished in a batching stage is not
        # checked.)
        if isinstance(r, Failed) or (
            isinstance(r, Unfinished) and specs[names.index(r.stage)]["batch"] is None
        ):
            assert r.attempts == attempts[(names.index(r.stage), r.stage_item)], r
        if isinstance(r, Succeeded):
            assert r.attempts == sum(c for (_, path), c in attempts.items()
                                     if path[0] == r.index), r
    if stopped or form == "open_cancel":
        return
    assert taken == n and not report.unfinished
    # Without a stop, every input's record is what the stages make of it.
    def walk(k: int, path: tuple[int, ...], leaves: list[Any], failing: list[Any]) -> None:
        if k == len(specs):
            leaves.append(path)
            return
        spec = specs[k]
        batch = spec["batch"] is not None
        allowed = spec["attempts"] if not batch else 1
        h = _h(path, k)
        fatal = h < spec["fatal"]
        transient = h >= 10 - spec["transient"]
        timeout = spec["timeout"]
        too_slow = not batch and timeout is not None and duration(k, path) > timeout
        outs = outputs(k, path)
        if (batch and not outs) or fatal or too_slow or (transient and allowed < 2):
            failing.append((f"s{k}", path))
            return
        for out in outs if spec["fan"] >= 0 and not batch else outs[:1]:
            walk(k + 1, out, leaves, failing)

    for r in records:
        leaves: list[tuple[int, ...]] = []
        failing: list[tuple[str, tuple[int, ...]]] = []
        walk(0, r.item, leaves, failing)
        if failing:
            assert isinstance(r, Failed), (r, failing)
            assert (r.stage, r.stage_item) in failing
            k = names.index(r.stage)
            if specs[k]["batch"] is None and specs[k]["timeout"] is not None and (
                duration(k, r.stage_item) > specs[k]["timeout"]
            ):  # every attempt ran out of time: retried as any error, then given up
                assert isinstance(r.error, conveyor.AttemptTimeout), r
                assert r.attempts == specs[k]["attempts"], r
        else:
            assert isinstance(r, Succeeded), (r, leaves)
            if pipe.fans_out:
                assert sorted(r.value) == sorted(leaves)
            else:
                assert [r.value] == leaves


# ------------------------------------------------------------------ resume (journal)


async def test_journal_resume_skips_inputs_that_reached_the_end(tmp_path: Any) -> None:
    journal = tmp_path / "pipe.journal"
    calls: Counter[int] = Counter()
    stuck = True  # the first run: inputs >= 4 never finish their first stage

    async def split(x: int) -> Any:
        calls[x] += 1
        if stuck and x >= 4:
            await trio.sleep_forever()
        yield x * 10
        yield x * 10 + 1

    async def check(y: int) -> int:
        if y == 31:
            raise ValueError("bad")
        return y

    pipe = conveyor.pipeline(conveyor.stage(split, workers=3), check)
    async with pipe.open(journal=journal) as p:
        for x in range(8):
            await p.submit(x)
        settled = 0
        async for _ in p.results():
            settled += 1
            if settled == 4:  # 0, 1, 2 succeeded, 3 failed
                p.stop()
    first = p.report()
    assert len(first.unfinished) == 4
    done_before = {0, 1, 2}
    calls.clear()
    stuck = False
    report = await pipe.run(range(8), journal=journal)
    # Every input exactly once, fan-out values back from the journal for the finished ones.
    assert sorted(r.index for r in (*report.succeeded, *report.failed)) == list(range(8))
    assert sorted((r.item, sorted(r.value)) for r in report.succeeded) == [
        (x, [x * 10, x * 10 + 1]) for x in range(8) if x != 3
    ]
    assert [(r.item, r.stage, r.stage_item) for r in report.failed] == [(3, "check", 31)]
    # Those that had reached the end were not run again; the others ran from the first stage.
    assert done_before and not (done_before & set(calls))
    assert set(calls) == set(range(8)) - done_before
    # ordered map and open() read the same journal: nothing runs, everything comes back
    calls.clear()
    records = [r async for r in pipe.map(range(8), ordered=True, journal=journal)]
    assert [r.index for r in records] == list(range(8)) and set(calls) == {3}
    async with pipe.open(journal=journal) as p:
        for x in range(8):
            await p.submit(x)
        p.close()
        got = [r async for r in p.results()]
    assert sorted(r.item for r in got) == list(range(8))



@pytest.mark.parametrize("entry", ["run", "map", "map window", "map ordered"])
async def test_journal_resume_into_a_batching_first_stage_keeps_each_input_its_index(
    tmp_path: Any, entry: str,
) -> None:
    """The journal's filter settles a skipped input with the next index as it is
    iterated: inputs that run are numbered as they come, not a chunk ahead (a batching
    first stage is fed in chunks otherwise). Every index is the input's position, once."""
    journal = tmp_path / "pipe.journal"
    calls: Counter[int] = Counter()

    async def rows(xs: list[int]) -> list[int]:
        calls.update(xs)
        return [x * 10 for x in xs]

    pipe = conveyor.pipeline(conveyor.stage(rows, batch=conveyor.Batch(4, max_wait=0.01)))
    await pipe.run([x for x in range(0, 12, 3)], journal=journal)  # 0, 3, 6, 9 done
    calls.clear()
    records: list[Any]
    if entry == "run":
        report = await pipe.run(range(12), journal=journal)
        records = [*report.succeeded, *report.failed, *report.unfinished]
    else:
        options: dict[str, Any] = {
            "map window": {"window": 3}, "map ordered": {"ordered": True}, "map": {},
        }[entry]
        records = [r async for r in pipe.map(range(12), journal=journal, **options)]
    assert sorted((r.index, r.item, r.value) for r in records) == [
        (x, x, x * 10) for x in range(12)
    ]
    assert set(calls) == {x for x in range(12) if x % 3}

_CHILD = """
import sys, trio, conveyor
journal, calls = sys.argv[1], sys.argv[2]
async def split(x):
    with open(calls, "a") as f:
        f.write(f"{x}\\n")
    await trio.sleep(0.008 * (x % 7 + 1))  # about 1.2 s for the whole run
    yield x * 10
    yield x * 10 + 1
async def last(y):
    await trio.sleep(0.002)
    return y
async def main():
    print("started", flush=True)
    await conveyor.pipeline(conveyor.stage(split, workers=8), last).run(
        range(300), journal=journal)
    print("done", flush=True)
trio.run(main)
"""


@pytest.mark.slow
def test_killed_with_sigkill_and_run_again_every_input_once(tmp_path: Any) -> None:
    import random
    import sqlite3
    import subprocess
    import sys
    import time

    rng = random.Random()
    partial = 0
    for trial in range(3):
        journal = tmp_path / f"j{trial}.journal"
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(journal), str(tmp_path / f"calls{trial}")],
            stdout=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.3, 0.9))
        child.kill()  # SIGKILL: no cleanup ran
        child.communicate(timeout=30)
        conn = sqlite3.connect(journal)
        stored = {key for (key,) in conn.execute(
            "SELECT key FROM conveyor_items WHERE status = 'succeeded'")}
        conn.close()
        partial += 0 < len(stored) < 300
        calls: Counter[int] = Counter()
        report = trio.run(_rerun, journal, calls)
        assert sorted(r.item for r in report.succeeded) == list(range(300))
        assert all(sorted(r.value) == [r.item * 10, r.item * 10 + 1] for r in report.succeeded)
        assert not (set(calls) & stored)  # a journaled input is never run again
        assert set(calls) | stored == set(range(300))
    assert partial  # killed part-way at least once: the journal held some inputs, not all


async def _rerun(journal: Any, calls: Counter[int]) -> conveyor.Report:
    async def split(x: int) -> Any:
        calls[x] += 1
        yield x * 10
        yield x * 10 + 1

    async def last(y: int) -> int:
        return y

    pipe = conveyor.pipeline(conveyor.stage(split, workers=8), last)
    return await pipe.run(range(300), journal=journal)


def test_stage_fields_of_records_pickle_compare_and_show_only_when_set() -> None:
    import pickle

    error = ValueError("x")
    failed = Failed(1, error, 2, "tb", index=3, stage="parse", stage_item=10)
    assert (failed.stage, failed.stage_item, failed.index, failed.attempts) == ("parse", 10, 3, 2)
    again = pickle.loads(pickle.dumps(Failed(1, "e", 2, "tb", 3, "parse", 10)))  # type: ignore[arg-type]
    assert (again.stage, again.stage_item, again.index) == ("parse", 10, 3)
    unfinished = Unfinished(1, 0, None, index=4, stage="store", stage_item=[1])
    back = pickle.loads(pickle.dumps(unfinished))
    assert back == unfinished and (back.stage, back.stage_item, back.index) == ("store", [1], 4)
    assert "stage='store'" in repr(unfinished)
    assert "stage" not in repr(Unfinished(1, 0, None))
    assert "stage" not in repr(Failed(1, error, 1, ""))
    assert Unfinished(1, 0, None, index=1) == Unfinished(1, 0, None, index=2)  # index apart


async def test_observers_see_each_stage_as_a_pool_named_after_it() -> None:
    seen: list[tuple[str, str]] = []

    class Names(conveyor.Observer):
        def opened(self, info: conveyor.PoolInfo) -> conveyor.Observer:
            name = info.name

            class Per(conveyor.Observer):
                def failed(self, record: Failed) -> None:
                    seen.append((name, "failed"))

                def closed(self, report: conveyor.Report) -> None:
                    seen.append((name, "closed"))

            return Per()

    async def bad(x: int) -> int:
        raise ValueError(x)

    report = await conveyor.pipeline(double, bad).run([1], observers=[Names()])
    assert report.failed[0].stage == "bad"
    assert sorted(seen) == [("bad", "closed"), ("bad", "failed"), ("double", "closed")]
    with pytest.raises(TypeError, match=r"observers=.* is not valid: expected a list or tuple"):
        conveyor.pipeline(double).map([1], observers=Names())  # type: ignore[arg-type]
