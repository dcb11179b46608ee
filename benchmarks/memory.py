"""Scenario 5, memory: peak RSS for 1,000 items against many, each run in a fresh process.

- asyncio (seed 000): the pattern as written: every `TaskParam` pre-filled into the queue,
  every result kept in the result queue until the end.
- conveyor: `conveyor.map` streaming, each record discarded as it arrives (items consumed
  lazily from `range`).

Both run the no-op work with 20 workers and 4 attempts. The figure is the peak RSS of the child
for the big count, in MiB, read by the child itself at the end: `VmHWM` from
/proc/self/status on Linux, else `resource.getrusage(RUSAGE_SELF).ru_maxrss`. (On Linux
`ru_maxrss` survives `execve`, so a child started from a big parent would report the parent's
size; `VmHWM` belongs to the new address space.) The note gives the 1k figure and the growth
big / 1k (target for conveyor: <= 1.2). Quick runs use 100,000 items, `--full` 1,000,000.

Run as a child: `python -m benchmarks.memory {asyncio,conveyor} N` prints the peak in KiB.
A child imports only what its system needs (the asyncio child never imports trio).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from functools import partial

from benchmarks._harness import Case, Config, Sample, System, conveyor_has

NAME = "memory"
WORKERS = 20
ATTEMPTS = 4
SMALL = 1_000


async def _noop(x: int) -> int:
    return x + 1


def _child_asyncio(n: int) -> None:
    import asyncio

    from benchmarks import _asyncio_seed

    out = asyncio.run(_asyncio_seed.main(_noop, range(n), num_workers=WORKERS, attempts=ATTEMPTS))
    assert out.num_result == n


def _child_conveyor(n: int) -> None:
    import trio

    import conveyor

    async def main() -> int:
        count = 0
        retry = conveyor.Retry(attempts=ATTEMPTS)
        async for _ in conveyor.map(_noop, range(n), workers=WORKERS, retry=retry):
            count += 1
        return count

    assert trio.run(main) == n


def peak_kib(system: str, n: int) -> int:
    """Run one child; return its peak RSS in KiB."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", system, str(n)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1])


def measure(system: str, n: int) -> Sample:
    small = peak_kib(system, min(SMALL, n)) / 1024
    big = peak_kib(system, n) / 1024
    return Sample(big, {"small": small, "growth": big / small})


def cases(cfg: Config) -> list[Case]:
    n = cfg.pick(quick=100_000, full=1_000_000, smoke=2_000)
    small = min(SMALL, n)
    return [
        Case(
            NAME,
            f"memory: peak RSS, {n:,} items"
            + (" (quick; --full: 1,000,000)" if not cfg.full and not cfg.smoke else ""),
            "MiB",
            [
                System("asyncio (seed 000, pre-filled)", partial(measure, "asyncio", n), True),
                System(
                    "conveyor.map (streamed)",
                    partial(measure, "conveyor", n) if conveyor_has("map", "Retry") else None,
                ),
            ],
            notes={"small": f"{small:,} items: {{:.1f}} MiB", "growth": "growth {:.2f}x"},
        )
    ]


def own_peak_kib() -> int:
    """This process's peak RSS in KiB (see the module docstring for why not ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _main(argv: list[str]) -> None:
    system, n = argv[0], int(argv[1])
    {"asyncio": _child_asyncio, "conveyor": _child_conveyor}[system](n)
    print(own_peak_kib())


if __name__ == "__main__":
    _main(sys.argv[1:])
