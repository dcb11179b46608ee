"""End to end: examples/pipeline.py (seed 001 as three stages) as a real process, stopped by
SIGINT: every id a producer handed in is in exactly one of succeeded / failed / unfinished
(by stage), and the SQLite file holds exactly the succeeded ones (one transaction per batch).
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

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipeline.py"

pytestmark = pytest.mark.slow


def _settled(account: dict[str, object]) -> list[str]:
    failed = account["failed"]
    unfinished = account["unfinished"]
    assert isinstance(failed, dict) and isinstance(unfinished, dict)
    succeeded = account["succeeded"]
    assert isinstance(succeeded, list)
    return [*succeeded, *(i for v in failed.values() for i in v),
            *(i for v in unfinished.values() for i in v)]


async def test_sigint_drains_every_stage_and_accounts_for_every_input(tmp_path: Path) -> None:
    db = tmp_path / "records.sqlite"
    process = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLE), "--duration", "120", "--grace", "0.05", "--db", str(db)],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        with trio.fail_after(90):
            # Wait until the store stage has written a batch: all three stages are busy.
            while not any(re.search(r"store \d+ running, \d+ held, [1-9]\d* done", line)
                          for line in lines):
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
    assert len(produced) == len(set(produced)) > 50
    # Exactly one record per input: no duplicates, no losses, nothing invented.
    assert Counter(_settled(account)) == Counter(produced)
    # Stopped mid-flight: some inputs were left in the later stages, and they say where.
    assert set(account["unfinished"]) <= {"fetch", "transform", "store"}
    assert sum(map(len, account["unfinished"].values())) > 0
    assert set(account["failed"]) <= {"fetch"}  # only fetch has permanent errors
    # The database holds exactly the succeeded inputs: a batch is stored whole or not at all.
    assert sorted(account["stored"]) == sorted(account["succeeded"])
    assert account["succeeded"]


def test_without_sigint_every_input_is_stored_or_failed(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--duration", "1", "--db", str(tmp_path / "r.sqlite")],
        capture_output=True, text=True, timeout=120, check=True,
    )
    account = json.loads(done.stdout.splitlines()[-1].removeprefix("account: "))
    assert account["unfinished"] == {}
    assert Counter(_settled(account)) == Counter(account["produced"])
    assert sorted(account["stored"]) == sorted(account["succeeded"])
