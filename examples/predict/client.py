"""Score a CSV of feature rows on a fleet of flaky prediction servers, resumably.

The job of seed 000, for real: too many rows to score locally, so batches of rows go to K
prediction servers over HTTP, concurrently, through a one-stage ``conveyor.pipeline`` whose
stage is a batching stage (``conveyor.Batch(500, max_wait=0.05)``): each row is an input with
its own record, and each batch one call of the batch function, one request:

- **Routing**: each attempt goes to the least-loaded server that has room (at most
  ``per_server`` requests at once on each), preferring servers that did not just answer
  429/503 or drop a connection. It is chosen per *attempt*, not per batch: a retry goes
  wherever there is room, so one overloaded or dead server does not hold its batches.
- **Retries**: 503 and 429 are retried after their ``Retry-After`` (raised as
  ``conveyor.RetryAfter``), dropped connections and other transport errors after the
  backoff; a 400 (a bad row) or 413 is not retried.
- **Bad rows, isolated**: one bad row makes a server answer 400 for its whole batch. If the
  400 names the bad rows, they are set aside with the server's reason and the other rows
  are sent again at once, in the same attempt. If it does not (a terse server, or a 413
  for a body too big), the batch is split in halves, recursively, with conveyor's batching
  (``call_batch_flat(split=True)``), until the rows that make it fail are alone: only they
  are given up, every good row is scored. The parts of a split batch are retried on 503,
  429 and dropped connections like whole batches, so a 503 met while isolating a bad row
  does not give up the good rows of that part.
- **Resuming**: ``journal=OUTPUT.journal, key=row_key``: a run that was stopped (Ctrl-C,
  a crash, SIGKILL) and started again with the same output path sends only the rows the
  journal does not hold as scored (the bad rows are checked again). A row's key is its
  position and a hash of its text, so a changed input file never reuses a stale result.
- **Output**: predictions in input order (``row,prediction``; empty for a row that could
  not be scored), written from the final report, one record per row; failures with their
  reasons in ``OUTPUT.failures.csv``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

import conveyor
from conveyor._batch import call_batch_flat

from .model import WIDTH

BATCH_SIZE = 500
MAX_WAIT = 0.05  # seconds a batch waits for more rows after its first
PER_SERVER = 4
ATTEMPTS = 8
TIMEOUT = 30.0
POOL_NAME = "predict"  # the pool's name= (the `pool` label of its metrics)
COUNTED = ("submitted", "succeeded", "failed", "unfinished", "attempts")


# ---------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: its position in the file, its values as sent, and its journal key.

    ``key`` names the row and hashes its text: stable across runs of the same input,
    different for a changed row, so a changed file never reuses a stale prediction.
    """

    position: int
    values: tuple[Any, ...]
    key: str

    @classmethod
    def of(cls, position: int, text: Sequence[str]) -> Row:
        digest = hashlib.blake2b(",".join(text).encode(), digest_size=8).hexdigest()
        return cls(position, tuple(_cell(c) for c in text), f"row {position} {digest}")


def row_key(row: Row) -> str:
    """The journal key of a row."""
    return row.key


def _cell(text: str) -> Any:
    """A CSV cell as sent: a float when it is a number (NaN included), else the text, which
    the server refuses by name (the client does not second-guess the server's checks)."""
    try:
        return float(text)
    except ValueError:
        return text


def read_rows(path: Path) -> list[Row]:
    """The rows of a CSV file of feature rows (one header line)."""
    with path.open(newline="") as file:
        reader = csv.reader(file)
        next(reader, None)  # the header
        return [Row.of(position, text) for position, text in enumerate(reader)]


