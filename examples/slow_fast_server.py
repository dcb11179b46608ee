"""Seed 003 on trio: slow CPU-heavy requests must not hold up fast ones.

A Tornado server's slow, CPU-heavy GET blocked every other request; the fixes moved the work
to another process, then fought with results that never came back and worker errors that
lost their traceback or left the request hanging. Here the heavy work is one line,
``await conveyor.in_process(heavy_lifting)(rounds, fail)``: it runs in a worker process, the
event loop keeps serving, and a worker error comes back as the original exception with the
worker-side traceback.

Run the server, then the client (from another shell)::

    python examples/slow_fast_server.py --port 8888
    python examples/slow_fast_server.py --client http://127.0.0.1:8888

Endpoints: ``/fast?id=N`` answers at once; ``/slow?id=N`` does CPU-heavy work in a worker
process; ``/slow?fail=1`` fails in the worker and answers 500 with the worker's traceback.

The client reproduces the seed's test: one slow request alone (to time it), then 3 slow
requests followed at once by 20 fast ones, printing each as it completes. Wanted: every
fast one completes before the slow ones, and the slow ones run in parallel (together well
under 3 times one alone). Last, it shows the 500 body of ``/slow?fail=1``.

The server stops after ``--serve-for`` seconds (default 300), on SIGINT/SIGTERM, or when its
standard input is closed with ``--stop-on-eof`` (how the test stops it).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast
from urllib.parse import parse_qs

import trio

import conveyor

# About half a second of CPU per slow request on a typical machine.
SLOW_ROUNDS = 3000
FAST_COUNT = 20
SLOW_COUNT = 3

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# --------------------------------------------------------------------------------------------
# The heavy work: plain, sync, module level (a worker process imports it by name).


def heavy_lifting(rounds: int, fail: bool) -> tuple[int, float, float]:
    """The seed's heavy_lifting: CPU-bound factorials. Returns the worker's pid and the
    wall-clock times it started and ended, so a client can see jobs overlap."""
    started = time.time()
    for k in range(rounds):
        math.factorial(k)
    if fail:
        check_result(rounds)
    return os.getpid(), started, time.time()


def check_result(rounds: int) -> None:
    raise ValueError(f"heavy_lifting failed on purpose after {rounds} rounds (pid {os.getpid()})")


# --------------------------------------------------------------------------------------------
# The server: a minimal ASGI app on hypercorn's trio worker.

# Enough worker processes for the seed's 3 slow requests to run at once, even on 2 cores.
heavy = conveyor.in_process(
    heavy_lifting, limiter=trio.CapacityLimiter(max(SLOW_COUNT, os.cpu_count() or 1))
)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """A hand-written ASGI app: /fast, /slow, /slow?fail=1."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    request_id = query.get("id", ["?"])[0]
    if scope["path"] == "/fast":
        status, body = 200, f"fast result {request_id}"
    elif scope["path"] == "/slow":
        fail = query.get("fail", ["0"])[0] == "1"
        try:
            pid, started, ended = await heavy(SLOW_ROUNDS, fail)
        except Exception as exc:
            # The traceback includes the frames inside the worker process.
            status, body = 500, "".join(traceback.format_exception(exc))
        else:
            status = 200
            body = (
                f"slow result {request_id} <--- {ended - started:.3f} s"
                f" [pid {pid}, ran {started:.3f} to {ended:.3f}]"
            )
    else:
        status, body = 404, "not found"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


async def serve(port: int, serve_for: float, stop_on_eof: bool) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = trio.Event()

    # Start the worker processes before taking requests, so the first slow requests do not
    # pay for process start-up.
    async with trio.open_nursery() as warm:
        for _ in range(max(SLOW_COUNT, os.cpu_count() or 1)):
            warm.start_soon(heavy, 1, False)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: hypercorn_serve(
                # hypercorn types the ASGI messages as TypedDicts; this app reads plain dicts
                cast(Any, app), config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        print(f"serving on {binds[0]}", flush=True)
        async with trio.open_nursery() as watchers:
            watchers.start_soon(_stop_on_signal, stop)
            if stop_on_eof:
                watchers.start_soon(_stop_on_eof, stop)
            with trio.move_on_after(serve_for):
                await stop.wait()
            watchers.cancel_scope.cancel()
        stop.set()  # hypercorn shuts down gracefully, then the nursery ends
    print("server stopped", flush=True)


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _stop_on_eof(stop: trio.Event) -> None:
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
    stop.set()


# --------------------------------------------------------------------------------------------
# The client: the seed's test.


async def client(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        started = time.perf_counter()
        await http.get("/slow", params={"id": "0"})
        one = time.perf_counter() - started
        print(f"one slow request alone: {one:.3f} s", flush=True)

        start = time.perf_counter()
        slow_done: list[float] = []

        async def fetch(path: str, request_id: int) -> None:
            response = await http.get(path, params={"id": str(request_id)})
            response.raise_for_status()
            at = time.perf_counter() - start
            if path == "/slow":
                slow_done.append(at)
            print(f"{response.text}   (done at {at:.3f} s)", flush=True)

        async with trio.open_nursery() as nursery:
            for k in range(1, SLOW_COUNT + 1):
                nursery.start_soon(fetch, "/slow", k)
                await trio.lowlevel.checkpoint()  # send in order: the 3 slow ones first
            for k in range(1, FAST_COUNT + 1):
                nursery.start_soon(fetch, "/fast", k)
        together = max(slow_done)
        print(
            f"{SLOW_COUNT} slow requests together: {together:.3f} s"
            f" = {together / one:.2f} x one alone",
            flush=True,
        )

        response = await http.get("/slow", params={"fail": "1"})
        print(f"/slow?fail=1 -> {response.status_code}\n{response.text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--serve-for", type=float, default=300.0, help="stop after seconds")
    parser.add_argument("--stop-on-eof", action="store_true", help="stop when stdin closes")
    parser.add_argument("--client", metavar="URL", help="run the client against URL")
    args = parser.parse_args(argv)
    if args.client:
        trio.run(client, args.client)
    else:
        trio.run(serve, args.port, args.serve_for, args.stop_on_eof)


if __name__ == "__main__":
    main()
