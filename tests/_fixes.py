"""The one shape of a refusal, and the fix it suggests, as code the tests can run.

Every parameter check raises ``[Owner: ]param=value is not valid: expected WHAT; e.g. FIX``
(``conveyor._options.SHAPE``). Where FIX is code (``workers=2``, ``retry=conveyor.Retry(
attempts=3)``, ``ordered=True, window=4``, optionally followed by a note in parentheses),
:func:`suggested_fix` turns it into keyword arguments, so a test can make the corrected
call and check it is accepted. Where the parameter is variadic (``pipeline(*stages)``), FIX is
the whole corrected call (``conveyor.pipeline(conveyor.stage(fn))``): :func:`suggested_call`
makes it.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import io
import math
import re
import sys
from typing import Any
from urllib.parse import urlsplit

import trio

import conveyor

# The one shape, written out here on its own (conveyor._options.SHAPE says the same).
SHAPE = re.compile(
    r"\A(?:(?P<owner>[\w.]+): )?(?P<param>\w+)=(?P<value>.*?) is not valid: "
    r"expected (?P<expected>.+?); e\.g\. (?P<fix>.+)\Z",
    re.DOTALL,
)

# What the suggested fixes may name.
NAMESPACE: dict[str, Any] = {
    "conveyor": conveyor, "trio": trio, "math": math, "functools": functools, "io": io,
    "sys": sys, "concurrent": concurrent, "urlsplit": urlsplit,
}
try:  # the Prometheus observer's fixes name a registry of prometheus_client's
    import prometheus_client

    NAMESPACE["prometheus_client"] = prometheus_client
except ImportError:  # pragma: no cover - it is in the dev extra
    pass


def parts(message: str) -> dict[str, str]:
    """The parts of a refusal's message; AssertionError if it is not in the one shape."""
    match = SHAPE.match(message)
    assert match is not None, f"not in the one shape: {message!r}"
    return match.groupdict()


def suggested_fix(message: str) -> dict[str, Any] | None:
    """The keyword arguments the message suggests, evaluated; None when its fix is prose
    (only ``fn``, ``f`` and ``items`` may give prose: see ``conveyor._options``)."""
    fix = parts(message)["fix"]
    candidates = [fix] + [fix[:i] for i in range(len(fix) - 1, 0, -1)
                          if fix.startswith(" (", i) and fix.endswith(")")]
    for code in candidates:
        try:
            call = ast.parse(f"f({code})", mode="eval").body
        except SyntaxError:
            continue
        assert isinstance(call, ast.Call)
        if call.args or not call.keywords or any(k.arg is None for k in call.keywords):
            continue
        return {
            str(k.arg): eval(compile(ast.Expression(k.value), "<fix>", "eval"), dict(NAMESPACE))
            for k in call.keywords
        }
    return None


def _without_note(fix: str) -> list[str]:
    """``fix``, then ``fix`` without each trailing note in parentheses, longest first."""
    return [fix] + [fix[:i] for i in range(len(fix) - 1, 0, -1)
                    if fix.startswith(" (", i) and fix.endswith(")")]


def suggested_call(message: str, **names: Any) -> Any:
    """The call the message suggests as its fix (a whole expression, as for a variadic
    parameter), evaluated with ``names`` (what the fix names that only the caller has, such
    as ``fn``); a TypeError or ValueError it raises comes out (the fix refused too).
    AssertionError when the fix is not one expression."""
    fix = parts(message)["fix"]
    for code in _without_note(fix):
        try:
            tree = ast.parse(code, mode="eval")
        except SyntaxError:
            continue
        return eval(compile(tree, "<fix>", "eval"), {**NAMESPACE, **names})
    raise AssertionError(f"the fix is not an expression: {fix!r}")
