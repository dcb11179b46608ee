"""examples/retry_queue.py runs (end to end, as a subprocess) and prints the seed's account."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "retry_queue.py"


def test_retry_queue_example() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--scale", "0.01", "--seed", "3"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    out = result.stdout
    assert "#success = 99" in out
    assert re.search(r"item 50: RuntimeError: deterministic error 50 \(after 4 attempts\)", out)
    assert "unfinished = 0" in out
    # the retries and the give-up are logged, like the seed does
    assert "INFO:conveyor:item " in result.stderr
    assert "WARNING:conveyor:item 50 gave up after 4 attempts" in result.stderr
