"""Argument checks shared by run, map and open_pool: bad input is refused at the call.

Each message names the parameter and its valid range, so the user can fix the call
without reading the source.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import AsyncIterable, Iterable
from typing import Any

from ._retry import Retry

__all__ = ["check_drain", "check_fn", "check_items", "check_options"]


def check_fn(fn: object) -> None:
    """Refuse anything that is not an async callable, pointing sync functions to the fix."""
    if not callable(fn):
        raise TypeError(f"fn must be an async function (async def fn(item)), got {fn!r}")
    if _is_async_callable(fn):
        return
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    raise TypeError(
        f"fn must be an async function (async def fn(item)), got the plain function {name!r}; "
        f"wrap a sync function with conveyor.in_thread({name}) for blocking I/O or "
        f"conveyor.in_process({name}) for CPU-heavy work"
    )


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return False
    if isinstance(fn, type):
        return False
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return call is not None and inspect.iscoroutinefunction(call)


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
    _int_at_least("workers", workers, 1)
    if buffer is not None:
        _int_at_least("buffer", buffer, 0)
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be a conveyor.Retry or None, got {retry!r}")
    if timeout is not None:
        _positive("timeout", timeout, "None or a number of seconds > 0")
    check_drain(drain)


def check_drain(drain: Any) -> None:
    """``drain`` is a number of seconds >= 0."""
    if isinstance(drain, bool) or not isinstance(drain, int | float) or math.isnan(drain):
        raise TypeError(f"drain must be a number of seconds >= 0, got {drain!r}")
    if drain < 0:
        raise ValueError(f"drain must be a number of seconds >= 0, got {drain!r}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _positive(name: str, value: Any, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be {valid}, got {value!r}")
