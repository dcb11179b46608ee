"""Every parameter check, and the one shape of their messages: bad input is refused at the call.

A refused parameter raises :class:`TypeError` (the wrong kind of value: a str where a number
is meant, a bool where a count is meant, an async function where a plain one is meant) or
:class:`ValueError` (the right kind, out of range: NaN, inf, a negative count), with one
message shape::

    [Owner: ]param=value is not valid: expected WHAT; e.g. FIX

``Owner`` names the class or function whose parameter it is when that is not one of the
pool's options (``Retry: attempts=0 is not valid: ...``); ``value`` is the ``repr`` of what
was given (a callable by its name), cut at 60 characters; ``WHAT`` says what is valid;
``FIX`` is a working example, written as the corrected argument(s) (``attempts=3``) and
derived from the value where that helps (``workers=2.5`` suggests ``workers=2``, ``rate=10``
suggests ``rate=conveyor.Rate(10)``), sometimes followed by a note in parentheses. Only
``fn`` and ``f`` (the function a pool or a wrapper runs) may give prose instead, since
their fix is code to write, and ``items`` when the value's repr is not code
(``items=[item] (a single item)``). :data:`SHAPE` is the pattern; tests hold every message to it
and try every suggested fix.

The checks: :func:`check_count`, :func:`check_number` (and :func:`check_seconds`),
:func:`check_bool`, :func:`check_choice`, :func:`check_type`, :func:`check_callable` (and
its old name :func:`check_sync_callable`), all built on :func:`invalid`; and the checks of
the entry points, :func:`check_fn`, :func:`check_items`, :func:`check_options`,
:func:`check_drain`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import re
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any, Literal, overload

__all__ = [
    "SHAPE",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_count",
    "check_drain",
    "check_fn",
    "check_items",
    "check_number",
    "check_options",
    "check_seconds",
    "check_sync_callable",
    "check_type",
    "describe_callable",
    "invalid",
    "is_async_callable",
    "show",
]

SHAPE = re.compile(
    r"\A(?:(?P<owner>[\w.]+): )?(?P<param>\w+)=(?P<value>.*?) is not valid: "
    r"expected (?P<expected>.+?); e\.g\. (?P<fix>.+)\Z",
    re.DOTALL,
)
"""The one shape of every refusal's message; ``fix`` is the suggested correction."""

_SHOWN = 60  # the longest value shown in a message, in characters


# ------------------------------------------------------------------------------ the shape


def show(value: object) -> str:
    """A value as a message shows it: a callable or a class by its name, anything else by
    its ``repr``, cut to 60 characters (``...`` marks the cut)."""
    if isinstance(value, type | functools.partial) or inspect.isroutine(value):
        return describe_callable(value)
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ of the caller's object: still say what it is
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def invalid(
    name: str,
    value: object,
    expected: str,
    example: str,
    *,
    owner: str | None = None,
    kind: type[TypeError] | type[ValueError] = ValueError,
) -> TypeError | ValueError:
    """The refusal of ``name=value``, in the one shape (returned, for the caller to raise).

    ``expected`` says what is valid ("an int >= 1"); ``example`` is a fix, best as the
    corrected argument(s) (``"workers=10"``); ``owner`` names the class or function
    ("Retry") when ``name`` is not a pool option; ``kind`` is TypeError for a value of the
    wrong kind, ValueError (the default) for one out of range.
    """
    prefix = f"{owner}: " if owner else ""
    return kind(f"{prefix}{name}={show(value)} is not valid: expected {expected}; e.g. {example}")


# ------------------------------------------------------------------------------ the checks


@overload
def check_count(
    name: str, value: object, *, minimum: int = ..., maximum: int | None = ...,
    allow_none: Literal[False] = ..., owner: str | None = ..., example: str | None = ...,
    expected: str | None = ...,
) -> int: ...
@overload
def check_count(
    name: str, value: object, *, minimum: int = ..., maximum: int | None = ...,
    allow_none: bool, owner: str | None = ..., example: str | None = ...,
    expected: str | None = ...,
) -> int | None: ...
def check_count(
    name: str,
    value: object,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    allow_none: bool = False,
    owner: str | None = None,
    example: str | None = None,
    expected: str | None = None,
) -> int | None:
    """``value`` is an int (not a bool) in ``minimum..maximum`` (or None if ``allow_none``).

    The default example is the nearest valid count: the value clamped to the range, or a
    float's whole part (``workers=2.5`` suggests ``workers=2``), or a numeric str's number.
    """
    if value is None and allow_none:
        return None
    if expected is None:
        expected = f"an int >= {minimum}" if maximum is None else (
            f"an int in {minimum}..{maximum}"
        )
        if allow_none:
            expected += " or None"
    if isinstance(value, bool) or not isinstance(value, int):
        fix = example or f"{name}={_nearest_count(value, minimum, maximum)}"
        raise invalid(name, value, expected, fix, owner=owner, kind=TypeError)
    if value < minimum or (maximum is not None and value > maximum):
        fix = example or f"{name}={_nearest_count(value, minimum, maximum)}"
        raise invalid(name, value, expected, fix, owner=owner)
    return value


