"""The options of run, map and open_pool, typed once (``conveyor.PoolOptions``): a name that
is not an option is refused at the call with the fix, the defaults are documented once (and
the README's table says the same), and ``name=``/``observers=`` are checked and reach the
pool."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import trio

import conveyor
from conveyor._pool_options import DEFAULTS, PoolOptions, resolve

README = Path(__file__).resolve().parent.parent / "README.md"
CALLED: list[Any] = []
ENTRIES = ["run", "map", "open_pool"]


async def task(item: Any) -> Any:
    CALLED.append(item)
    await trio.lowlevel.checkpoint()
    return item


async def refused(entry: str, **options: Any) -> BaseException:
    """Call one entry point with ``options``: it must raise at the call, before any work."""
    CALLED.clear()
    try:
        if entry == "run":
            await conveyor.run(task, [1], **options)
        elif entry == "map":
            conveyor.map(task, [1], **options)
        else:
            conveyor.open_pool(task, **options)
    except Exception as error:
        assert CALLED == []
        return error
    raise AssertionError(f"{entry}(**{options!r}) was accepted")


async def call(entry: str, **options: Any) -> conveyor.Report:
    """Run ``task`` over [1, 2, 3] with ``options`` through one entry point."""
    if entry == "run":
        return await conveyor.run(task, [1, 2, 3], **options)
    if entry == "map":
        stream = conveyor.map(task, [1, 2, 3], **options)
        async with stream as records:
            async for _ in records:
                pass
        return stream.report()
    async with conveyor.open_pool(task, **options) as pool:
        for item in (1, 2, 3):
            await pool.submit(item)
    return pool.report()




# ------------------------------------------------------------------ one list, one default each


def test_defaults_cover_every_option_exactly() -> None:
    assert set(DEFAULTS) == set(typing.get_type_hints(PoolOptions))
    assert PoolOptions.__required_keys__ == frozenset()  # every option is optional


def test_the_entry_points_take_the_options_and_nothing_else() -> None:
    """run/map/open_pool list no option of their own but map's ordered and window."""
    import inspect

    for function, own in ((conveyor.run, {"fn", "items"}),
                          (conveyor.map, {"fn", "items", "ordered", "window"}),
                          (conveyor.open_pool, {"fn"})):
        params = inspect.signature(function).parameters
        (var,) = [p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        assert set(params) - {var.name} == own
        hint = typing.get_type_hints(function)[var.name]
        assert typing.get_origin(hint) is typing.Unpack
        assert typing.get_args(hint) == (PoolOptions,)


def test_the_readme_table_lists_every_option_with_its_default() -> None:
    rows = re.findall(r"^\s*\| `(\w+)` \| `([^`]+)`[^|]*\|", README.read_text(), re.MULTILINE)
    table = dict(rows)
    assert set(table) == set(DEFAULTS), "README's options table and PoolOptions differ"
    for name, default in table.items():
        assert ast.literal_eval(default) == DEFAULTS[name], name  # type: ignore[literal-required]


def test_the_docstring_gives_every_option_its_default() -> None:
    doc = PoolOptions.__doc__ or ""
    documented = dict(re.findall(r"^    - ``(\w+)`` \[([^\]:]+)", doc, re.MULTILINE))
    assert set(documented) == set(DEFAULTS)
    for name, default in documented.items():
        assert ast.literal_eval(default) == DEFAULTS[name], name  # type: ignore[literal-required]


def test_resolve_fills_in_the_defaults_and_keeps_what_was_given() -> None:
    resolved = resolve("run", {"workers": 3, "name": "fetch"})
    assert resolved == {**DEFAULTS, "workers": 3, "name": "fetch"}


# ------------------------------------------------------------------ a name that is no option


@pytest.mark.parametrize("entry", ENTRIES)
async def test_a_misspelled_option_is_refused_at_the_call_with_the_nearest_one(
    entry: str,
) -> None:
    error = await refused(entry, wokers=3)
    assert isinstance(error, TypeError)
    assert str(error).startswith(
        f"{entry}() got an unexpected keyword argument 'wokers'; did you mean workers=? "
    )


async def test_the_suggested_option_is_accepted() -> None:
    report = await conveyor.run(task, [1, 2], workers=3)  # the fix the message suggests
    assert report.stats.succeeded == 2


def test_an_option_far_from_any_lists_them_all() -> None:
    with pytest.raises(TypeError) as caught:
        conveyor.open_pool(task, zzz=1)  # type: ignore[call-arg]
    message = str(caught.value)
    assert message.startswith("open_pool() got an unexpected keyword argument 'zzz'; the opt")
    assert "did you mean" not in message
    assert all(name in message for name in DEFAULTS)


@pytest.mark.parametrize("option", ["ordered", "window"])
async def test_map_only_options_given_to_run_say_where_they_belong(option: str) -> None:
    with pytest.raises(TypeError, match=rf"run\(\) got an unexpected keyword argument "
                                        rf"'{option}': {option}= applies to conveyor.map\(\)"):
        await conveyor.run(task, [1], **{option: True})
    # The fix: the same option given to map.
    stream = conveyor.map(task, [1, 2], ordered=True, **({"window": 2} if option == "window"
                                                          else {}))
    async with stream as records:
        assert [record.unwrap() async for record in records] == [1, 2]


# ------------------------------------------------------------------ name= and observers=


class Seen(conveyor.Observer):
    """Records the names of the pools it is opened for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def opened(self, info: conveyor.PoolInfo) -> conveyor.Observer:
        self.names.append(info.name)
        return self


# In the one shape (tests/_fixes.SHAPE): "param=value is not valid: expected ...; e.g. FIX".
_NAME = "is not valid: expected a non-empty str naming the pool (metrics, displays); " \
    "e.g. name='fetch'"
_LIST = "is not valid: expected a list or tuple of conveyor.Observer instances"
BAD_NAME_OR_OBSERVERS = [
    ({"name": ""}, ValueError, f"name='' {_NAME}"),
    ({"name": None}, TypeError, f"name=None {_NAME}"),
    ({"name": 5}, TypeError, f"name=5 {_NAME}"),
    ({"name": b"pool"}, TypeError, f"name=b'pool' {_NAME}"),
    ({"observers": None}, TypeError, f"observers=None {_LIST}; e.g. observers=[]"),
    ({"observers": "abc"}, TypeError, f"observers='abc' {_LIST}; e.g. observers=[]"),
    ({"observers": {Seen()}}, TypeError, f"{_LIST}; e.g. observers=[]"),
    ({"observers": Seen()}, TypeError,
     "(one observer goes in a list); e.g. observers=[] (here: observers=[Seen(...)])"),
    ({"observers": [Seen(), object()]}, TypeError,
     "(a subclass's instance), not <object object"),
    ({"observers": [Seen]}, TypeError,
     f"{_LIST}, not classes; e.g. observers=[] (here: observers=[Seen()])"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("options", "kind", "message"), BAD_NAME_OR_OBSERVERS)
async def test_bad_name_or_observers_are_refused_at_the_call(
    entry: str, options: dict[str, Any], kind: type[Exception], message: str
) -> None:
    error = await refused(entry, **options)
    assert type(error) is kind
    assert message in str(error)


@pytest.mark.parametrize("entry", ENTRIES)
async def test_one_observer_alone_the_suggested_list_is_accepted(entry: str) -> None:
    seen = Seen()
    report = await call(entry, observers=[seen], name="fetch")  # the fix: observers=[it]
    assert report.stats.succeeded == 3
    assert seen.names == ["fetch"]


@pytest.mark.parametrize("entry", ENTRIES)
async def test_the_default_name_is_pool(entry: str) -> None:
    seen = Seen()
    await call(entry, observers=(seen,))
    assert seen.names == ["pool"]


async def test_observers_are_copied_at_the_call() -> None:
    """A later change to the caller's list does not reach the pool."""
    first, second = Seen(), Seen()
    observers: list[conveyor.Observer] = [first]
    async with conveyor.open_pool(task, observers=observers) as pool:
        observers.append(second)
        await pool.submit(1)
    assert first.names == ["pool"]
    assert second.names == []
