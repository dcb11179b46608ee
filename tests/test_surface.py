"""One property over the whole public surface: bad input never hangs and never fails late.

For each public callable and each of its parameters, hypothesis draws a bad value (None,
bools, strings, NaN, +-inf, negatives, zero, huge ints, wrong objects, sync functions, lambdas
that return coroutines, async functions where a plain predicate is meant...) and calls it with
that value, every other argument valid. Each call must either

- raise TypeError or ValueError at the call, before any work (the task function was never
  called), with a message that names the parameter, in the one shape
  ``[Owner: ]param=value is not valid: expected WHAT; e.g. FIX``, whose FIX, made, is
  accepted (only ``fn`` and ``f`` may suggest prose: their fix is code to write); or
- be accepted, and then the work (3 small items) completes: on a MockClock with autojump
  within 1000 virtual seconds (threads and processes: 60 real seconds, since the mock clock
  would jump past a thread's work), every item settled, and no coroutine left unawaited.

Values that are surely wrong must be refused, not accepted: an async function where a plain
predicate or key function is meant (its coroutine would count as true), a str or bytes as
``items`` (it would run character by character).

Cases still open in modules other than this property's own are listed in ``KNOWN_OPEN``
and skipped; each entry says who fixes it. Delete an entry once its fix is merged.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import io
import math
import re
import tempfile
import typing
import warnings
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor
from tests import _procfuncs
from tests._fixes import SHAPE, suggested_call, suggested_fix

# ------------------------------------------------------------------------- the bad values


async def _async_true(*args: Any) -> bool:
    return True


async def _async_gen(*args: Any) -> Any:
    yield True


HUGE = "huge int"

BAD: list[tuple[str, Any]] = [
    ("None", None),
    ("True", True),
    ("False", False),
    ("''", ""),
    ("'abc'", "abc"),
    ("'5'", "5"),
    ("b'abc'", b"abc"),
    ("'a\\x00b'", "a\x00b"),
    ("nan", math.nan),
    ("inf", math.inf),
    ("-inf", -math.inf),
    ("-1", -1),
    ("-0.5", -0.5),
    ("0", 0),
    ("0.0", 0.0),
    ("1.5", 1.5),
    (HUGE, 10**30),
    (HUGE, 10**400),
    ("-10**30", -(10**30)),
    ("[]", []),
    ("()", ()),
    ("{}", {}),
    ("object()", object()),
    ("int (a class)", int),
    ("ValueError (a class)", ValueError),
    ("Retry()", conveyor.Retry()),
    ("Rate(10)", conveyor.Rate(10)),
    ("sync def", _procfuncs.square),
    ("lambda -> coroutine", lambda *args: _async_true(*args)),
    ("async def", _async_true),
    ("partial(async def)", functools.partial(_async_true)),
    ("async generator function", _async_gen),
]

bad_values = st.one_of(
    st.sampled_from(BAD),
    st.integers(max_value=0).map(lambda n: ("int <= 0", n)),
    st.integers(min_value=10**15, max_value=10**60).map(lambda n: (HUGE, n)),
    st.floats(max_value=0.0).map(lambda x: ("float <= 0", x)),
)

ASYNC_FORMS = {"async def", "partial(async def)", "async generator function"}

# --------------------------------------------------------------------- the cases still open

# (target, parameter, value label); "*" for any value. Delete an entry once its fix is merged.
KNOWN_OPEN: set[tuple[str, str, str]] = {
    # The lead (_pool.py): _truth's refusal of a predicate that returned an awaitable is not
    # in the one shape yet; e.g. raise _options.invalid("predicate", predicate, "a function
    # stats -> bool that answers at once ...", "predicate=lambda stats: ...",
    # owner="wait_stats", kind=TypeError).
    ("Pool.wait_stats", "predicate", "lambda -> coroutine"),
}

# Merged in parallel with the one shape: these refuse bad input at the call, naming the
# parameter (checked), but in their own words, not yet in the one shape (open: to convert
# to conveyor._options' checks).
SHAPE_OPEN: set[str] = set()

# A variadic parameter (``pipeline(*stages)``) is not one keyword to try: the fix is the
# whole corrected call, made with ``fn`` a task function (tests._fixes.suggested_call).
CALL_FIX = {"pipeline"}


def known_open(target: str, param: str, label: str) -> bool:
    return (target, param, label) in KNOWN_OPEN or (target, param, "*") in KNOWN_OPEN


# ------------------------------------------------------------------------------ the work


class Hiccup(conveyor.RetryAfter):
    """A first attempt's failure that retries at once (a 0 s hint) and looks like a 429."""

    status = 429

    def __init__(self) -> None:
        super().__init__(0, "429, retry at once")


