"""End to end: examples/limited_fetch.py against a real HTTP server on 127.0.0.1 (seed 002).

The server is the test's own (the example's CountingServer on a free port, hypercorn on
trio); the client is httpx through conveyor. The server's counters are the evidence: its
peak concurrency proves the limiter held, and zero 429 answers prove the rate held. A second
run with the adaptive limit and no fixed rate must get every item without losing one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import limited_fetch

import conveyor

pytestmark = pytest.mark.slow

PER_SECOND = 100


async def test_limiter_and_rate_hold_by_the_servers_own_count() -> None:
    app = limited_fetch.CountingServer(per_second=PER_SECOND, latency=0.05)
    async with trio.open_nursery() as nursery:
        base, server = await limited_fetch.start_server(nursery, app)
        shared = trio.CapacityLimiter(4)
        report = await limited_fetch.fetch_all(
            base, limiter=shared, rate=conveyor.Rate(PER_SECOND * 0.8)
        )
        server.cancel()
    assert len(report.succeeded) == 200
    assert not report.failed and not report.unfinished
    assert app.ok == 200 and app.arrived == 200  # one request per item: nothing retried
    assert app.rejected == 0  # the rate held: the server never had to push back
    assert 1 < app.peak <= 4  # the limiter held, by the server's own count
    assert report.stats.attempts == 200
    assert sorted(r.value for r in report.succeeded) == sorted(
        f"/item/{i}\n" for i in range(200)
    )


async def test_adaptive_limit_without_a_rate_converges_and_loses_nothing() -> None:
    # A low ceiling (40/s), so that even a slow shared machine's client goes over it.
    app = limited_fetch.CountingServer(per_second=40, latency=0.05)
    adaptive = conveyor.Adaptive(overload_on=limited_fetch.TooManyRequests, min=1, max=32)
    async with trio.open_nursery() as nursery:
        base, server = await limited_fetch.start_server(nursery, app)
        report = await limited_fetch.fetch_all(base, adaptive=adaptive, count=300)
        server.cancel()
    assert len(report.succeeded) == 300
    assert not report.failed and not report.unfinished
    assert app.ok == 300
    # It found the server's ceiling: it grew, was pushed back, and settled below max.
    assert adaptive.decreases >= 1
    assert 1 <= adaptive.limit < 32
    assert report.stats.adaptive_limit == adaptive.limit
    assert app.rejected == report.stats.retried  # every 429 was retried, none lost


def test_the_example_runs_both_ways_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, str(Path(limited_fetch.__file__)), "--per-second", "100"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("server on http://127.0.0.1:")
    assert "200 fetched, 0 failed, 0 unfinished" in lines[1]
    assert ", 0 answered 429" in lines[1]
    assert "200 fetched, 0 failed, 0 unfinished" in lines[2]
