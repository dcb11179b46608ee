"""Functions for tests that run in worker processes.

Worker processes import a function by its module path, so these live at module level in an
importable module (not inside the test modules' functions).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


class ItemError(ValueError):
    """Raised by :func:`fail_on` for the items it is told to fail."""


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def _inner_failure(x: int) -> None:
    raise ItemError(f"item {x} is bad")


def fail_on(bad: int, x: int) -> int:
    """x * 2, except for ``bad`` (bind it with functools.partial)."""
    if x == bad:
        _inner_failure(x)
    return x * 2


def always_fail(x: int) -> int:
    _inner_failure(x)
    return x


def return_lock(x: int) -> threading.Lock:
    return threading.Lock()


def getpid(x: object = None) -> int:
    return os.getpid()


def sleep_and_return(seconds: float, x: int) -> int:
    time.sleep(seconds)
    return x


def write_pid_then_sleep(directory: str, seconds: float, x: int) -> int:
    """Leaves ``<directory>/<x>.pid`` holding this worker's pid, then sleeps."""
    path = Path(directory) / f"{x}.pid"
    path.write_text(str(os.getpid()))
    time.sleep(seconds)
    return x


def die_once(marker_dir: str, how: str, x: int) -> int:
    """The first call for item ``x`` kills its own worker process; later calls return x."""
    marker = Path(marker_dir) / f"{x}.died"
    if not marker.exists():
        marker.write_text("")
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def burn(n: int) -> int:
    """CPU-heavy: sums factorial digit counts, like the seed's heavy_lifting."""
    total = 0
    value = 1
    for k in range(1, n):
        value *= k
        total += value.bit_length()
    return total


class Unrebuildable(Exception):
    """An exception that pickles but cannot be rebuilt (its __init__ needs two args)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_unrebuildable(x: int) -> int:
    raise Unrebuildable(x, x)


def quick(x: int) -> int:
    """A 10 ms job."""
    time.sleep(0.01)
    return x


def slow_once(marker_dir: str, x: int) -> int:
    """The first call for item ``x`` sleeps 30 s (a timeout kills it); later calls are quick."""
    marker = Path(marker_dir) / f"{x}.slow"
    if not marker.exists():
        marker.write_text("")
        time.sleep(30)
    return quick(x)


def exit_with(how: str, x: int) -> int:
    """Raises SystemExit(x) (``how="exit"``) or KeyboardInterrupt (``"interrupt"``) for odd
    ``x``; returns ``x`` for even ones."""
    if x % 2:
        if how == "exit":
            sys.exit(x)
        raise KeyboardInterrupt
    return x


def loaded_modules(prefixes: tuple[str, ...]) -> list[str]:
    """The names in this process's ``sys.modules`` starting with one of ``prefixes``."""
    return sorted(name for name in sys.modules if name.startswith(prefixes))
