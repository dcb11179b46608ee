"""The public surface: everything in __all__ exists, and the contract names are there.

The contract is summarised in docs/design.md ("The public contract...", invariant 15).
Also: classes that only a factory makes are final, with no public constructor; every public
name has a docstring; every module is private; the knobs of every public function are
keyword only.
"""

from __future__ import annotations

import inspect
import pkgutil
import re
from typing import Any

import pytest

import conveyor

CONTRACT = {
    "run", "map", "open_pool", "Retry", "Backoff", "Succeeded", "Failed", "Unfinished",
    "Report", "Stats",
}

# Classes that only a factory makes: the factory, as the TypeError names it.
FACTORY_MADE = {
    "MapStream": "conveyor.map(",
    "Pool": "conveyor.open_pool(",
    "Pipeline": "conveyor.pipeline(",
    "PipelineRun": "pipe.open(",
    "PipelineStream": "pipe.map(",
    "Stage": "conveyor.stage(",
}

# Every other public class: the caller constructs it (options, records in tests, errors), or
# subclasses it (Observer), or it is a type only (PoolOptions).
CONSTRUCTIBLE = {
    "Adaptive", "Attempt", "AttemptTimeout", "Backoff", "Failed", "ItemUnfinished", "LastReport",
    "ItemsFailed", "JournalError", "NotPicklableError", "Observer", "Percentiles", "PerKey",
    "PoolInfo", "PoolOptions", "Progress", "Rate", "RemoteError", "Report", "Retry",
    "RetryAfter", "Stats", "Succeeded", "Unfinished", "WorkerDied", "TqdmProgress", "RichProgress",
    "PrometheusMetrics", "OpenTelemetry", "Batch", "ConveyorError", "JournalIOError",
    "JournalInvalid",
}

# Type aliases (documented by the string after them in their module).
ALIASES = {"Record"}

# The positional parameters of each public function: what it works on. Every other
# parameter (a knob) is keyword only.
POSITIONAL = {
    "run": ("fn", "items"),
    "map": ("fn", "items"),
    "open_pool": ("fn",),
    "in_thread": ("f",),
    "in_process": ("f",),
    "in_process_batched": ("f",),
    "stage": ("fn",),
    "pipeline": (),
}

# Positional arguments in any number that are the thing itself, not knobs.
VARIADIC = {"pipeline": "stages"}  # the stages, in order


def public(name: str) -> Any:
    return getattr(conveyor, name)


def test_all_names_exist_and_are_public() -> None:
    for name in conveyor.__all__:
        assert hasattr(conveyor, name), name
        assert not name.startswith("_")
    assert len(set(conveyor.__all__)) == len(conveyor.__all__)


def test_contract_names_exported() -> None:
    assert CONTRACT <= set(conveyor.__all__)


def test_modules_are_private() -> None:
    names = [m.name for m in pkgutil.walk_packages(conveyor.__path__, "conveyor.")]
    assert names, names
    assert all(name.rpartition(".")[2].startswith("_") for name in names), names


# ------------------------------------------------------------------ classes made by a factory


def test_every_public_class_is_classified() -> None:
    """A new public class says whether callers construct it or only a factory does."""
    classes = {name for name in conveyor.__all__ if isinstance(public(name), type)}
    assert classes == CONSTRUCTIBLE | set(FACTORY_MADE)
    assert not isinstance(public("Record"), type)
    assert not CONSTRUCTIBLE & set(FACTORY_MADE)


@pytest.mark.parametrize("name", sorted(FACTORY_MADE))
def test_a_class_only_a_factory_makes_is_final(name: str) -> None:
    assert getattr(public(name), "__final__", False) is True


def refusal(name: str) -> str:
    """What constructing the class directly raises: its TypeError's message."""
    cls = public(name)
    with pytest.raises(TypeError) as caught:
        cls(lambda item: item, [1])
    with pytest.raises(TypeError) as caught_bare:
        cls()
    assert str(caught.value) == str(caught_bare.value)  # whatever the arguments
    return str(caught.value)


def test_map_stream_has_no_public_constructor() -> None:
    message = refusal("MapStream")
    assert message == (
        "conveyor.MapStream has no public constructor: call conveyor.map(fn, items, ...), "
        "which returns one"
    )
    assert re.search(r"\bconveyor\.MapStream\b", message)


def test_pool_has_no_public_constructor() -> None:
    assert FACTORY_MADE["Pool"] in refusal("Pool")


async def double(item: int) -> int:
    return 2 * item


async def test_the_factories_named_make_them() -> None:
    """The fix the refusals suggest: call the factory."""
    stream = conveyor.map(double, [1, 2], ordered=True)
    assert type(stream) is conveyor.MapStream
    async with stream as records:
        assert [record.unwrap() async for record in records] == [2, 4]
    async with conveyor.open_pool(double) as pool:
        assert type(pool) is conveyor.Pool
        await pool.submit(3)
    assert pool.report().stats.succeeded == 1


# ------------------------------------------------------------------ docstrings


def own_doc(obj: Any) -> str | None:
    """``obj``'s own docstring (not one a dataclass or a base class made up)."""
    if isinstance(obj, type):
        doc = vars(obj).get("__doc__")
        if isinstance(doc, str) and doc.startswith(f"{obj.__name__}("):
            return None  # a dataclass's generated signature
        return doc if isinstance(doc, str) else None
    if isinstance(obj, property):
        return obj.__doc__ or (obj.fget.__doc__ if obj.fget else None)
    return inspect.getdoc(obj)  # a method that overrides a documented one: the base's doc


def public_members() -> list[tuple[str, Any]]:
    """Every public name, and the public methods and properties of each public class
    written in conveyor (not those inherited from Exception, say)."""
    found: list[tuple[str, Any]] = []
    for name in conveyor.__all__:
        if name in ALIASES:
            continue
        obj = public(name)
        found.append((name, obj))
        if not isinstance(obj, type):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            function = member.__func__ if isinstance(member, classmethod | staticmethod) \
                else member
            if isinstance(function, property) or (
                inspect.isfunction(function)
                and function.__module__.startswith("conveyor.")
            ):
                found.append((f"{name}.{attr}", function))
    return found


def test_every_public_class_and_function_has_a_docstring() -> None:
    missing = [name for name, obj in public_members() if not (own_doc(obj) or "").strip()]
    assert missing == []


# ------------------------------------------------------------------ keyword-only knobs


def test_every_public_function_is_classified() -> None:
    functions = {name for name in conveyor.__all__
                 if not isinstance(public(name), type) and name not in ALIASES}
    assert functions == set(POSITIONAL)


@pytest.mark.parametrize("name", sorted(POSITIONAL))
def test_knobs_are_keyword_only(name: str) -> None:
    params = inspect.signature(public(name)).parameters.values()
    positional = tuple(p.name for p in params if p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    assert positional == POSITIONAL[name]
    assert not [p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL
                and p.name != VARIADIC.get(name)]


@pytest.mark.parametrize("name", ["in_thread", "in_process"])
def test_a_knob_given_by_position_is_refused(name: str) -> None:
    from tests import _procfuncs

    with pytest.raises(TypeError, match="positional argument"):
        public(name)(_procfuncs.square, None)
