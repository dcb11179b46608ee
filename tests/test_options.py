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
    ({"timeout": 0}, ValueError, "timeout must be None or a number of seconds > 0, got 0"),
    ({"timeout": -1.5}, ValueError, "timeout must be None or a number of seconds > 0, got -1.5"),
    ({"timeout": "1"}, TypeError, "timeout must be None or a number of seconds > 0, got '1'"),
    ({"drain": -1}, ValueError, "drain must be a number of seconds >= 0, got -1"),
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


def test_plain_function_refused_with_the_fix() -> None:
    message = (
        "fn must be an async function (async def fn(item)), got the plain function "
        "'sync_task'; wrap a sync function with conveyor.in_thread(sync_task) for blocking "
        "I/O or conveyor.in_process(sync_task) for CPU-heavy work"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        conveyor.open_pool(sync_task)
    with pytest.raises(TypeError, match="plain function 'sync_task'"):
        conveyor.map(sync_task, [1])
    with pytest.raises(TypeError, match=r"conveyor\.in_thread"):
        conveyor.open_pool(lambda x: x)
    with pytest.raises(TypeError, match="got 42"):
        conveyor.open_pool(42)  # type: ignore[arg-type]


def test_async_callables_accepted() -> None:
    conveyor.open_pool(functools.partial(task))
    conveyor.open_pool(AsyncCallable())
    conveyor.map(task, [1])


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
         "Retry retry_on must be exception classes or a predicate, got the class int"),
        (lambda: Retry(retry_on=(ValueError, "x")), TypeError,
         "Retry retry_on must be exception classes or a predicate, got 'x' in the tuple"),
        (lambda: Retry(retry_on=5), TypeError,
         "Retry retry_on must be exception classes or a predicate, got 5"),
        (lambda: Retry(backoff=1.0), TypeError,
         "Retry backoff must be a conveyor.Backoff or None, got 1.0"),
        (lambda: Backoff(initial=-1), ValueError, "Backoff initial must be a number >= 0, got -1"),
        (lambda: Backoff(factor=0.5), ValueError, "Backoff factor must be a number >= 1, got 0.5"),
        (lambda: Backoff(initial=2, max=1), ValueError,
         "Backoff max must be a number >= initial (2), got 1"),
        (lambda: Backoff(jitter="half"), ValueError,
         "Backoff jitter must be 'full', 'equal' or None, got 'half'"),
        (lambda: conveyor.RetryAfter(-1), ValueError,
         "RetryAfter delay must be a finite number >= 0, got -1"),
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
