"""What a type checker sees of the public surface: mypy --strict (``mypy.api``, in this
process) on two snippets of caller code, against the conveyor under test.

The options of ``run``, ``map`` and ``open_pool`` are typed once (``conveyor.PoolOptions``
with ``Unpack``): a misspelled option or one of the wrong type is an error in a typed
caller, and a correct call, or a function of the caller's that passes the options on, is
not. A class only a factory makes is final: extending it is an error.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import conveyor

mypy_api = pytest.importorskip("mypy.api")

SRC = Path(conveyor.__file__).resolve().parent.parent

GOOD = """
    from typing import Unpack

    import conveyor


    async def double(item: int) -> int:
        return 2 * item


    async def passes_on(items: list[int], **options: Unpack[conveyor.PoolOptions]) -> int:
        report = await conveyor.run(double, items, **options)
        return report.stats.succeeded


    class Watch(conveyor.Observer):
        pass


    async def main() -> None:
        await conveyor.run(double, [1, 2], workers=3, retry=conveyor.Retry(attempts=2),
                           timeout=1.5, drain=0.0, name="double", observers=[Watch()])
        async with conveyor.map(double, [1], ordered=True, window=4, buffer=0) as records:
            async for record in records:
                print(record)
        async with conveyor.open_pool(double, progress=True, observers=(Watch(),)) as pool:
            await pool.submit(1)
        await passes_on([1], workers=2, journal="job.journal", key=str)
        options: conveyor.PoolOptions = {"workers": 4, "name": "x"}
        await conveyor.run(double, [1], **options)
"""

# Each line that must be an error, with what mypy must say about it.
BAD = {
    "await conveyor.run(double, [1], wokers=3)":
        'Unexpected keyword argument "wokers" for "run"; did you mean "workers"?',
    "conveyor.map(double, [1], ordered=True, windw=2)":
        'Unexpected keyword argument "windw" for "map"',
    "conveyor.open_pool(double, timout=1.0)":
        'Unexpected keyword argument "timout" for "open_pool"',
    'await conveyor.run(double, [1], workers="3")':
        'Argument "workers" to "run" has incompatible type "str"; expected "int"',
    "await conveyor.run(double, [1], name=None)":
        'Argument "name" to "run" has incompatible type "None"; expected "str"',
    "await conveyor.run(double, [1], observers=[object()])":
        'List item 0 has incompatible type "object"; expected "Observer"',
    "await passes_on([1], wokers=3)":
        'Unexpected keyword argument "wokers" for "passes_on"',
    "conveyor.in_thread(str, trio.CapacityLimiter(1))":
        'Too many positional arguments for "in_thread"',
    "class Mine(conveyor.MapStream[int]): pass":
        'Cannot inherit from final class "MapStream"',
    "class MyPool(conveyor.Pool[int]): pass":
        'Cannot inherit from final class "Pool"',
}


def bad_snippet() -> str:
    head = GOOD.replace("async def main() -> None:", "async def unused() -> None:")
    lines = [f"        {line}" for line in BAD]
    return head + "\n    import trio\n\n\n    async def main() -> None:\n" + "\n".join(lines)


def run_mypy(tmp_path: Path, **snippets: str) -> dict[str, list[str]]:
    """mypy --strict on each snippet (file name -> code); its errors per file, as
    (source line, message) strings."""
    (tmp_path / "mypy.ini").write_text(
        f"[mypy]\nstrict = True\nmypy_path = {SRC}\nwarn_unused_ignores = True\n"
    )
    files = []
    sources: dict[str, list[str]] = {}
    for name, code in snippets.items():
        text = textwrap.dedent(code).lstrip()
        (tmp_path / f"{name}.py").write_text(text)
        files.append(str(tmp_path / f"{name}.py"))
        sources[name] = text.splitlines()
    stdout, stderr, _ = mypy_api.run([
        "--config-file", str(tmp_path / "mypy.ini"),
        "--cache-dir", str(tmp_path / "cache"),
        "--no-error-summary", "--hide-error-context", "--show-error-codes",
        *files,
    ])
    assert not stderr, stderr
    errors: dict[str, list[str]] = {name: [] for name in snippets}
    for line in stdout.splitlines():
        found = re.match(r".*[/\\](\w+)\.py:(\d+): error: (.*)", line)
        if found:
            name, number, message = found.groups()
            errors[name].append(f"{sources[name][int(number) - 1].strip()} -> {message}")
        else:
            assert ": note: " in line, line
    return errors


def test_mypy_accepts_correct_calls_and_refuses_each_mistake(tmp_path: Path) -> None:
    errors = run_mypy(tmp_path, good=GOOD, bad=bad_snippet())
    assert errors["good"] == []
    for code, expected in BAD.items():
        said = [error for error in errors["bad"] if error.startswith(f"{code} -> ")]
        assert said, f"mypy did not refuse: {code}\n" + "\n".join(errors["bad"])
        assert any(expected in error for error in said), said
    assert len({error.partition(" -> ")[0] for error in errors["bad"]}) == len(BAD), (
        errors["bad"]
    )
