"""End to end: examples/producer_consumer.py as a real process, stopped by SIGINT (seed 001).

The test waits until the example has printed two stats lines (producers running, items in
flight), sends SIGINT, and reads the final account: every item a producer handed to the pool
is in exactly one of succeeded / failed / unfinished, none is counted twice, none is missing.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio

from ._proc import read_line

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "producer_consumer.py"

pytestmark = pytest.mark.slow


async def test_sigint_stops_producers_drains_and_accounts_for_every_item() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLE), "--duration", "120", "--grace", "0.05"],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        # At least two stats lines, and an item already failed for good (about 1% of items
        # do, so a short run may have none yet: wait for it rather than hope).
        with trio.fail_after(60):
            while sum(line.startswith("stats:") for line in lines) < 2 or not any(
                re.search(r"\(failed [1-9]", line) for line in lines
            ):
                line = await read_line(process.stdout)
                assert line, f"the example ended early: {lines}"
                lines.append(line)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            while line := await read_line(process.stdout):
                lines.append(line)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert any(line.startswith("SIGINT: stopping producers") for line in lines), lines
    assert lines[-1].startswith("account: "), lines[-3:]
    account = json.loads(lines[-1].removeprefix("account: "))
    produced = account["produced"]
    settled = account["succeeded"] + account["failed"] + account["unfinished"]
    assert len(produced) == len(set(produced)) > 50
    # Exactly one outcome per produced item: no duplicates, no losses, nothing invented.
    assert Counter(settled) == Counter(produced)
    assert account["succeeded"] and account["failed"]  # both kinds happened
    # All three producers ran, at their different speeds.
    per_producer = Counter(item.split("-")[0] for item in produced)
    assert per_producer["fast"] > per_producer["slow"] > 0
    assert per_producer["medium"] > per_producer["slow"]


def test_without_sigint_the_pool_finishes_everything_it_accepted() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--duration", "1.5"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    account = json.loads(done.stdout.splitlines()[-1].removeprefix("account: "))
    assert account["unfinished"] == []
    assert Counter(account["succeeded"] + account["failed"]) == Counter(account["produced"])