class Work:
    """The task function of one example: item 2 fails its first attempt with ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[Any] = []
        self.error = error if error is not None else Hiccup()

    async def __call__(self, item: Any) -> Any:
        self.calls.append(item)
        await trio.lowlevel.checkpoint()
        if item == 2 and self.calls.count(2) == 1:
            raise self.error
        return item


ITEMS = [1, 2, 3]


class Refused(Exception):
    """The call refused its input."""

    def __init__(self, error: TypeError | ValueError) -> None:
        super().__init__(str(error))
        self.error = error


def at_call(make: Callable[[], Any]) -> Any:
    """Call ``make``; a TypeError or ValueError from it is a refusal."""
    try:
        return make()
    except (TypeError, ValueError) as error:
        raise Refused(error) from None


def settled(report: conveyor.Report) -> int:
    stats = report.stats
    done = len(report.failed) + len(report.unfinished) + stats.succeeded
    assert stats.submitted == stats.succeeded + stats.failed + stats.unfinished
    return done


async def entry_run(work: Work, items: Any = ITEMS, **options: Any) -> None:
    try:
        report = await conveyor.run(work, items, **options)
    except (TypeError, ValueError) as error:
        if work.calls:
            raise  # after the work started: not a refusal at the call
        raise Refused(error) from None
    count = settled(report)
    if isinstance(items, Sized):
        assert count == len(items)


async def entry_map(work: Work, items: Any = ITEMS, **options: Any) -> None:
    stream = at_call(lambda: conveyor.map(work, items, **options))
    async with stream as records:
        seen = [record async for record in records]
    assert len(seen) == settled(stream.report())


async def entry_open_pool(work: Work, **options: Any) -> None:
    pool_cm = at_call(lambda: conveyor.open_pool(work, **options))
    async with pool_cm as pool:
        for item in ITEMS:
            await pool.submit(item)
    assert settled(pool.report()) == 3


RETRY = conveyor.Retry(attempts=2, backoff=None)


async def run_case(param: str, value: Any) -> None:
    options: dict[str, Any] = {"retry": RETRY}
    if param == "key":
        options["journal"] = "journal.sqlite"
    options[param] = value
    if param == "fn":
        del options["fn"]
        await _refused_or_settled(conveyor.run, value, options)
        return
    await entry_run(Work(), **options)


async def _refused_or_settled(entry: Any, fn: Any, options: dict[str, Any]) -> None:
    """An entry form called with a bad ``fn``: refused at the call, or every item settles."""
    items = options.pop("items", ITEMS)
    if entry is conveyor.run:
        try:
            report = await conveyor.run(fn, items, **options)
        except (TypeError, ValueError) as error:
            raise Refused(error) from None
        assert settled(report) == 3
    elif entry is conveyor.map:
        stream = at_call(lambda: conveyor.map(fn, items, **options))
        async with stream as records:
            assert len([record async for record in records]) == 3
    else:
        pool_cm = at_call(lambda: conveyor.open_pool(fn, **options))
        async with pool_cm as pool:
            for item in ITEMS:
                await pool.submit(item)
        assert settled(pool.report()) == 3


async def map_case(param: str, value: Any) -> None:
    options: dict[str, Any] = {"retry": RETRY}
    if param == "window":
        options["ordered"] = True
    options[param] = value
    if param == "fn":
        del options["fn"]
        await _refused_or_settled(conveyor.map, value, options)
        return
    await entry_map(Work(), **options)


async def open_pool_case(param: str, value: Any) -> None:
    options: dict[str, Any] = {"retry": RETRY, param: value}
    if param == "fn":
        del options["fn"]
        await _refused_or_settled(conveyor.open_pool, value, options)
        return
    await entry_open_pool(Work(), **options)


async def retry_case(param: str, value: Any) -> None:
    retry = at_call(lambda: conveyor.Retry(**{param: value}))
    await entry_run(Work(), retry=retry)


async def backoff_case(param: str, value: Any) -> None:
    backoff = at_call(lambda: conveyor.Backoff(**{param: value}))
    for n in (1, 2, 3, 64, 1025, 2000, 10**6, 10**30):
        delay = backoff.delay(n)
        assert type(delay) is float and 0 <= delay <= backoff.max, (n, delay)
    # A plain error (no hint): the backoff's own delay, up to its max (a huge max is what the
    # caller asked for, so wait for 2 attempts only when the delay fits the deadline).
    error = ValueError("plain") if backoff.delay(1) < 100 else Hiccup()
    await entry_run(Work(error), retry=conveyor.Retry(attempts=2, backoff=backoff))


async def retry_after_case(param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"delay": 0, param: value}
    hint = at_call(lambda: conveyor.RetryAfter(**kwargs))
    await entry_run(Work(hint), retry=conveyor.Retry(attempts=2))  # a hint is cut to 30 s


async def rate_case(param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"per_second": 100, param: value}
    rate = at_call(lambda: conveyor.Rate(**kwargs))
    await entry_run(Work(), rate=rate, retry=RETRY)


async def per_key_case(param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"key": lambda item: item % 2, "limit": 1, param: value}
    key = kwargs.pop("key")
    per_key = at_call(lambda: conveyor.PerKey(key, **kwargs))
    await entry_run(Work(), per_key=per_key, retry=RETRY)


async def adaptive_case(param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"overload_on": Hiccup, param: value}
    adaptive = at_call(lambda: conveyor.Adaptive(**kwargs))
    await entry_run(Work(), adaptive=adaptive, retry=RETRY)


async def progress_case(param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"stream": io.StringIO(), param: value}
    stream = kwargs.pop("stream")
    progress = at_call(lambda: conveyor.Progress(stream, **kwargs))
    await entry_run(Work(), progress=progress)


async def run_observed(observer: conveyor.Observer) -> None:
    """``conveyor.run(Work(), ITEMS, observers=[observer])``."""
    report = await conveyor.run(Work(), ITEMS, retry=RETRY, observers=[observer])
    assert settled(report) == 3


async def tqdm_progress_case(param: str, value: Any) -> None:
    kwargs: dict[str, Any] = {param: value}
    if param != "bar" or value is None:
        kwargs["file"] = io.StringIO()
    await run_observed(at_call(lambda: conveyor.TqdmProgress(**kwargs)))


async def prometheus_case(param: str, value: Any) -> None:
    from prometheus_client import CollectorRegistry

    kwargs: dict[str, Any] = {param: value}
    if param != "registry":
        kwargs["registry"] = CollectorRegistry()
    await run_observed(at_call(lambda: conveyor.PrometheusMetrics(**kwargs)))


async def otel_case(param: str, value: Any) -> None:
    await run_observed(at_call(lambda: conveyor.OpenTelemetry(**{param: value})))


async def rich_progress_case(param: str, value: Any) -> None:
    from rich.console import Console

    kwargs: dict[str, Any] = {param: value}
    if param != "progress" or value is None:
        kwargs.setdefault("console", Console(file=io.StringIO()))
    await run_observed(at_call(lambda: conveyor.RichProgress(**kwargs)))


async def stop_case(param: str, value: Any) -> None:
    async def slow(item: Any) -> Any:
        await trio.sleep(10)
        return item

    async with conveyor.open_pool(slow, workers=2) as pool:
        for item in ITEMS:
            await pool.submit(item)
        await trio.sleep(1)
        try:
            pool.stop(**{param: value})
        except (TypeError, ValueError) as error:
            pool.stop()
            raise Refused(error) from None
    assert settled(pool.report()) == 3


async def wait_stats_case(param: str, value: Any) -> None:
    async with conveyor.open_pool(Work()) as pool:
        for item in ITEMS:
            await pool.submit(item)
        try:
            await pool.wait_stats(**{param: value})
        except Exception as error:
            if _raised_by(value, pool.stats, error):
                pass  # the caller's own predicate raised: its error comes out as it is
            elif isinstance(error, TypeError | ValueError):
                raise Refused(error) from None  # the pool is running: the call is the refusal
            else:
                raise
    assert settled(pool.report()) == 3


def _raised_by(predicate: Any, stats: conveyor.Stats, error: BaseException) -> bool:
    """Whether ``predicate(stats)`` raises the same error (a plain function's own bug)."""
    if not callable(predicate):
        return False
    try:
        answer = predicate(stats)
    except Exception as own:
        return type(own) is type(error) and str(own) == str(error)
    if inspect.iscoroutine(answer):
        answer.close()  # this probe's own call: not the pool's to await
    return False


def _offload_fn(param: str, value: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"f": _procfuncs.square, param: value}
    return kwargs


async def in_thread_case(param: str, value: Any) -> None:
    fn = at_call(lambda: conveyor.in_thread(**_offload_fn(param, value)))
    assert settled(await conveyor.run(fn, ITEMS)) == 3


async def in_process_case(param: str, value: Any) -> None:
    fn = at_call(lambda: conveyor.in_process(**_offload_fn(param, value)))
    assert settled(await conveyor.run(fn, ITEMS)) == 3


async def in_process_batched_case(param: str, value: Any) -> None:
    batched = conveyor.in_process_batched(**_offload_fn(param, value))
    try:
        entered = await batched.__aenter__()
    except (TypeError, ValueError) as error:  # its checks run on entering: before any work
        raise Refused(error) from None
    try:
        assert settled(await conveyor.run(entered, ITEMS)) == 3
    except BaseException as exc:
        if not await batched.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await batched.__aexit__(None, None, None)


async def _pipe_settled(pipe: Any, **options: Any) -> None:
    """Run ``pipe`` over ITEMS; refused at the call (before any work), or all settle."""
    try:
        report = await pipe.run(ITEMS, **options)
    except (TypeError, ValueError) as error:
        raise Refused(error) from None
    assert settled(report) == 3


async def stage_case(param: str, value: Any) -> None:
    options: dict[str, Any] = {"fn": Work(), "retry": RETRY, param: value}
    fn = options.pop("fn")
    made = at_call(lambda: conveyor.stage(fn, **options))
    await _pipe_settled(conveyor.pipeline(made))


async def _batch_work(items: list[Any]) -> list[Any]:
    await trio.lowlevel.checkpoint()
    return items


async def batch_case(param: str, value: Any) -> None:
    options: dict[str, Any] = {"size": 2, param: value}
    batch = at_call(lambda: conveyor.Batch(**options))
    await _pipe_settled(conveyor.pipeline(conveyor.stage(_batch_work, batch=batch)))


async def pipeline_case(param: str, value: Any) -> None:
    assert param == "stages"
    pipe = at_call(lambda: conveyor.pipeline(value))
    await _pipe_settled(pipe)


def _pipe() -> Any:
    return conveyor.pipeline(
        conveyor.stage(Work(), name="a", retry=RETRY), conveyor.stage(Work(), name="b")
    )


def _pipe_options(param: str, value: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"items": ITEMS}
    if param == "key":
        options["journal"] = "journal.sqlite"
    options[param] = value
    return options


async def pipeline_run_case(param: str, value: Any) -> None:
    options = _pipe_options(param, value)
    items = options.pop("items")
    try:
        report = await _pipe().run(items, **options)
    except (TypeError, ValueError) as error:
        raise Refused(error) from None
    count = settled(report)
    if isinstance(items, Sized):  # as entry_run: an empty tuple is no items, not a refusal
        assert count == len(items)


async def pipeline_map_case(param: str, value: Any) -> None:
    options = _pipe_options(param, value)
    items = options.pop("items")
    stream = at_call(lambda: _pipe().map(items, **options))
    async with stream as records:
        seen = [record async for record in records]
    assert len(seen) == settled(stream.report())


async def pipeline_open_case(param: str, value: Any) -> None:
    options = _pipe_options(param, value)
    del options["items"]
    opened = at_call(lambda: _pipe().open(**options))
    async with opened as p:
        for item in ITEMS:
            await p.submit(item)
    assert settled(p.report()) == 3


@dataclass(frozen=True)
class Target:
    name: str
    function: Any  # whose signature lists the parameters
    case: Callable[[str, Any], Awaitable[None]]
    # Threads and processes (the journal's SQLite runs in a thread too): the mock clock's
    # autojump would jump past their work to the deadline; these run on the real clock.
    real_clock: bool = False
    real_clock_params: tuple[str, ...] = ()


TARGETS = [
    Target("run", conveyor.run, run_case, real_clock_params=("journal", "key")),
    Target("map", conveyor.map, map_case, real_clock_params=("journal", "key")),
    Target("open_pool", conveyor.open_pool, open_pool_case, real_clock_params=("journal", "key")),
    Target("Retry", conveyor.Retry, retry_case),
    Target("Backoff", conveyor.Backoff, backoff_case),
    Target("RetryAfter", conveyor.RetryAfter, retry_after_case),
    Target("Rate", conveyor.Rate, rate_case),
    Target("PerKey", conveyor.PerKey, per_key_case),
    Target("Adaptive", conveyor.Adaptive, adaptive_case),
    Target("Progress", conveyor.Progress, progress_case),
    Target("TqdmProgress", conveyor.TqdmProgress, tqdm_progress_case),
    Target("RichProgress", conveyor.RichProgress, rich_progress_case),
    Target("PrometheusMetrics", conveyor.PrometheusMetrics, prometheus_case),
    Target("OpenTelemetry", conveyor.OpenTelemetry, otel_case),
    Target("Pool.stop", conveyor.Pool.stop, stop_case),
    Target("Pool.wait_stats", conveyor.Pool.wait_stats, wait_stats_case),
    Target("in_thread", conveyor.in_thread, in_thread_case, real_clock=True),
    Target("in_process", conveyor.in_process, in_process_case, real_clock=True),
    Target("in_process_batched", conveyor.in_process_batched, in_process_batched_case,
           real_clock=True),
    Target("stage", conveyor.stage, stage_case),
    Target("Batch", conveyor.Batch, batch_case),
    Target("pipeline", conveyor.pipeline, pipeline_case),
    Target("Pipeline.run", conveyor.Pipeline.run, pipeline_run_case,
           real_clock_params=("journal", "key")),
    Target("Pipeline.map", conveyor.Pipeline.map, pipeline_map_case,
           real_clock_params=("journal", "key")),
    Target("Pipeline.open", conveyor.Pipeline.open, pipeline_open_case,
           real_clock_params=("journal", "key")),
]


def parameters(target: Target) -> list[str]:
    """The target's parameters, from its signature; ``**options: Unpack[SomeTypedDict]``
    stands for each key of the TypedDict (run, map, open_pool: every pool option)."""
    function = inspect.unwrap(target.function)
    if isinstance(function, type):
        function = function.__init__
    names: list[str] = []
    for name, param in inspect.signature(function).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            hint = typing.get_type_hints(function)[name]
            if typing.get_origin(hint) is not typing.Unpack:
                continue  # free-form (TqdmProgress's **tqdm_kwargs go to tqdm, which checks)
            (options,) = typing.get_args(hint)
            names += typing.get_type_hints(options)
        elif name != "self":
            names.append(name)
    return names


CASES = [(target, param) for target in TARGETS for param in parameters(target)]

# Where a plain (sync) callable is meant: an async one must be refused at the call.
PLAIN_CALLABLE = {
    ("Retry", "retry_on"), ("Adaptive", "overload_on"), ("PerKey", "key"), ("run", "key"),
    ("Pool.wait_stats", "predicate"), ("in_thread", "f"), ("in_process", "f"),
    ("in_process_batched", "f"), ("Pipeline.run", "key"), ("Pipeline.map", "key"),
    ("Pipeline.open", "key"),
}


def surely_bad(target: str, param: str, label: str) -> bool:
    """Values that must be refused, not accepted."""
    if (target, param) in PLAIN_CALLABLE and label in ASYNC_FORMS:
        return True
    return param == "items" and isinstance(dict(BAD).get(label), str | bytes)


def names(message: str, param: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(param)}(?!\w)", message) is not None


# Where the fix is code to write, or the caller's own object: the message may suggest prose
# (`items=[item] (a single item)` for an object whose repr is not code).
PROSE_FIX = {"fn", "f", "items"}


async def check_refusal(target: Target, param: str, label: str, error: Exception) -> None:
    """A refusal is in the one shape, and the fix it suggests is accepted."""
    message = str(error)
    where = f"{target.name}({param}={label})"
    assert names(message, param), (
        f"{where} refused without naming {param!r}: {type(error).__name__}: {message}"
    )
    if target.name in SHAPE_OPEN:
        return  # refused at the call, naming the parameter: the shape is still open
    match = SHAPE.match(message)
    assert match is not None, f"{where}: not in the one shape: {message!r}"
    assert match["param"] == param, f"{where}: names {match['param']!r}: {message!r}"
    if target.name in CALL_FIX:
        try:
            made = suggested_call(message, fn=Work())
        except (TypeError, ValueError) as refused:
            raise AssertionError(f"{where}: the suggested fix {match['fix']!r} is refused "
                                 f"too: {refused}") from None
        await _pipe_settled(made)
        return
    try:
        fix = suggested_fix(message)
    except Exception:  # code that names what only the caller has (fn=MyClass(...))
        fix = None
    if fix is None:
        assert param in PROSE_FIX, f"{where}: the fix is not code: {message!r}"
        return
    if set(fix) != {param}:
        return  # a fix of several arguments: tried by hand (tests/test_errors.py)
    try:
        await target.case(param, fix[param])
    except Refused as refused:
        raise AssertionError(f"{where}: the suggested fix {match['fix']!r} is refused too: "
                             f"{refused.error}") from None


def check(target: Target, param: str, label: str, value: Any) -> None:
    """Call ``target`` with ``param=value``; refused at the call (in the one shape, with a
    fix that is accepted), or the work completes."""

    real_clock = target.real_clock or param in target.real_clock_params

    async def main() -> None:
        deadline = 60 if real_clock else 1000
        with trio.fail_after(deadline):
            try:
                await target.case(param, value)
            except Refused as refused:
                await check_refusal(target, param, label, refused.error)
                return
        assert not surely_bad(target.name, param, label), (
            f"{target.name}({param}={label}) was accepted"
        )

    clock = None if real_clock else trio.testing.MockClock(autojump_threshold=0)
    with tempfile.TemporaryDirectory() as directory, contextlib.chdir(directory):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trio.run(main, clock=clock)
            gc.collect()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not unawaited, f"{target.name}({param}={label}): {unawaited}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), bad=bad_values)
def test_every_parameter_refuses_bad_input_at_the_call_or_completes(
    case: tuple[Target, str], bad: tuple[str, Any]
) -> None:
    target, param = case
    label, value = bad
    if known_open(target.name, param, label):
        return  # fixed elsewhere, in parallel (see KNOWN_OPEN)
    check(target, param, label, value)


SWEEP = ["'abc'", "-1"]  # labels in BAD: the wrong kind, and out of range, for nearly all


@pytest.mark.parametrize("case", CASES, ids=[f"{t.name}-{p}" for t, p in CASES])
def test_every_parameter_refuses_in_the_one_shape_with_a_fix_that_works(
    case: tuple[Target, str],
) -> None:
    """Not left to chance: every parameter, with a few values that are wrong for nearly all
    of them; each refusal is in the one shape and its suggested fix is accepted."""
    target, param = case
    for label in SWEEP:
        if not known_open(target.name, param, label):
            check(target, param, label, dict(BAD)[label])


def test_the_property_covers_every_public_callable() -> None:
    """A new public function or class must be added to TARGETS (or said to be data)."""
    data = {  # records and errors made by conveyor, not inputs of a run
        "AttemptTimeout", "ConveyorError", "Failed", "ItemUnfinished", "ItemsFailed",
        "JournalError", "JournalInvalid", "JournalIOError", "MapStream", "NotPicklableError",
        "Percentiles", "Record", "RemoteError", "Report", "Stats", "Succeeded", "Unfinished",
        "WorkerDied", "Pool",
        "PoolOptions",  # the options of run, map and open_pool: covered through them
        # the observer seam: a base class and what it is told; LastReport takes no parameter
        "Attempt", "Observer", "PoolInfo", "LastReport",
        # a pipeline's parts, made by conveyor.pipeline and stage (their methods are TARGETS)
        "Pipeline", "PipelineRun", "PipelineStream", "Stage",
    }
    covered = {target.name for target in TARGETS if "." not in target.name}
    assert set(conveyor.__all__) - data == covered
    public_pool = {name for name, member in vars(conveyor.Pool).items()
                   if callable(member) and not name.startswith("_")}
    assert public_pool == {"submit", "submit_nowait", "close", "stop", "results", "report",
                           "wait_stats"}  # the others take no parameter, or an item (any object)


@pytest.mark.parametrize(
    ("target", "param", "label", "value"),
    [
        ("Retry", "retry_on", "async def", _async_true),
        ("Adaptive", "overload_on", "async def", _async_true),
        ("PerKey", "key", "async def", _async_true),
        ("Backoff", "initial", "inf", math.inf),
        ("RetryAfter", "delay", "True", True),
        ("Progress", "stream", "5", 5),
        ("Progress", "interval", "'1'", "1"),
        ("run", "fn", "async generator function", _async_gen),
        ("run", "timeout", "nan", math.nan),
        ("run", "journal", "'abc'", "abc"),
        ("run", "key", "sync def", _procfuncs.square),
        ("in_process", "executor", "None", None),
    ],
)
def test_cases_found_by_the_property_stay_fixed(
    target: str, param: str, label: str, value: Any
) -> None:
    (found,) = [t for t in TARGETS if t.name == target]
    check(found, param, label, value)


def test_every_pool_option_is_a_case_of_each_entry_point() -> None:
    """The options come from conveyor.PoolOptions, name= and observers= included."""
    options = set(typing.get_type_hints(conveyor.PoolOptions))
    assert {"workers", "journal", "name", "observers"} <= options
    for entry in ("run", "map", "open_pool"):
        assert options <= {param for target, param in CASES if target.name == entry}


PIPELINE_REFUSALS = [
    ("no stage", ()),
    ("not a stage", (5,)),
    ("not a stage, second of two", (_async_true, None)),
    ("a class", (int,)),
    ("two stages of one name", (_async_true, conveyor.stage(Work(), name="_async_true"))),
]


@pytest.mark.parametrize(("label", "stages"), PIPELINE_REFUSALS,
                         ids=[label for label, _ in PIPELINE_REFUSALS])
def test_pipeline_refuses_its_stages_in_the_one_shape_with_a_fix_that_works(
    label: str, stages: tuple[Any, ...],
) -> None:
    """``pipeline(*stages)``'s own refusals, which one bad value for ``stages`` cannot all
    reach (no stage, two of one name): the one shape, and the call it suggests runs."""
    (target,) = [t for t in TARGETS if t.name == "pipeline"]
    with pytest.raises((TypeError, ValueError)) as caught:
        conveyor.pipeline(*stages)
    assert str(caught.value).startswith("pipeline: stages=")

    async def main() -> None:
        await check_refusal(target, "stages", label, caught.value)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