def _nearest_count(value: object, minimum: int, maximum: int | None) -> int:
    number: float = minimum
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            value = minimum
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = int(value)
        except (OverflowError, ValueError):  # inf, nan
            number = minimum if not value > 0 else (maximum or max(minimum, 1))
    count = max(minimum, int(number))
    return count if maximum is None else min(maximum, count)


@overload
def check_number(
    name: str, value: object, *, minimum: float | None = ..., above: float | None = ...,
    below: float | None = ..., allow_none: Literal[False] = ..., unit: str = ...,
    owner: str | None = ..., example: str, expected: str | None = ...,
) -> float: ...
@overload
def check_number(
    name: str, value: object, *, minimum: float | None = ..., above: float | None = ...,
    below: float | None = ..., allow_none: bool, unit: str = ...,
    owner: str | None = ..., example: str, expected: str | None = ...,
) -> float | None: ...
def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    allow_none: bool = False,
    unit: str = "",
    owner: str | None = None,
    example: str,
    expected: str | None = None,
) -> float | None:
    """``value`` is a finite int or float (not a bool, not NaN or inf), ``>= minimum``,
    ``> above`` and ``< below`` (each when given); None passes if ``allow_none``.

    Returns the value as a float (None stays None). ``unit`` ("seconds") goes in the
    default ``expected``: "a finite number of seconds > 0".
    """
    if value is None and allow_none:
        return None
    if expected is None:
        bounds = [f">= {minimum:g}" if minimum is not None else "",
                  f"> {above:g}" if above is not None else "",
                  f"< {below:g}" if below is not None else ""]
        expected = "a finite number" + (f" of {unit}" if unit else "")
        expected = " ".join([expected, " and ".join(b for b in bounds if b)]).rstrip()
        if allow_none:
            expected = "None or " + expected
    def valid(number: float) -> bool:
        return (math.isfinite(number)
                and (minimum is None or number >= minimum)
                and (above is None or number > above)
                and (below is None or number < below))

    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):  # timeout='5' suggests timeout=5.0, if that is valid
            try:
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if valid(number):
                    example = f"{name}={number!r}"
        raise invalid(name, value, expected, example, owner=owner, kind=TypeError)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not valid(number):
        raise invalid(name, value, expected, example, owner=owner)
    return number


@overload
def check_seconds(
    name: str, value: object, *, minimum: float | None = ..., above: float | None = ...,
    allow_none: Literal[False] = ..., owner: str | None = ..., example: str,
    expected: str | None = ...,
) -> float: ...
@overload
def check_seconds(
    name: str, value: object, *, minimum: float | None = ..., above: float | None = ...,
    allow_none: bool, owner: str | None = ..., example: str, expected: str | None = ...,
) -> float | None: ...
def check_seconds(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    above: float | None = None,
    allow_none: bool = False,
    owner: str | None = None,
    example: str,
    expected: str | None = None,
) -> float | None:
    """:func:`check_number` for a duration: "a finite number of seconds >= 0" and the like."""
    return check_number(name, value, minimum=minimum, above=above,
                        allow_none=allow_none, unit="seconds", owner=owner, example=example,
                        expected=expected)


def check_bool(
    name: str, value: object, *, allow_none: bool = False, owner: str | None = None,
    example: str | None = None,
) -> bool | None:
    """``value`` is True or False (or None if ``allow_none``): a truthy 1 or "yes" is not."""
    if value is True or value is False or (value is None and allow_none):
        return value
    expected = "True, False or None" if allow_none else "True or False"
    fix = example or f"{name}={bool(value) if isinstance(value, int | float) else True}"
    raise invalid(name, value, expected, fix, owner=owner, kind=TypeError)


def check_choice(
    name: str, value: object, choices: tuple[object, ...], *, owner: str | None = None,
) -> object:
    """``value`` is one of ``choices`` (compared with ``==``, hashable or not): a ValueError
    otherwise, suggesting the first choice."""
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return value
    listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
    raise invalid(name, value, f"one of {listed}", f"{name}={choices[0]!r}", owner=owner)


def check_type(
    name: str,
    value: object,
    kind: type | tuple[type, ...],
    expected: str,
    example: str,
    *,
    allow_none: bool = False,
    owner: str | None = None,
) -> Any:
    """``value`` is an instance of ``kind`` (or None if ``allow_none``): a TypeError
    otherwise. ``expected`` names the kind for people ("a conveyor.Retry or None")."""
    if (value is None and allow_none) or isinstance(value, kind):
        return value
    raise invalid(name, value, expected, example, owner=owner, kind=TypeError)


