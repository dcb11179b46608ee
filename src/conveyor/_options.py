"""Argument checks shared by run, map and open_pool: bad input is refused at the call.

Each message names the parameter and its valid range, so the user can fix the call
without reading the source.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

__all__ = [
    "check_drain",
    "check_fn",
    "check_items",
    "check_options",
    "check_sync_callable",
    "describe_callable",
    "is_async_callable",
]


def check_fn(fn: object) -> None:
    """Refuse only what is surely not a task function; accept every other callable.

    A task function is any callable that returns an awaitable: an ``async def``, a
    ``functools.partial`` of one, an object whose ``__call__`` is ``async def``, or a plain
    function that returns a coroutine (``lambda n: fetch(client, n)``). Which of those a
    plain callable is cannot be known before it is called, so it is accepted here; the pool
    fails an item whose call returns something that is not awaitable. Refused: what is not
    callable, a class, an async generator function (it yields; it does not return a value).
    """
    if isinstance(fn, type):
        name = fn.__qualname__
        if is_async_callable(fn.__call__):
            fix = f"pass an instance: {name}(...) (its __call__ is async)"
        else:
            fix = (f"call it in an async function (async def fn(item): return {name}(item)), "
                   f"or off the event loop with conveyor.in_thread({name})")
        raise TypeError(f"fn must be an async callable (async def fn(item)), got the class "
                        f"{name!r}, whose call makes an instance, not an awaitable; {fix}")
    if not callable(fn):
        raise TypeError(
            f"fn must be an async callable (async def fn(item), or a callable that returns "
            f"an awaitable), got {fn!r:.60}"
        )
    if _is_async_generator_callable(fn):
        name = describe_callable(fn)
        plain = inspect.isasyncgenfunction(fn) and getattr(fn, "__name__", "") == name
        call = f"{name}(item)" if plain else f"f(item)]` with f = the {name} you passed"
        raise TypeError(
            f"fn must return an awaitable, got the async generator function {name!r}, which "
            f"yields values instead of returning one; use `return` instead of `yield`, or "
            f"collect what it yields: `async def fn(item): return [x async for x in "
            f"{call}" + ("]`" if plain else "")
        )


def check_sync_callable(name: str, value: object, what: str) -> None:
    """Refuse ``value`` unless it is a plain (sync) callable: a predicate or a key function.

    An ``async def`` there would be called and never awaited, and its coroutine object would
    count as true (or as a key of its own): refused at the call. ``what`` says what is
    meant, for the message (e.g. ``"a predicate f(exc) -> bool"``).
    """
    if not callable(value):
        raise TypeError(f"{name} must be {what}, got {value!r:.60}")
    if is_async_callable(value):
        described = describe_callable(value)
        raise TypeError(
            f"{name} must be {what}, a plain (sync) callable, got the async function "
            f"{described!r}: conveyor calls it without awaiting it, so its coroutine would "
            f"never run; write it as a plain `def` (no `async`)"
        )


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` surely gives a coroutine or an async generator.

    Sees through ``functools.partial`` and looks at a callable object's ``__call__``; a
    plain function that returns a coroutine (a lambda around an ``async def``) is not
    recognisable here.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    if isinstance(fn, type):
        return False
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return call is not None and (
        inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    )


def _is_async_generator_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isasyncgenfunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return call is not None and inspect.isasyncgenfunction(call)


def describe_callable(fn: object) -> str:
    """A callable's name for messages: its qualified name, through partials."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if not isinstance(name, str):
        name = type(target).__qualname__ + " object"
    return f"functools.partial({name}, ...)" if target is not fn else name


def check_items(items: object) -> None:
    """Refuse ``items`` that is neither an iterable nor an async iterable, or is a string.

    A ``str`` or ``bytes`` is iterable, but as one item per character (or per int) it is
    never what was meant.
    """
    if isinstance(items, str | bytes | bytearray | memoryview):
        raise TypeError(
            f"items must be an iterable of items, got the {type(items).__name__} "
            f"{items!r:.60}, which would be processed one character at a time; "
            f"pass [{items!r:.40}] for a single item"
        )
    if isinstance(items, AsyncIterable | Iterable):
        return
    raise TypeError(
        f"items must be an iterable or an async iterable, got {type(items).__name__} "
        f"{items!r:.60}"
    )


def check_options(
    *, workers: Any, buffer: Any, retry: Any, timeout: Any, drain: Any
) -> None:
    """Check the pool options common to run, map and open_pool."""
    from ._retry import Retry  # here: _retry imports this module's checks

    _int_at_least("workers", workers, 1)
    if buffer is not None:
        _int_at_least("buffer", buffer, 0)
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be a conveyor.Retry or None, got {retry!r}")
    if timeout is not None:
        _finite("timeout", timeout, "None or a finite number of seconds > 0",
                lambda v: v > 0)
    check_drain(drain)


def check_drain(drain: Any) -> None:
    """``drain`` is a finite number of seconds >= 0 (not a bool, not NaN)."""
    _finite("drain", drain, "a finite number of seconds >= 0", lambda v: v >= 0)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r:.60}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _finite(name: str, value: Any, valid: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {valid}, got {value!r:.60}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or not ok(number):
        raise ValueError(f"{name} must be {valid}, got {value!r:.60}")
