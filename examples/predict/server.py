"""A flaky prediction server: ``POST /predict`` on hypercorn's trio worker.

``POST /predict`` with ``{"rows": [[x0, ..., x7], ...]}`` answers ``{"predictions": [...]}``,
one per row, from :mod:`examples.predict.model`, computed in a worker process through
``conveyor.in_process`` so that a big batch does not hold up the event loop (other requests,
health checks, the 429s keep being answered at once).

Answers, and when:

- 400 ``{"error": ..., "bad_rows": [{"row": i, "reason": ...}]}``: a row with a NaN, a wrong
  width, a value that is not a number or is out of range (every bad row of the batch is
  found; the first 20 are named, by index in the batch); 400 too for a body that is not
  JSON or not a batch. With ``--terse-400`` the answer does not say which row, nor why:
  ``{"error": "bad input"}`` for the whole batch, as many real services answer.
- 413: a body over ``--max-body`` bytes (told by Content-Length, or found while reading).
- 429 with ``Retry-After``: more than ``--max-concurrent`` requests at once.
- 503 with ``Retry-After``: a ``--fail-rate`` fraction of requests (an overloaded replica).
- A dropped connection: a ``--drop-rate`` fraction of requests are computed, then the
  connection is closed half-way through the answer.
- ``GET /health``: 200 ``ok``; ``GET /stats``: the server's counters as JSON.

It never crashes on bad input: every request gets an answer (or a deliberate drop), and
only the 5 lines of the handler that call the model could answer 500 (they do not).

Run: ``python -m examples.predict serve --port 0 --fail-rate 0.1``. The first line on
stdout is ``listening on 127.0.0.1:PORT``. It stops after ``--serve-for`` seconds, when
its stdin closes (``--stop-on-eof``), or on SIGINT/SIGTERM, and then prints its counters.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import trio

import conveyor

from .model import BadBatch, check_batch, score_rows

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

score = conveyor.in_process(score_rows)


class Faults:
    """The fault-injection settings, and the server's counters."""

    def __init__(
        self,
        *,
        fail_rate: float = 0.0,
        drop_rate: float = 0.0,
        max_concurrent: int | None = None,
        retry_after: int = 1,
        max_body: int = 1 << 20,
        delay: float = 0.0,
        seed: int | None = None,
        terse_400: bool = False,
    ) -> None:
        for name, rate in (("fail-rate", fail_rate), ("drop-rate", drop_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {rate}")
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {max_concurrent}")
        self.fail_rate = fail_rate
        self.drop_rate = drop_rate
        self.max_concurrent = max_concurrent
        self.retry_after = retry_after
        self.max_body = max_body
        self.delay = delay
        self.terse_400 = terse_400
        self.random = random.Random(seed)
        self.in_flight = 0
        self.counts: Counter[str] = Counter()


def make_app(faults: Faults) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app, with its fault settings."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            await _answer(send, 200, b"ok", content_type=b"text/plain")
        elif path == "/stats" and method == "GET":
            await _answer_json(send, 200, dict(faults.counts))
        elif path == "/predict" and method == "POST":
            faults.in_flight += 1
            try:
                await _predict(faults, scope, receive, send)
            finally:
                faults.in_flight -= 1
        elif path in ("/health", "/stats", "/predict"):
            await _answer_json(send, 405, {"error": f"{method} not allowed on {path}"})
        else:
            await _answer_json(send, 404, {"error": f"no such path: {path}"})

    return app


async def _predict(faults: Faults, scope: Scope, receive: Receive, send: Send) -> None:
    counts = faults.counts
    counts["requests"] += 1
    retry_after = [(b"retry-after", str(faults.retry_after).encode())]
    if faults.max_concurrent is not None and faults.in_flight > faults.max_concurrent:
        counts["429"] += 1
        await _answer_json(send, 429, {"error": "too many requests at once"}, retry_after)
        return
    if faults.fail_rate and faults.random.random() < faults.fail_rate:
        counts["503"] += 1
        await _answer_json(send, 503, {"error": "overloaded, try later"}, retry_after)
        return
    body = await _read_body(faults, scope, receive)
    if body is None:
        counts["413"] += 1
        await _answer_json(send, 413, {"error": f"body over {faults.max_body} bytes"})
        return
    try:
        rows = check_batch(json.loads(body))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError too
        counts["400"] += 1
        bad_rows = error.rows if isinstance(error, BadBatch) else []
        message = str(error) if isinstance(error, BadBatch) else f"not JSON: {error}"
        if faults.terse_400:
            bad_rows, message = [], "bad input"
        await _answer_json(
            send, 400,
            {"error": message, "bad_rows": [{"row": i, "reason": why} for i, why in bad_rows]},
        )
        return
    if faults.delay:
        await trio.sleep(faults.delay)
    predictions = await score(rows)
    payload = json.dumps({"predictions": predictions}).encode()
    if faults.drop_rate and faults.random.random() < faults.drop_rate:
        # Half the answer, then the connection is closed (hypercorn closes it when the app
        # returns before the announced Content-Length was sent).
        counts["dropped"] += 1
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode())],
        })
        await send({"type": "http.response.body", "body": payload[: len(payload) // 2],
                    "more_body": True})
        return
    counts["200"] += 1
    counts["rows"] += len(rows)
    await _answer(send, 200, payload)


async def _read_body(faults: Faults, scope: Scope, receive: Receive) -> bytes | None:
    """The request body, or None when it is over the size limit."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > faults.max_body:
                    return None
            except ValueError:
                pass
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > faults.max_body:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", content_type), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


async def _answer_json(
    send: Send, status: int, data: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _answer(send, status, json.dumps(data).encode(), headers)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve(port: int, faults: Faults, serve_for: float, stop_on_eof: bool) -> None:
    """Serve on 127.0.0.1:``port`` (0: a free port) until told to stop."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None  # the "Running on" banner; stdout's first line says it instead
    stop = trio.Event()
    await score([[0.0] * 8])  # start a worker process before taking requests
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: hypercorn_serve(
                # hypercorn types the ASGI messages as TypedDicts; this app reads plain dicts
                cast(Any, make_app(faults)), config, shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        print(f"listening on {binds[0].removeprefix('http://')}", flush=True)
        async with trio.open_nursery() as watchers:
            watchers.start_soon(_stop_on_signal, stop)
            if stop_on_eof:
                watchers.start_soon(_stop_on_eof, stop)
            with trio.move_on_after(serve_for):
                await stop.wait()
            watchers.cancel_scope.cancel()
        stop.set()
    print(f"stopped: {json.dumps(dict(faults.counts), sort_keys=True)}", flush=True)


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _stop_on_eof(stop: trio.Event) -> None:
    await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
    stop.set()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--fail-rate", type=float, default=0.0,
                        help="fraction of requests answered 503 with Retry-After")
    parser.add_argument("--drop-rate", type=float, default=0.0,
                        help="fraction of answers cut off half-way (connection closed)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="answer 429 with Retry-After above this many requests at once")
    parser.add_argument("--retry-after", type=int, default=1,
                        help="the Retry-After of 429 and 503 answers, whole seconds")
    parser.add_argument("--max-body", type=int, default=1 << 20,
                        help="refuse bodies over this many bytes with 413")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds added to every prediction (to watch a slow fleet)")
    parser.add_argument("--terse-400", action="store_true",
                        help="a 400 does not say which rows are bad, nor why")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault draws")
    parser.add_argument("--serve-for", type=float, default=300.0, help="stop after seconds")
    parser.add_argument("--stop-on-eof", action="store_true", help="stop when stdin closes")


def main(args: argparse.Namespace) -> None:
    try:
        faults = Faults(
            fail_rate=args.fail_rate, drop_rate=args.drop_rate,
            max_concurrent=args.max_concurrent, retry_after=args.retry_after,
            max_body=args.max_body, delay=args.delay, seed=args.seed,
            terse_400=args.terse_400,
        )
    except ValueError as error:
        raise SystemExit(f"serve: {error}") from None
    trio.run(serve, args.port, faults, args.serve_for, args.stop_on_eof)
