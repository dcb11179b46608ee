"""End to end: examples/slow_fast_server.py, server and client as real processes (seed 003).

The server prints its port; the client sends 1 slow request alone, then 3 slow + 20 fast,
then /slow?fail=1. Checked: every fast request completes before any slow one, the 3 slow jobs
ran at the same time in 3 worker processes, and the 500 body carries the worker traceback.
The parallelism is checked from the jobs' own start/end times rather than by comparing
durations, which a busy machine (shared cores) would distort; the client prints the ratio.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ._proc import read_line

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "slow_fast_server.py"

pytestmark = pytest.mark.slow


async def test_fast_requests_pass_slow_ones_and_errors_carry_the_worker_traceback() -> None:
    server = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLE), "--port", "0", "--serve-for", "120", "--stop-on-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        with trio.fail_after(60):
            first = await read_line(server.stdout)
        match = re.fullmatch(r"serving on (http://127\.0\.0\.1:(\d+))\n", first)
        assert match, first
        assert int(match.group(2)) > 0

        with trio.fail_after(120):
            client = await trio.run_process(
                [sys.executable, str(EXAMPLE), "--client", match.group(1)],
                capture_stdout=True,
            )
        out = client.stdout.decode()

        # Completion order: all 20 fast ones before any of the 3 slow ones.
        done = [line for line in out.splitlines() if "(done at" in line]
        kinds = [line.split()[0] for line in done]
        assert kinds == ["fast"] * 20 + ["slow"] * 3, out

        # The 3 slow jobs ran at the same time, in 3 different worker processes.
        runs = [
            (int(pid), float(start), float(end))
            for pid, start, end in re.findall(r"\[pid (\d+), ran ([\d.]+) to ([\d.]+)\]", out)
        ]
        assert len(runs) == 3, out
        assert len({pid for pid, _, _ in runs}) == 3
        assert max(start for _, start, _ in runs) < min(end for _, _, end in runs)
        assert re.search(r"3 slow requests together: [\d.]+ s = [\d.]+ x one alone", out)

        # The worker's error: a 500 whose body has the frames inside the worker process.
        error = out[out.index("/slow?fail=1 -> ") :]
        assert error.startswith("/slow?fail=1 -> 500")
        assert ", in heavy_lifting\n" in error and ", in check_result\n" in error
        assert "ValueError: heavy_lifting failed on purpose after" in error
    finally:
        await server.stdin.aclose()  # --stop-on-eof: the server stops by itself
        with trio.move_on_after(20) as waited:
            await server.wait()
        if waited.cancelled_caught:  # pragma: no cover - only if the server hangs
            server.kill()
            await server.wait()
    assert server.returncode == 0
    rest = await server.stdout.receive_some()
    assert b"server stopped" in rest