def write_sample(
    path: Path, rows: int, seed: int = 0, bad: int | None = None
) -> list[tuple[int, str]]:
    """Write ``rows`` random feature rows, ``bad`` of them bad (default: one in 8,000, at
    least one); return the bad ones' positions and what is wrong with each (``nan``,
    ``short``, ``long``, ``text``, ``huge``, in turn)."""
    rng = random.Random(seed)
    bad_kinds = ["nan", "short", "long", "text", "huge"]
    count = min(rows, max(1, rows // 8000) if bad is None else bad)
    bad_at = dict(zip(sorted(rng.sample(range(rows), count)),
                      (bad_kinds[i % len(bad_kinds)] for i in range(count)), strict=True))
    planted: list[tuple[int, str]] = []
    with path.open("w", newline="") as file:
        file.write(",".join(f"x{i}" for i in range(WIDTH)) + "\n")
        for position in range(rows):
            values = [f"{rng.gauss(0.0, 1.0):.6f}" for _ in range(WIDTH)]
            kind = bad_at.get(position)
            if kind == "nan":
                values[3] = "nan"
            elif kind == "short":
                values.pop()
            elif kind == "long":
                values.append("0.5")
            elif kind == "text":
                values[1] = "n/a"
            elif kind == "huge":
                values[5] = "1e300"
            if kind is not None:
                planted.append((position, kind))
            file.write(",".join(values) + "\n")
    return planted


# ---------------------------------------------------------------------------------------------
# Errors (what the retry policy looks at)


class ServerBusy(conveyor.RetryAfter):
    """429 or 503: retried after the server's Retry-After."""

    def __init__(self, status: int, delay: float, server: int) -> None:
        super().__init__(delay, f"{status} from server {server} (Retry-After {delay:g} s)")
        self.status = status


class ServerError(Exception):
    """Another 5xx, or an answer that does not hold one prediction per row: retried."""


class Rejected(Exception):
    """400 or 413: the batch itself is bad; not retried. ``bad_rows``: (index in the batch,
    reason) named by the server."""

    def __init__(self, message: str, bad_rows: list[tuple[int, str]]) -> None:
        super().__init__(message)
        self.bad_rows = bad_rows
        self.batch_rows = 1  # the rows of the batch it refused, when raised for all of them


RETRYABLE = (ServerBusy, ServerError, httpx.TransportError, conveyor.AttemptTimeout)


class RowFailed(Exception):
    """In a batch's answer, in the place of a row that was not scored: ``kind`` is
    ``"bad row"`` (the server refused the row itself) or ``"given up"`` (its part of the
    batch kept failing: retries ran out); ``why`` is the reason. Plain args, so it pickles
    into the journal."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(kind, why)
        self.kind = kind
        self.why = why


def is_rejected(error: Exception) -> bool:
    """The errors that split a batch: the server refused the batch for its content."""
    return isinstance(error, Rejected)


def reason(error: BaseException) -> str:
    """A short name for why an attempt failed (the report groups by it)."""
    if isinstance(error, ServerBusy):
        return {429: "429 too many requests", 503: "503 unavailable"}.get(
            error.status, str(error.status))
    if isinstance(error, httpx.RemoteProtocolError):
        return "connection dropped"
    if isinstance(error, httpx.ConnectError):
        return "cannot connect"
    if isinstance(error, httpx.TransportError | conveyor.AttemptTimeout):
        return type(error).__name__
    if isinstance(error, Rejected):
        return "400 bad rows" if error.bad_rows else f"rejected: {error}"
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------
# The fleet: least-loaded routing with a per-server limit


@dataclass
class Server:
    index: int
    url: str
    in_flight: int = 0
    sent: int = 0
    cool_until: float = -math.inf


@dataclass
class Fleet:
    """K servers, at most ``per_server`` requests on each at once."""

    urls: Sequence[str]
    per_server: int
    http: httpx.AsyncClient
    servers: list[Server] = field(init=False)
    room: trio.lowlevel.ParkingLot = field(init=False, default_factory=trio.lowlevel.ParkingLot)
    # Per attempt: (seconds, succeeded?) and, per batch key, the reasons of its failures.
    latencies: list[tuple[float, bool]] = field(init=False, default_factory=list)
    failures: dict[str, Counter[str]] = field(init=False,
                                             default_factory=lambda: defaultdict(Counter))

    def __post_init__(self) -> None:
        self.servers = [Server(i + 1, url.rstrip("/")) for i, url in enumerate(self.urls)]

    async def _take(self) -> Server:
        while True:
            now = trio.current_time()
            free = [s for s in self.servers if s.in_flight < self.per_server]
            if free:
                server = min(free, key=lambda s: (s.cool_until > now, s.in_flight, s.sent))
                server.in_flight += 1
                server.sent += 1
                return server
            await self.room.park()

    def _give_back(self, server: Server) -> None:
        server.in_flight -= 1
        self.room.unpark()

    async def predict_rows(self, key: str, rows: Sequence[tuple[Any, ...]]) -> list[float]:
        """One request: send ``rows`` (of the batch ``key``) to a server; one prediction
        per row, or an error."""
        server = await self._take()
        start = trio.current_time()
        ok = False
        try:
            predictions = await self._post(server, rows)
            ok = True
            return predictions
        except Exception as error:
            self.failures[key][reason(error)] += 1
            if isinstance(error, RETRYABLE):
                # Prefer the other servers for a while.
                delay = error.retry_after if isinstance(error, ServerBusy) else 0.5
                server.cool_until = trio.current_time() + delay
            raise
        finally:
            self.latencies.append((trio.current_time() - start, ok))
            self._give_back(server)

    async def _post(self, server: Server, rows: Sequence[tuple[Any, ...]]) -> list[float]:
        response = await self.http.post(
            f"{server.url}/predict", content=json.dumps({"rows": list(rows)}).encode(),
            headers={"content-type": "application/json"},
        )
        status = response.status_code
        if status == 200:
            try:
                predictions = response.json()["predictions"]
            except (ValueError, KeyError, TypeError) as error:
                raise ServerError(f"server {server.index}: unreadable answer: {error}") from None
            if not isinstance(predictions, list) or len(predictions) != len(rows):
                raise ServerError(f"server {server.index}: wrong number of predictions")
            return predictions
        if status in (429, 503):
            raise ServerBusy(status, _retry_after(response.headers.get("retry-after")),
                             server.index)
        if status in (400, 413):
            bad_rows: list[tuple[int, str]] = []
            message = f"{status}"
            try:
                answer = response.json()
                message = f"{status}: {answer['error']}"
                bad_rows = [(int(r["row"]), str(r["reason"])) for r in answer.get("bad_rows", [])]
            except (ValueError, KeyError, TypeError):
                pass
            raise Rejected(message, bad_rows)
        raise ServerError(f"server {server.index}: HTTP {status}")


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (whole seconds by the standard; a fraction is accepted; an
    HTTP date or garbage counts as 1 s)."""
    try:
        delay = float(value) if value is not None else 1.0
    except ValueError:
        return 1.0
    return min(max(delay, 0.0), 60.0) if math.isfinite(delay) else 1.0


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class Outcome:
    """What a run of the client did (the demo and the tests read it)."""

    rows: int
    scored: int = 0
    predictions: list[float | None] = field(default_factory=list)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    given_up_rows: list[tuple[int, str]] = field(default_factory=list)  # retries ran out
    from_journal: int = 0  # rows
    sent_rows: int = 0
    sent_batches: int = 0
    split_batches: int = 0  # batches split in halves to isolate the rows a terse 400 refused
    requests: int = 0
    retried: Counter[str] = field(default_factory=Counter)  # reason -> batches retried for it
    retries: Counter[str] = field(default_factory=Counter)  # reason -> failed requests retried
    latencies: list[tuple[float, bool]] = field(default_factory=list)
    slots: int = 0
    # Summed over this job's runs, of the stage's pool (batches): submitted, succeeded,
    # failed, unfinished, attempts: what the Prometheus counters of pool "predict" say.
    counts: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0  # the whole job: reading, sending, writing
    sending: float = 0.0  # inside the pipeline

    @property
    def rows_given_up(self) -> int:
        """Rows not scored: the bad rows, and the rows whose retries ran out."""
        return len(self.bad_rows) + len(self.given_up_rows)


@dataclass
class Scorer:
    """The batch function of the batching stage: score a batch of rows, giving each row its
    own prediction or failure (a :class:`RowFailed` in its place fails that row alone).

    The whole batch is sent first: an error worth retrying (503, 429, a dropped connection)
    is raised, and the stage retries the whole batch. A 400 naming the bad rows sets them
    aside and sends the others again at once. A 400 that does not say which rows (or a
    413) splits the batch in halves, recursively (``call_batch_flat(split=True)``), each
    part retried on the same errors as a batch, until the rows that make it fail are alone.
    (The stage's own ``Batch(split=True)`` splits too, but does not retry the parts yet: a
    503 met while isolating a bad row would give up the good rows of that part.)
    """

    fleet: Fleet
    retry: conveyor.Retry
    split: bool = True
    splits: int = 0
    answered: int = 0  # rows answered (the progress line)
    batches: set[str] = field(default_factory=set)
    rows_sent: int = 0

    async def __call__(self, rows: list[Row]) -> list[float | RowFailed]:
        key = f"rows {rows[0].position}-{rows[-1].position} ({len(rows)})"
        if key not in self.batches:  # (a retry of a batch calls again with the same rows)
            self.batches.add(key)
            self.rows_sent += len(rows)
        values = [row.values for row in rows]
        send = functools.partial(self.send, key)
        try:
            entries: list[Any] = await send(values)
        except Rejected as error:
            if not self.split or len(values) < 2:
                error.batch_rows = len(values)  # every row of the batch gets this error
                raise
            self.splits += 1
            half = len(values) // 2
            entries = []
            for part in (values[:half], values[half:]):
                entries += await call_batch_flat(
                    send, part, split=True, split_on=is_rejected, retry=self.retry
                )
        self.answered += len(rows)
        return [self._entry(e) for e in entries]

    async def send(self, key: str, rows: list[tuple[Any, ...]]) -> list[Any]:
        """One part: its predictions; a 400 naming rows sets them aside and sends the rest."""
        try:
            return await self.fleet.predict_rows(key, rows)
        except Rejected as error:
            named = {i: why for i, why in error.bad_rows if 0 <= i < len(rows)}
            if not named:
                raise  # which rows, the server did not say: the caller splits
        rest = [i for i in range(len(rows)) if i not in named]
        scored = await self.send(key, [rows[i] for i in rest]) if rest else []
        entries: list[Any] = [RowFailed("bad row", why) for why in named.values()]
        placed: dict[int, Any] = dict(zip(named, entries, strict=True))
        placed.update(zip(rest, scored, strict=True))
        return [placed[i] for i in range(len(rows))]

    @staticmethod
    def _entry(entry: Any) -> float | RowFailed:
        if not isinstance(entry, Exception) or isinstance(entry, RowFailed):
            return entry
        if isinstance(entry, Rejected):  # a part of one row, refused whole: that row is bad
            return RowFailed("bad row", reason(entry))
        return RowFailed("given up", reason(entry))


async def score_file(
    input_path: Path,
    output_path: Path,
    urls: Sequence[str],
    *,
    batch_size: int = BATCH_SIZE,
    per_server: int = PER_SERVER,
    attempts: int = ATTEMPTS,
    progress: bool = True,
    split: bool = True,
    observers: Sequence[conveyor.Observer] = (),
) -> Outcome:
    """Score every row of ``input_path`` on the servers at ``urls``; write the outputs.

    The rows go through a one-stage pipeline whose stage is a batching stage: batches of
    ``batch_size`` rows, or fewer after ``MAX_WAIT`` seconds. ``split=False`` gives up every
    row of a batch refused by a 400 that names no row (the client had no other way before
    batching), to compare. ``observers`` watch the stage's pool (named ``"predict"``), e.g.
    a ``conveyor.PrometheusMetrics``."""
    started = time.perf_counter()
    rows = await trio.to_thread.run_sync(read_rows, input_path)
    outcome = Outcome(rows=len(rows), slots=len(urls) * per_server)
    journal = output_path.with_name(output_path.name + ".journal")
    retry = conveyor.Retry(
        attempts=attempts,
        backoff=conveyor.Backoff(initial=0.1, max=2.0),
        retry_on=RETRYABLE,
    )
    limits = httpx.Limits(max_connections=outcome.slots + len(urls),
                          max_keepalive_connections=outcome.slots)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as http:
        fleet = Fleet(urls, per_server, http)
        scorer = Scorer(fleet, retry, split)
        stage_pool = conveyor.LastReport()  # the stage's pool's own account (of batches)
        pipe = conveyor.pipeline(conveyor.stage(
            scorer, name=POOL_NAME, workers=outcome.slots, retry=retry, timeout=TIMEOUT,
            batch=conveyor.Batch(batch_size, max_wait=MAX_WAIT),
        ))
        sending = time.perf_counter()
        try:
            async with trio.open_nursery() as nursery:
                if progress:
                    nursery.start_soon(_show_progress, scorer, len(rows))
                report = await pipe.run(rows, journal=journal, key=row_key,
                                        observers=[*observers, stage_pool])
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the run's own error (Ctrl-C...), as it was
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        outcome.sending = time.perf_counter() - sending
    outcome.from_journal = len(report.succeeded) - report.stats.succeeded
    if stage_pool.report is not None:  # what the pool's metrics count: batches, attempts
        for counter in COUNTED:
            outcome.counts[counter] += getattr(stage_pool.report.stats, counter)
    outcome.sent_rows = scorer.rows_sent
    outcome.sent_batches = len(scorer.batches)
    outcome.split_batches = scorer.splits
    outcome.requests = len(fleet.latencies)
    predictions: list[float | None] = [None] * len(rows)
    for success in report.succeeded:
        row: Row = success.item
        if predictions[row.position] is not None:
            raise AssertionError(f"row {row.position} scored twice")
        predictions[row.position] = success.value
    for failed in report.failed:
        error = failed.error
        if isinstance(error, RowFailed):
            (outcome.bad_rows if error.kind == "bad row" else outcome.given_up_rows).append(
                (failed.item.position, error.why))
        elif isinstance(error, Rejected) and error.batch_rows == 1:  # that row is bad
            outcome.bad_rows.append((failed.item.position, reason(error)))
        elif isinstance(error, Rejected):  # split=False: the batch was refused whole
            outcome.given_up_rows.append(
                (failed.item.position, f"{reason(error)} (its whole batch of "
                                       f"{error.batch_rows} rows)"))
        else:  # the batch's retries ran out
            outcome.given_up_rows.append(
                (failed.item.position, f"{reason(error)} after {failed.attempts} attempts"))
    for unfinished in report.unfinished:  # pragma: no cover - only after a stop
        outcome.given_up_rows.append((unfinished.item.position, "unfinished"))
    for reasons in fleet.failures.values():
        for why, count in reasons.items():
            if count <= 0 or why.startswith(("400", "rejected")):
                continue
            outcome.retried[why] += 1
            outcome.retries[why] += count
    outcome.latencies = fleet.latencies
    outcome.predictions = predictions
    outcome.scored = sum(1 for p in predictions if p is not None)
    outcome.bad_rows.sort()
    outcome.given_up_rows.sort()
    await trio.to_thread.run_sync(write_outputs, output_path, outcome)
    outcome.elapsed = time.perf_counter() - started
    return outcome


async def _show_progress(scorer: Scorer, rows: int) -> None:
    """A live line on stderr: rows answered so far (a terminal only)."""
    if not sys.stderr.isatty():
        return
    try:
        while True:
            print(f"\rpredict | {scorer.answered:,}/{rows:,} rows | "
                  f"{len(scorer.fleet.latencies)} requests", end="", file=sys.stderr, flush=True)
            await trio.sleep(0.5)
    finally:
        print(file=sys.stderr, flush=True)


def failures_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".failures.csv")


def write_outputs(output_path: Path, outcome: Outcome) -> None:
    """``row,prediction`` in input order, and the failures file; each written to a temporary
    file first, then renamed, so a reader never sees half a file."""
    temporary = output_path.with_name(output_path.name + ".part")
    with temporary.open("w", newline="") as file:
        file.write("row,prediction\n")
        file.writelines(
            f"{row},{'' if value is None else repr(value)}\n"
            for row, value in enumerate(outcome.predictions)
        )
    os.replace(temporary, output_path)
    failures = failures_path(output_path)
    temporary = failures.with_name(failures.name + ".part")
    with temporary.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["kind", "rows", "attempts", "reason"])
        for position, why in outcome.bad_rows:
            writer.writerow(["bad row", position, 1, why])
        for position, why in outcome.given_up_rows:
            writer.writerow(["row", position, "", why])
    os.replace(temporary, failures)


