"""Bad input is refused at the call, before any work starts, with a message that names the
parameter and its valid range (messages pinned here)."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
import trio

import conveyor
from conveyor import Backoff, Retry

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
    ({"workers": 0}, ValueError, "workers must be an int >= 1, got 0"),
    ({"workers": -3}, ValueError, "workers must be an int >= 1, got -3"),
    ({"workers": 2.5}, TypeError, "workers must be an int >= 1, got 2.5"),
    ({"workers": True}, TypeError, "workers must be an int >= 1, got True"),
    ({"buffer": -1}, ValueError, "buffer must be an int >= 0, got -1"),
    ({"timeout": 0}, ValueError,
     "timeout must be None or a finite number of seconds > 0, got 0"),
    ({"timeout": -1.5}, ValueError,
     "timeout must be None or a finite number of seconds > 0, got -1.5"),
    ({"timeout": "1"}, TypeError,
     "timeout must be None or a finite number of seconds > 0, got '1'"),
    ({"timeout": float("inf")}, ValueError,
     "timeout must be None or a finite number of seconds > 0, got inf"),
    ({"timeout": float("nan")}, ValueError,
     "timeout must be None or a finite number of seconds > 0, got nan"),
    ({"timeout": True}, TypeError, "timeout must be None or a finite number of seconds > 0"),
    ({"drain": -1}, ValueError, "drain must be a finite number of seconds >= 0, got -1"),
    ({"drain": float("nan")}, ValueError,
     "drain must be a finite number of seconds >= 0, got nan"),
    ({"drain": float("inf")}, ValueError,
     "drain must be a finite number of seconds >= 0, got inf"),
    ({"drain": "5"}, TypeError, "drain must be a finite number of seconds >= 0, got '5'"),
    ({"retry": 3}, TypeError, "retry must be a conveyor.Retry or None, got 3"),
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
    with pytest.raises(kind, match=re.escape(message)):
        conveyor.open_pool(task, **options)
    assert CALLED == []


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


def test_not_callable_refused() -> None:
    for bad in (42, None, "fetch", [task]):
        with pytest.raises(TypeError, match=r"^fn must be an async callable \(async def"):
            conveyor.open_pool(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^fn must be an async callable"):
            conveyor.map(bad, [1])  # type: ignore[arg-type]


async def test_a_class_is_refused_and_the_advice_works() -> None:
    with pytest.raises(TypeError, match=re.escape(
        "fn must be an async callable (async def fn(item)), got the class "
        "'AsyncCallableWithState', whose call makes an instance, not an awaitable; pass an "
        "instance: AsyncCallableWithState(...) (its __call__ is async)"
    )):
        await conveyor.run(AsyncCallableWithState, [1])  # type: ignore[arg-type]
    assert await _values(AsyncCallableWithState(0), [1]) == [1]  # the advice

    with pytest.raises(TypeError, match=re.escape(
        "got the class 'int', whose call makes an instance, not an awaitable; call it in an "
        "async function (async def fn(item): return int(item)), or off the event loop with "
        "conveyor.in_thread(int)"
    )):
        conveyor.open_pool(int)  # type: ignore[arg-type]

    async def fn(item: Any) -> int:  # the first advice
        return int(item)

    assert await _values(fn, ["1", "2"]) == [1, 2]
    assert await _values(conveyor.in_thread(int), ["1", "2"]) == [1, 2]  # the second


async def numbers(item: int) -> Any:
    for i in range(item):
        yield i


class AsyncGenCallable:
    async def __call__(self, item: int) -> Any:
        yield item


async def test_an_async_generator_function_is_refused_and_the_advice_works() -> None:
    message = (
        "fn must return an awaitable, got the async generator function 'numbers', which "
        "yields values instead of returning one; use `return` instead of `yield`, or collect "
        "what it yields: `async def fn(item): return [x async for x in numbers(item)]`"
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
        "`async def fn(item): return [x async for x in f(item)]` with f = the "
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
            r"^key must be an item -> key, a plain \(sync\) callable, got the async function "
            r".*: conveyor calls it without awaiting it, so its coroutine would never run; "
            r"write it as a plain `def` \(no `async`\)$"
        )):
            check_sync_callable("key", async_form, "an item -> key")
    for plain in (sync_task, str, len, functools.partial(sync_task), lambda e: e):
        assert not is_async_callable(plain)
        check_sync_callable("key", plain, "an item -> key")
    with pytest.raises(TypeError, match=r"^key must be an item -> key, got 5$"):
        check_sync_callable("key", 5, "an item -> key")


async def test_items_not_iterable() -> None:
    with pytest.raises(TypeError, match="items must be an iterable or an async iterable, got int"):
        await conveyor.run(task, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="items must be an iterable or an async iterable"):
        conveyor.map(task, None)  # type: ignore[arg-type]


def test_map_window() -> None:
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        conveyor.map(task, [1], ordered=True, window=0)
    with pytest.raises(ValueError, match="window only applies to ordered=True"):
        conveyor.map(task, [1], window=4)


@pytest.mark.parametrize(
    ("make", "kind", "message"),
    [
        (lambda: Retry(attempts=0), ValueError,
         "Retry attempts must be >= 1 (the first attempt counts), got 0"),
        (lambda: Retry(attempts=1.5), TypeError, "Retry attempts must be an int >= 1, got 1.5"),
        (lambda: Retry(retry_on=int), TypeError,
         "Retry retry_on must be exception classes or a predicate f(exc) -> bool, "
         "got the class int"),
        (lambda: Retry(retry_on=(ValueError, "x")), TypeError,
         "Retry retry_on must be exception classes or a predicate f(exc) -> bool, "
         "got 'x' in the tuple"),
        (lambda: Retry(retry_on=()), ValueError,
         "Retry retry_on must be exception classes or a predicate f(exc) -> bool, got an "
         "empty tuple (for no retries: Retry(attempts=1) or retry=None)"),
        (lambda: Retry(retry_on=5), TypeError,
         "Retry retry_on must be exception classes or a predicate f(exc) -> bool, got 5"),
        (lambda: Retry(backoff=1.0), TypeError,
         "Retry backoff must be a conveyor.Backoff or None, got 1.0"),
        (lambda: Retry(max_retry_after=-1), ValueError,
         "Retry max_retry_after must be a finite number of seconds >= 0 (or None: the "
         "backoff's max), got -1"),
        (lambda: Retry(max_retry_after=float("inf")), ValueError,
         "Retry max_retry_after must be a finite number of seconds >= 0"),
        (lambda: Retry(max_retry_after=True), TypeError,
         "Retry max_retry_after must be a finite number of seconds >= 0"),
        (lambda: Backoff(initial=-1), ValueError,
         "Backoff initial must be a finite number of seconds >= 0, got -1"),
        (lambda: Backoff(initial=float("inf")), ValueError,
         "Backoff initial must be a finite number of seconds >= 0, got inf"),
        (lambda: Backoff(initial=float("nan")), ValueError,
         "Backoff initial must be a finite number of seconds >= 0, got nan"),
        (lambda: Backoff(initial=10**400), ValueError,
         "Backoff initial must be a finite number of seconds >= 0, got 1000000"),
        (lambda: Backoff(initial=True), TypeError,
         "Backoff initial must be a finite number of seconds >= 0, got True"),
        (lambda: Backoff(factor=0.5), ValueError,
         "Backoff factor must be a finite number >= 1, got 0.5"),
        (lambda: Backoff(factor=float("inf")), ValueError,
         "Backoff factor must be a finite number >= 1, got inf"),
        (lambda: Backoff(initial=2, max=1), ValueError,
         "Backoff max must be a finite number of seconds >= initial (2), got 1"),
        (lambda: Backoff(max=float("inf")), ValueError,
         "Backoff max must be a finite number of seconds >= initial (0.1), got inf"),
        (lambda: Backoff(jitter="half"), ValueError,
         "Backoff jitter must be 'full', 'equal' or None, got 'half'"),
        (lambda: Backoff(jitter=["full"]), ValueError,
         "Backoff jitter must be 'full', 'equal' or None, got ['full']"),
        (lambda: Backoff(seed=1.5), TypeError, "Backoff seed must be an int or None, got 1.5"),
        (lambda: conveyor.RetryAfter(-1), ValueError,
         "RetryAfter delay must be a finite number of seconds >= 0, got -1"),
        (lambda: conveyor.RetryAfter(True), TypeError,
         "RetryAfter delay must be a finite number of seconds >= 0, got True"),
        (lambda: conveyor.RetryAfter(float("inf")), ValueError,
         "RetryAfter delay must be a finite number of seconds >= 0, got inf"),
        (lambda: conveyor.RetryAfter("5"), TypeError,
         "RetryAfter delay must be a finite number of seconds >= 0, got '5'"),
        (lambda: conveyor.RetryAfter(1, 5), TypeError, "RetryAfter message must be a str, got 5"),
    ],
)
def test_bad_retry_policies(make: Any, kind: type[Exception], message: str) -> None:
    with pytest.raises(kind, match=re.escape(message)):
        make()


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
