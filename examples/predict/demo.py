"""``make demo``: 4 flaky servers, the client over a 100,000-row sample, the report.

Starts 4 prediction servers as processes (each answers 10% of requests 503, cuts 5% of its
answers off half-way; the second and fourth answer a 400 for a batch with a bad row without
saying which row; the fourth is a small replica that answers 429 above 2 requests at
once), writes a sample with a few bad rows, scores it through the client, checks every
prediction against the model computed locally, runs the client again to show that the
journal makes the second run send nothing already done, stops the servers and prints what
each one saw.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

import conveyor

from . import client
from .metrics import linger, serve_metrics
from .model import predict_row

# Per server: its fault flags.
FLEET: list[list[str]] = [
    ["--fail-rate", "0.1", "--drop-rate", "0.05"],
    ["--fail-rate", "0.1", "--drop-rate", "0.05", "--terse-400"],
    ["--fail-rate", "0.1", "--drop-rate", "0.05"],
    ["--fail-rate", "0.1", "--drop-rate", "0.05", "--max-concurrent", "2", "--terse-400"],
]


async def _first_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data.decode()


@asynccontextmanager
async def servers(fleet: Sequence[Sequence[str]], serve_for: float = 300.0,
                  ) -> AsyncIterator[tuple[list[str], list[str]]]:
    """Start one server process per flag list; yield (their URLs, a list that receives their
    final counters once they stopped). They stop when the block ends (stdin closed), after
    ``serve_for`` seconds, or if this process dies (their stdin closes too)."""
    processes: list[trio.Process] = []
    counters: list[str] = []
    try:
        for i, flags in enumerate(fleet):
            processes.append(await trio.lowlevel.open_process(
                [sys.executable, "-m", "examples.predict", "serve", "--port", "0",
                 "--stop-on-eof", "--serve-for", str(serve_for), "--seed", str(i), *flags],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            ))
        urls = []
        for process in processes:
            assert process.stdout is not None
            with trio.fail_after(60):
                line = await _first_line(process.stdout)
            if not line.startswith("listening on "):
                raise RuntimeError(f"a server did not start: {line!r}")
            urls.append("http://" + line.removeprefix("listening on ").strip())
        yield urls, counters
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                if process.stdin is not None:
                    await process.stdin.aclose()
            for process in processes:
                with trio.move_on_after(10):
                    rest = b""
                    if process.stdout is not None:
                        while chunk := await process.stdout.receive_some():
                            rest += chunk
                    await process.wait()
                    counters.append(rest.decode().strip())
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def check(outcome: client.Outcome, sample: Path) -> str:
    """Every prediction equals the model computed here; every row scored or reported."""
    bad = {position for position, _ in outcome.bad_rows}
    gave_up = {position for position, _ in outcome.given_up_rows}
    mismatched = unscored = 0
    for row in client.read_rows(sample):
        got = outcome.predictions[row.position]
        if row.position in bad or row.position in gave_up:
            continue
        if got is None:
            unscored += 1
        elif got != predict_row(list(row.values)):
            mismatched += 1
    if mismatched or unscored:
        return f"FAILED: {mismatched} predictions differ from the model, {unscored} rows lost"
    return (f"{outcome.scored:,} predictions equal the model computed locally; "
            f"{len(bad)} bad rows reported, {len(gave_up)} other rows given up; "
            f"none lost, none twice")


async def run_demo(rows: int, workdir: Path, metrics_port: int | None = None,
                   metrics_linger: float = 0.0) -> int:
    async with serve_metrics(metrics_port) as observers:
        code = await _run_demo(rows, workdir, observers)
        await linger(metrics_linger)
    return code


async def _run_demo(rows: int, workdir: Path, observers: list[conveyor.Observer]) -> int:
    started = time.perf_counter()
    sample = workdir / "sample.csv"
    output = workdir / "predictions.csv"
    for stale in (output, output.with_name(output.name + ".journal")):
        stale.unlink(missing_ok=True)
    planted = await trio.to_thread.run_sync(client.write_sample, sample, rows)
    print(f"sample: {rows:,} rows, {len(planted)} of them bad, in {sample}", flush=True)
    async with servers(FLEET) as (urls, counters):
        print(f"servers: {', '.join(urls)} (10% 503, 5% dropped; the 2nd and 4th answer a "
              f"400 naming no row; the last one 429s above 2 at once)", flush=True)
        outcome = await client.score_file(sample, output, urls, observers=observers)
        print(client.format_report(outcome, output, len(urls)), flush=True)
        print(f"  checked   {check(outcome, sample)}", flush=True)
        again = await client.score_file(sample, output, urls, progress=False,
                                        observers=observers)
        print(f"run again (same output, so the same journal): {again.from_journal:,} rows "
              f"taken from the journal, {again.sent_rows} sent "
              f"(the bad ones, checked again), {again.elapsed:.1f} s; "
              f"output unchanged: {again.predictions == outcome.predictions}", flush=True)
        if observers:
            counts = outcome.counts + again.counts
            print(f"metrics (pool \"{client.POOL_NAME}\", both runs): "
                  + ", ".join(f"{name} {counts[name]}" for name in client.COUNTED),
                  flush=True)
    for i, line in enumerate(counters, start=1):
        seen = json.loads(line.removeprefix("stopped: ")) if line.startswith("stopped: ") else line
        print(f"server {i} saw: {seen}")
    print(f"demo done in {time.perf_counter() - started:.1f} s (files in {workdir})")
    return 0 if "FAILED" not in check(outcome, sample) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the sample")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the sample and outputs go (default: a new temp dir)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics while "
                             "the demo runs (0: any free port)")
    parser.add_argument("--metrics-linger", type=float, default=0.0, metavar="SECONDS",
                        help="with --metrics-port: keep serving the final values this long "
                             "after the report, or until stdin closes")


def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="conveyor-predict-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise SystemExit(f"demo: --metrics-port must be 0-65535, got {args.metrics_port}")
    if not (math.isfinite(args.metrics_linger) and args.metrics_linger >= 0):
        raise SystemExit(f"demo: --metrics-linger must be seconds >= 0, got "
                         f"{args.metrics_linger}")
    return trio.run(run_demo, args.rows, workdir, args.metrics_port, args.metrics_linger)