# ---------------------------------------------------------------------------------------------
# The report


def ideal_seconds(outcome: Outcome) -> tuple[float, float]:
    """(ideal time at this fault rate, ideal time without faults).

    The ideal keeps every slot (``per_server`` x servers) busy, each request taking the
    median latency of the successful ones, with no time lost waiting for Retry-After or
    backoff: ``requests x median / slots``. At this fault rate the requests are every
    attempt made; without faults, one per batch sent.
    """
    good = [seconds for seconds, ok in outcome.latencies if ok]
    if not good or not outcome.slots:
        return 0.0, 0.0
    median = statistics.median(good)
    with_faults = len(outcome.latencies) * median / outcome.slots
    without = outcome.sent_batches * median / outcome.slots
    return with_faults, without


def format_report(outcome: Outcome, output_path: Path, servers: int) -> str:
    lines = [
        f"predict: {outcome.rows:,} rows, {servers} servers, {outcome.slots} requests at once "
        f"at most",
        f"  scored    {outcome.scored:,} rows -> {output_path}",
        f"  batches   {outcome.sent_batches} sent ({outcome.sent_rows:,} rows), "
        f"{outcome.from_journal:,} rows taken from the journal; {outcome.split_batches} split "
        f"in halves to isolate the rows a 400 refused without naming them; "
        f"{outcome.requests} requests",
    ]
    if outcome.retries:
        why = ", ".join(
            f"{reason_} x{outcome.retries[reason_]} ({outcome.retried[reason_]} batches)"
            for reason_ in sorted(outcome.retries, key=outcome.retries.__getitem__, reverse=True)
        )
        lines.append(f"  retried   {sum(outcome.retries.values())} requests: {why}")
    else:
        lines.append("  retried   nothing")
    rejected = len({p for p, _ in outcome.bad_rows})
    lines.append(
        f"  given up  {outcome.rows_given_up:,} rows: {rejected} bad rows (400), "
        f"{len(outcome.given_up_rows)} rows after retries -> {failures_path(output_path)}"
    )
    for position, why in outcome.bad_rows[:8]:
        lines.append(f"              row {position}: {why}")
    if len(outcome.bad_rows) > 8:
        lines.append(f"              ... and {len(outcome.bad_rows) - 8} more")
    for position, why in outcome.given_up_rows[:5]:
        lines.append(f"              row {position}: {why}")
    if len(outcome.given_up_rows) > 5:
        lines.append(f"              ... and {len(outcome.given_up_rows) - 5} more")
    with_faults, without = ideal_seconds(outcome)
    if with_faults:
        lines.append(
            f"  time      {outcome.elapsed:.1f} s in all, {outcome.sending:.1f} s sending; "
            f"ideal {with_faults:.1f} s at this fault rate ({len(outcome.latencies)} "
            f"requests x median latency / {outcome.slots} slots), {without:.1f} s without "
            f"faults: sending took {outcome.sending / with_faults:.2f}x the ideal"
        )
    else:
        lines.append(f"  time      {outcome.elapsed:.1f} s (no request succeeded: no ideal)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="CSV of feature rows (a header line first)")
    parser.add_argument("--servers", required=True,
                        help="comma-separated base URLs, e.g. http://127.0.0.1:8001,...")
    parser.add_argument("--output", type=Path, required=True,
                        help="predictions CSV (OUTPUT.journal and OUTPUT.failures.csv beside)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--per-server", type=int, default=PER_SERVER,
                        help="requests at once on each server")
    parser.add_argument("--attempts", type=int, default=ATTEMPTS, help="attempts per batch")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("--no-split", action="store_true",
                        help="give up a batch refused by a 400 that names no row, instead of "
                             "splitting it to isolate the bad rows (to compare)")


def main(args: argparse.Namespace) -> int:
    urls = [u for u in args.servers.split(",") if u]
    if not urls:
        raise SystemExit("client: --servers needs at least one URL")
    for name in ("batch_size", "per_server", "attempts"):
        if getattr(args, name) < 1:
            raise SystemExit(f"client: --{name.replace('_', '-')} must be >= 1")
    try:
        outcome = trio.run(
            lambda: score_file(
                args.input, args.output, urls, batch_size=args.batch_size,
                per_server=args.per_server, attempts=args.attempts,
                progress=not args.no_progress, split=not args.no_split,
            )
        )
    except KeyboardInterrupt:
        print("\ninterrupted: the batches done so far are in the journal; run the same "
              "command again to resume", file=sys.stderr, flush=True)
        return 130
    except conveyor.JournalError as error:
        raise SystemExit(f"client: {error}") from None
    print(format_report(outcome, args.output, len(urls)), flush=True)
    return 0


def iter_csv(path: Path) -> Iterator[list[str]]:
    """The rows of a CSV file (tests and the demo read outputs with it)."""
    with path.open(newline="") as file:
        yield from csv.reader(file)
