"""Bad input is refused at the call, before any work starts, with a message in the one shape
``[Owner: ]param=value is not valid: expected WHAT; e.g. FIX`` (messages pinned here), and
the suggested FIX is tried: the fixed call is accepted."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
import trio

import conveyor
from conveyor import Backoff, Retry
from tests._fixes import suggested_fix

CALLED: list[Any] = []


async def task(item: Any) -> Any:
    CALLED.append(item)
    return item


def sync_task(item: Any) -> Any:
    return item


class AsyncCallable:
    async def __call__(self, item: Any) -> Any:
        return item


BAD_OPTIONS = [
    ({"workers": 0}, ValueError, "workers=0 is not valid: expected an int >= 1; e.g. workers=1"),
    ({"workers": -3}, ValueError, "workers=-3 is not valid: expected an int >= 1; e.g. workers=1"),
    ({"workers": 2.5}, TypeError, "workers=2.5 is not valid: expected an int >= 1; e.g. workers=2"),
    ({"workers": True}, TypeError,
     "workers=True is not valid: expected an int >= 1; e.g. workers=1"),
    ({"buffer": -1}, ValueError,
     "buffer=-1 is not valid: expected an int >= 0 or None; e.g. buffer=0"),
    ({"timeout": 0}, ValueError,
     "timeout=0 is not valid: expected None or a finite number of seconds > 0; "
     "e.g. timeout=30.0"),
    ({"timeout": -1.5}, ValueError,
     "timeout=-1.5 is not valid: expected None or a finite number of seconds > 0; "
     "e.g. timeout=30.0"),
    ({"timeout": "1"}, TypeError,
     "timeout='1' is not valid: expected None or a finite number of seconds > 0; "
     "e.g. timeout=1.0"),
    ({"timeout": float("inf")}, ValueError,
     "timeout=inf is not valid: expected None or a finite number of seconds > 0; "
     "e.g. timeout=30.0"),
    ({"timeout": float("nan")}, ValueError,
     "timeout=nan is not valid: expected None or a finite number of seconds > 0; "
     "e.g. timeout=30.0"),
    ({"timeout": True}, TypeError,
     "timeout=True is not valid: expected None or a finite number of seconds > 0; "
     "e.g. timeout=30.0"),
    ({"drain": -1}, ValueError,
     "drain=-1 is not valid: expected a finite number of seconds >= 0; "
     "e.g. drain=0 (cancel running attempts at once)"),
    ({"drain": float("nan")}, ValueError,
     "drain=nan is not valid: expected a finite number of seconds >= 0; e.g. drain=0"),
    ({"drain": float("inf")}, ValueError,
     "drain=inf is not valid: expected a finite number of seconds >= 0; e.g. drain=0"),
    ({"drain": "5"}, TypeError,
     "drain='5' is not valid: expected a finite number of seconds >= 0; e.g. drain=5.0"),
    ({"retry": 3}, TypeError, "retry=3 is not valid: expected a conveyor.Retry or None; "
                              "e.g. retry=conveyor.Retry(attempts=3)"),
    ({"retry": "yes"}, TypeError, "retry='yes' is not valid: expected a conveyor.Retry or None; "
                                  "e.g. retry=conveyor.Retry(attempts=3)"),
    ({"buffer": 1.5}, TypeError,
     "buffer=1.5 is not valid: expected an int >= 0 or None; e.g. buffer=1"),
]


@pytest.mark.parametrize(("options", "kind", "message"), BAD_OPTIONS)
async def test_bad_options_refused_before_work(
    options: dict[str, Any], kind: type[Exception], message: str
) -> None:
    CALLED.clear()
    with pytest.raises(kind, match=re.escape(message)):
        await conveyor.run(task, [1, 2], **options)
    with pytest.raises(kind, match=re.escape(message)):
        conveyor.map(task, [1, 2], **options)
    with pytest.raises(kind, match=re.escape(message)) as caught:
        conveyor.open_pool(task, **options)
    assert CALLED == []
    # The suggested fix is accepted, by each entry point.
    fix = suggested_fix(str(caught.value))
    assert fix is not None and fix.keys() == options.keys()
    assert (await conveyor.run(task, [1, 2], **fix)).ok
    async with conveyor.map(task, [1, 2], **fix) as records:
        assert len([r async for r in records]) == 2
    async with conveyor.open_pool(task, **fix) as pool:
        await pool.submit(1)


async def fetch(client: dict[int, int], n: int) -> int:
    await trio.lowlevel.checkpoint()
    return client[n]


class AsyncCallableWithState:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    async def __call__(self, item: int) -> int:
        await trio.lowlevel.checkpoint()
        return item + self.offset


async def _values(fn: Any, items: list[Any]) -> list[Any]:
    report = await conveyor.run(fn, items)
    assert not report.failed and not report.unfinished
    return sorted(record.value for record in report.succeeded)


async def test_any_callable_that_returns_an_awaitable_is_accepted_and_works() -> None:
    client = {1: 10, 2: 20}
    # A plain lambda around an async function: not recognisably async, yet valid.
    assert await _values(lambda n: fetch(client, n), [1, 2]) == [10, 20]
    assert await _values(functools.partial(fetch, client), [1, 2]) == [10, 20]
    assert await _values(AsyncCallableWithState(5), [1, 2]) == [6, 7]
    assert await _values(functools.partial(AsyncCallableWithState(5)), [1, 2]) == [6, 7]
    assert await _values(functools.partial(functools.partial(fetch), client), [1]) == [10]
    # The same through map and open_pool: accepted at the call.
    async with conveyor.map(lambda n: fetch(client, n), [1, 2]) as records:
        assert sorted([r.unwrap() async for r in records]) == [10, 20]
    async with conveyor.open_pool(AsyncCallableWithState(1)) as pool:
        await pool.submit(1)
    assert [r.value for r in pool.report().succeeded] == [2]


def test_a_plain_function_is_accepted_at_the_call() -> None:
    # Whether it returns an awaitable is known only once it is called: the pool handles an
    # item whose call returns something else (not this check).
    conveyor.open_pool(sync_task)
    conveyor.map(sync_task, [1])
    conveyor.open_pool(print)


async def test_not_callable_refused() -> None:
    for bad in (42, None, "fetch", [task]):
        with pytest.raises(TypeError, match=r"^fn=.* is not valid: expected an async callable "
                                            r"\(async def fn\(item\), or a callable that "
                                            r"returns an awaitable\); e\.g\. async def fn\(item\): "
                                            r"return await fetch\(item\)$"):
            conveyor.open_pool(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^fn=.* is not valid: expected an async callable"):
            conveyor.map(bad, [1])  # type: ignore[arg-type]

    async def fn(item: Any) -> Any:  # the suggested fix, with a fetch of its own
        return await fetch({1: 10}, item)

    assert await _values(fn, [1]) == [10]


async def test_a_class_is_refused_and_the_advice_works() -> None:
    with pytest.raises(TypeError, match=re.escape(
        "fn=AsyncCallableWithState is not valid: expected an async callable (async def "
        "fn(item), or a callable that returns an awaitable), not a class: calling "
        "AsyncCallableWithState makes an instance, not an awaitable; e.g. "
        "fn=AsyncCallableWithState(...) (an instance: its __call__ is async)"
    )):
        await conveyor.run(AsyncCallableWithState, [1])  # type: ignore[arg-type]
    assert await _values(AsyncCallableWithState(0), [1]) == [1]  # the advice

    with pytest.raises(TypeError, match=re.escape(
        "fn=int is not valid: expected an async callable (async def fn(item), or a callable "
        "that returns an awaitable), not a class: calling int makes an instance, not an "
        "awaitable; e.g. fn=conveyor.in_thread(int) to call it off the event loop, or call it "
        "in an async function: async def fn(item): return int(item)"
    )):
        conveyor.open_pool(int)  # type: ignore[arg-type]

    async def fn(item: Any) -> int:  # the second advice
        return int(item)

    assert await _values(fn, ["1", "2"]) == [1, 2]
    assert await _values(conveyor.in_thread(int), ["1", "2"]) == [1, 2]  # the other


async def numbers(item: int) -> Any:
    for i in range(item):
        yield i


class AsyncGenCallable:
    async def __call__(self, item: int) -> Any:
        yield item


async def test_an_async_generator_function_is_refused_and_the_advice_works() -> None:
    message = (
        "fn=numbers is not valid: expected a callable that returns an awaitable, not the async "
        "generator function 'numbers', which yields values instead of returning one; e.g. use "
        "`return` instead of `yield`, or collect what it yields: async def fn(item): return "
        "[x async for x in numbers(item)]"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        await conveyor.run(numbers, [3])
    with pytest.raises(TypeError, match=re.escape(message)):
        conveyor.map(numbers, [3])

    async def fn(item: int) -> list[int]:  # the advice, as given
        return [x async for x in numbers(item)]

    assert await _values(fn, [3]) == [[0, 1, 2]]

    # Through a partial or an object: the advice names it f.
    f = functools.partial(numbers)
    with pytest.raises(TypeError, match=re.escape(
        "async def fn(item): return [x async for x in f(item)] with f = the "
        "functools.partial(numbers, ...) you passed"
    )):
        conveyor.open_pool(f)

    async def fn2(item: int) -> list[int]:
        return [x async for x in f(item)]

    assert await _values(fn2, [2]) == [[0, 1]]
    with pytest.raises(TypeError, match="async generator function 'AsyncGenCallable object'"):
        conveyor.open_pool(AsyncGenCallable())


def test_check_sync_callable_refuses_async_forms_and_accepts_plain_ones() -> None:
    from conveyor._options import check_sync_callable, is_async_callable

    async def predicate(error: Exception) -> bool:
        return False

    for async_form in (predicate, functools.partial(predicate), AsyncCallable(),
                       functools.partial(AsyncCallable()), numbers):
        assert is_async_callable(async_form)
        with pytest.raises(TypeError, match=(
            r"^key=.* is not valid: expected an item -> key, written as a plain `def` \(not "
            r"`async def`\): conveyor calls it without awaiting it, so an async function's "
            r"coroutine would never run; e\.g\. key=str$"
        )):
            check_sync_callable("key", async_form, "an item -> key")
    for plain in (sync_task, str, len, functools.partial(sync_task), lambda e: e):
        assert not is_async_callable(plain)
        check_sync_callable("key", plain, "an item -> key")
    with pytest.raises(TypeError, match=r"^key=5 is not valid: expected an item -> key; "
                                        r"e\.g\. key=str$"):
        check_sync_callable("key", 5, "an item -> key")
    # The old "owner param" name: the owner goes before the colon.
    with pytest.raises(TypeError, match=r"^wait_stats: predicate=5 is not valid: expected a "
                                        r"function stats -> bool; e\.g\. predicate=lambda stats: "
                                        r"stats\.submitted >= 1$"):
        check_sync_callable("wait_stats predicate", 5, "a function stats -> bool")


async def test_items_not_iterable() -> None:
    with pytest.raises(TypeError, match=re.escape(
        "items=5 is not valid: expected an iterable or an async iterable; "
        "e.g. items=[5] (a single item)"
    )) as caught:
        await conveyor.run(task, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^items=None is not valid: expected an iterable or an "):
        conveyor.map(task, None)  # type: ignore[arg-type]
    fix = suggested_fix(str(caught.value))
    assert fix == {"items": [5]}
    assert (await conveyor.run(task, **fix)).values() == [5]


async def test_map_window() -> None:
    with pytest.raises(ValueError, match=re.escape(
        "window=0 is not valid: expected an int >= 1 or None; e.g. window=1"
    )) as caught:
        conveyor.map(task, [1], ordered=True, window=0)
    assert suggested_fix(str(caught.value)) == {"window": 1}
    async with conveyor.map(task, [1], ordered=True, window=1) as records:
        assert [r.unwrap() async for r in records] == [1]
    with pytest.raises(ValueError, match=re.escape(
        "window=4 is not valid: expected None when ordered=False (the window bounds how far "
        "past the oldest unsettled item an ordered map runs); e.g. ordered=True, window=4"
    )) as caught:
        conveyor.map(task, [1], window=4)
    fix = suggested_fix(str(caught.value))
    assert fix == {"ordered": True, "window": 4}
    async with conveyor.map(task, [1, 2], **fix) as records:
        assert [r.unwrap() async for r in records] == [1, 2]
    with pytest.raises(TypeError, match=re.escape(
        "ordered='yes' is not valid: expected True or False; e.g. ordered=True"
    )):
        conveyor.map(task, [1], ordered="yes")  # type: ignore[arg-type]


def _delay(delay: Any = 0, message: Any = "") -> conveyor.RetryAfter:
    return conveyor.RetryAfter(delay, message)


@pytest.mark.parametrize(
    ("make", "kwargs", "kind", "message"),
    [
        (Retry, {"attempts": 0}, ValueError,
         "Retry: attempts=0 is not valid: expected an int >= 1 (the first attempt counts); "
         "e.g. attempts=1"),
        (Retry, {"attempts": 1.5}, TypeError,
         "Retry: attempts=1.5 is not valid: expected an int >= 1 (the first attempt counts); "
         "e.g. attempts=1"),
        (Retry, {"retry_on": int}, TypeError,
         "Retry: retry_on=int is not valid: expected an exception class, a tuple of them, or a "
         "predicate f(exc) -> bool (int is not an exception class); "
         "e.g. retry_on=(TimeoutError, ConnectionError)"),
        (Retry, {"retry_on": (ValueError, "x")}, TypeError,
         "Retry: retry_on=(<class 'ValueError'>, 'x') is not valid: expected an exception "
         "class, a tuple of them, or a predicate f(exc) -> bool ('x' in the tuple is not an "
         "exception class); e.g. retry_on=(TimeoutError, ConnectionError)"),
        (Retry, {"retry_on": ()}, ValueError,
         "Retry: retry_on=() is not valid: expected an exception class, a tuple of them, or a "
         "predicate f(exc) -> bool, not an empty tuple; e.g. retry_on=(TimeoutError, "
         "ConnectionError) (for no retries: retry=conveyor.Retry(attempts=1), or retry=None)"),
        (Retry, {"retry_on": 5}, TypeError,
         "Retry: retry_on=5 is not valid: expected an exception class, a tuple of them, or a "
         "predicate f(exc) -> bool; e.g. retry_on=(TimeoutError, ConnectionError)"),
        (Retry, {"backoff": 1.0}, TypeError,
         "Retry: backoff=1.0 is not valid: expected a conveyor.Backoff or None; "
         "e.g. backoff=conveyor.Backoff(initial=1.0)"),
        (Retry, {"max_retry_after": -1}, ValueError,
         "Retry: max_retry_after=-1 is not valid: expected a finite number of seconds >= 0 "
         "(or None: the backoff's max); e.g. max_retry_after=60.0"),
        (Retry, {"max_retry_after": float("inf")}, ValueError,
         "Retry: max_retry_after=inf is not valid: expected a finite number of seconds >= 0"),
        (Retry, {"max_retry_after": True}, TypeError,
         "Retry: max_retry_after=True is not valid: expected a finite number of seconds >= 0"),
        (Backoff, {"initial": -1}, ValueError,
         "Backoff: initial=-1 is not valid: expected a finite number of seconds >= 0; "
         "e.g. initial=0.1"),
        (Backoff, {"initial": float("inf")}, ValueError,
         "Backoff: initial=inf is not valid: expected a finite number of seconds >= 0"),
        (Backoff, {"initial": float("nan")}, ValueError,
         "Backoff: initial=nan is not valid: expected a finite number of seconds >= 0"),
        (Backoff, {"initial": 10**400}, ValueError,
         "Backoff: initial=" + "1" + "0" * 56 + "... is not valid: expected a finite number "
         "of seconds >= 0; e.g. initial=0.1"),
        (Backoff, {"initial": True}, TypeError,
         "Backoff: initial=True is not valid: expected a finite number of seconds >= 0"),
        (Backoff, {"factor": 0.5}, ValueError,
         "Backoff: factor=0.5 is not valid: expected a finite number >= 1; e.g. factor=2.0"),
        (Backoff, {"factor": float("inf")}, ValueError,
         "Backoff: factor=inf is not valid: expected a finite number >= 1; e.g. factor=2.0"),
        (Backoff, {"initial": 2, "max": 1}, ValueError,
         "Backoff: max=1 is not valid: expected a finite number of seconds >= initial (2); "
         "e.g. max=30.0"),
        (Backoff, {"initial": 40, "max": 1}, ValueError,
         "Backoff: max=1 is not valid: expected a finite number of seconds >= initial (40); "
         "e.g. max=40"),
        (Backoff, {"max": float("inf")}, ValueError,
         "Backoff: max=inf is not valid: expected a finite number of seconds >= initial (0.1); "
         "e.g. max=30.0"),
        (Backoff, {"jitter": "half"}, ValueError,
         "Backoff: jitter='half' is not valid: expected one of 'full', 'equal' or None; "
         "e.g. jitter='full'"),
        (Backoff, {"jitter": ["full"]}, ValueError,
         "Backoff: jitter=['full'] is not valid: expected one of 'full', 'equal' or None"),
        (Backoff, {"seed": 1.5}, TypeError,
         "Backoff: seed=1.5 is not valid: expected an int or None; e.g. seed=42"),
        (_delay, {"delay": -1}, ValueError,
         "RetryAfter: delay=-1 is not valid: expected a finite number of seconds >= 0; "
         "e.g. delay=1.0"),
        (_delay, {"delay": True}, TypeError,
         "RetryAfter: delay=True is not valid: expected a finite number of seconds >= 0"),
        (_delay, {"delay": float("inf")}, ValueError,
         "RetryAfter: delay=inf is not valid: expected a finite number of seconds >= 0"),
        (_delay, {"delay": "5"}, TypeError,
         "RetryAfter: delay='5' is not valid: expected a finite number of seconds >= 0; "
         "e.g. delay=5.0"),
        (_delay, {"delay": 1, "message": 5}, TypeError,
         "RetryAfter: message=5 is not valid: expected a str; e.g. message='rate limited'"),
    ],
)
def test_bad_retry_policies(
    make: Any, kwargs: dict[str, Any], kind: type[Exception], message: str
) -> None:
    with pytest.raises(kind, match=re.escape(message)) as caught:
        make(**kwargs)
    fix = suggested_fix(str(caught.value))  # and the suggested fix is accepted
    assert fix is not None and fix.keys() <= kwargs.keys()
    make(**{**kwargs, **fix})


async def test_submit_outside_block_and_after_close() -> None:
    pool_cm = conveyor.open_pool(task)
    async with pool_cm as pool:
        pool.close()
        with pytest.raises(trio.ClosedResourceError, match="close"):
            await pool.submit(1)
        with pytest.raises(trio.ClosedResourceError):
            pool.submit_nowait(1)
    with pytest.raises(trio.ClosedResourceError):
        await pool.submit(1)


async def test_map_stream_iterates_once() -> None:
    stream = conveyor.map(task, [1])
    assert [r.unwrap() async for r in stream] == [1]
    with pytest.raises(RuntimeError, match="iterated once"):
        async for _ in stream:
            pass