def check_callable(
    name: str,
    value: object,
    what: str,
    example: str,
    *,
    owner: str | None = None,
) -> Callable[..., Any]:
    """Refuse ``value`` unless it is a plain (sync) callable: a predicate or a key function.

    An ``async def`` there would be called and never awaited, and its coroutine object would
    count as true (or as a key of its own): refused at the call. ``what`` says what is
    meant ("a predicate f(exc) -> bool"); ``example`` is a plain one (``"key=str"``).
    """
    if not callable(value):
        raise invalid(name, value, what, example, owner=owner, kind=TypeError)
    if is_async_callable(value):
        raise invalid(
            name, value,
            f"{what}, written as a plain `def` (not `async def`): conveyor calls it without "
            f"awaiting it, so an async function's coroutine would never run",
            example, owner=owner, kind=TypeError,
        )
    return value


# Examples for check_sync_callable's callers that give none, by parameter name.
_CALLABLE_EXAMPLES = {
    "predicate": "predicate=lambda stats: stats.submitted >= 1",
    "key": "key=str",
}


def check_sync_callable(name: str, value: object, what: str, example: str | None = None) -> None:
    """:func:`check_callable` under its old signature (``name`` may be ``"owner param"``,
    e.g. ``"wait_stats predicate"``)."""
    owner, _, param = name.rpartition(" ")
    owner = owner.rstrip(":")
    if example is None:
        example = _CALLABLE_EXAMPLES.get(param, f"{param}=lambda x: x")
    check_callable(param, value, what, example, owner=owner or None)


# ---------------------------------------------------------------------- the entry points


def check_fn(fn: object) -> None:
    """Refuse only what is surely not a task function; accept every other callable.

    A task function is any callable that returns an awaitable: an ``async def``, a
    ``functools.partial`` of one, an object whose ``__call__`` is ``async def``, or a plain
    function that returns a coroutine (``lambda n: fetch(client, n)``). Which of those a
    plain callable is cannot be known before it is called, so it is accepted here; the pool
    fails an item whose call returns something that is not awaitable. Refused: what is not
    callable, a class, an async generator function (it yields; it does not return a value).
    """
    expected = "an async callable (async def fn(item), or a callable that returns an awaitable)"
    if isinstance(fn, type):
        name = fn.__qualname__
        if is_async_callable(fn.__call__):
            fix = f"fn={name}(...) (an instance: its __call__ is async)"
        else:
            fix = (f"fn=conveyor.in_thread({name}) to call it off the event loop, or call it "
                   f"in an async function: async def fn(item): return {name}(item)")
        raise invalid("fn", fn, f"{expected}, not a class: calling {name} makes an instance, "
                      f"not an awaitable", fix, kind=TypeError)
    if not callable(fn):
        raise invalid("fn", fn, expected, "async def fn(item): return await fetch(item)",
                      kind=TypeError)
    if _is_async_generator_callable(fn):
        name = describe_callable(fn)
        plain = inspect.isasyncgenfunction(fn) and getattr(fn, "__name__", "") == name
        call = f"{name}(item)]" if plain else f"f(item)] with f = the {name} you passed"
        raise invalid(
            "fn", fn,
            f"a callable that returns an awaitable, not the async generator function "
            f"{name!r}, which yields values instead of returning one",
            f"use `return` instead of `yield`, or collect what it yields: "
            f"async def fn(item): return [x async for x in {call}",
            kind=TypeError,
        )


def check_items(items: object) -> None:
    """Refuse ``items`` that is neither an iterable nor an async iterable, or is a string.

    A ``str`` or ``bytes`` is iterable, but as one item per character (or per int) it is
    never what was meant.
    """
    if isinstance(items, str | bytes | bytearray | memoryview):
        raise invalid(
            "items", items,
            f"an iterable of items, not a {type(items).__name__}, which would be processed "
            f"one character at a time",
            f"items=[{_as_code(items)}] (a single item)", kind=TypeError,
        )
    if isinstance(items, AsyncIterable | Iterable):
        return
    raise invalid("items", items, "an iterable or an async iterable",
                  f"items=[{_as_code(items)}] (a single item)", kind=TypeError)


def _as_code(value: object) -> str:
    """``value`` as code when its repr is a literal (``'abc'``, ``5``, ``float('nan')``),
    else the word ``item``."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    text = show(value)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return "item"
    return text


def check_options(
    *, workers: Any, buffer: Any, retry: Any, timeout: Any, drain: Any
) -> None:
    """Check the pool options common to run, map and open_pool."""
    from ._retry import Retry  # here: _retry imports this module's checks

    check_count("workers", workers, minimum=1)
    check_count("buffer", buffer, minimum=0, allow_none=True)
    if retry is not None and not isinstance(retry, Retry):
        attempts = retry if type(retry) is int and 1 <= retry <= 100 else 3
        raise invalid("retry", retry, "a conveyor.Retry or None",
                      f"retry=conveyor.Retry(attempts={attempts})", kind=TypeError)
    check_seconds("timeout", timeout, above=0, allow_none=True, example="timeout=30.0")
    check_drain(drain)


def check_drain(drain: Any) -> None:
    """``drain`` is a finite number of seconds >= 0 (not a bool, not NaN)."""
    check_seconds("drain", drain, minimum=0, example="drain=0 (cancel running attempts at once)")


# ---------------------------------------------------------------------- what a callable is


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
