"""``python -m examples.predict demo --metrics-port PORT``: scraped over HTTP while it runs.

The demo (its 4 flaky servers, the client's runs) serves /metrics on 127.0.0.1:PORT. A real
HTTP client (httpx) scrapes it while the demo runs and once more after its last run (the
demo keeps serving its final values until its stdin closes): the counters of pool
"predict" equal what the demo's own reports add up to, and the server is gone once the demo
has ended.
"""

from __future__ import annotations

import queue
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
COUNTED = ("submitted", "succeeded", "failed", "unfinished", "attempts")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pool_samples(text: str, pool: str = "predict") -> dict[str, float]:
    """The samples of one pool, by name (histogram buckets keyed ``name{le}``)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("pool") != pool:
                continue
            extra = {k: v for k, v in sample.labels.items() if k != "pool"}
            key = sample.name + ("{" + ",".join(extra.values()) + "}" if extra else "")
            out[key] = sample.value
    return out


def counter(samples: dict[str, float], name: str) -> float:
    return samples[f"conveyor_{'attempts' if name == 'attempts' else 'items_' + name}_total"]


@pytest.mark.slow
def test_the_demo_serves_metrics_while_it_runs_and_they_add_up_to_its_report(
    tmp_path: Path,
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.predict", "demo", "--rows", "20000",
         "--workdir", str(tmp_path), "--metrics-port", str(port), "--metrics-linger", "120"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")  # the end

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def next_line(timeout: float = 120) -> str:
        line = lines.get(timeout=timeout)
        output.append(line)
        assert line, "the demo ended early:\n" + "".join(output)
        return line

    url = f"http://127.0.0.1:{port}/metrics"
    try:
        while not next_line().startswith("metrics: http"):
            pass
        assert output[-1].strip() == f"metrics: {url}"
        with httpx.Client(timeout=30) as http:
            # While it runs: scrape until the demo prints its metrics line (its last run done).
            during: list[dict[str, float]] = []
            final_line = ""
            while not final_line:
                during.append(pool_samples(http.get(url).text))
                try:
                    while line := next_line(timeout=0.05):
                        if line.startswith("metrics (pool"):
                            final_line = line
                            break
                except queue.Empty:
                    pass
            while "serving the final values" not in next_line():
                pass
            final = pool_samples(http.get(url).text)
        live = [s for s in during if s and counter(s, "submitted") > 0]
        assert live, f"no scrape saw the pool at work ({len(during)} scrapes)"
        for samples in live:
            settled = sum(counter(samples, n) for n in ("succeeded", "failed", "unfinished"))
            assert settled <= counter(samples, "submitted")
            assert 0 <= samples["conveyor_items_in_flight"] <= 16  # 4 servers x 4 at once

        # At the end: what the demo's reports add up to, and the ledger's identity.
        reported = {name: int(n) for name, n in re.findall(r"(\w+) (\d+)", final_line)}
        assert set(reported) == set(COUNTED), final_line
        for name in COUNTED:
            assert counter(final, name) == reported[name], (name, final_line, final)
        assert counter(final, "submitted") == sum(
            counter(final, n) for n in ("succeeded", "failed", "unfinished"))
        assert counter(final, "unfinished") == 0
        assert final["conveyor_attempt_duration_seconds_count"] == reported["attempts"]
        retries = sum(v for k, v in final.items() if k.startswith("conveyor_retries_total{"))
        assert retries > 0  # the fleet's 503s and dropped answers were retried
        assert retries == reported["attempts"] - reported["submitted"]  # each batch: 1 + retries

        # Close its stdin: it stops serving and ends by itself.
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=30) == 0, "".join(output)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=30)
        assert process.stdout is not None and process.stdin is not None
        process.stdout.close()
        process.stdin.close()
