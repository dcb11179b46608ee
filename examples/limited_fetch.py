"""Seed 002 on trio: keep to a server's limits with a limiter and a rate, or find them.

The seed limits a scraper with a ``BoundedSemaphore(3)`` around a thread pool because "the
API is rate limited" and there is "no option to control concurrency". Here the limits are
options of the pool, held around every attempt (retries included):

- ``limiter=4``: at most 4 requests at once (a ``trio.CapacityLimiter`` shared between
  pools would make that hold across a whole program);
- ``rate=conveyor.Rate(40)``: at most 40 requests start per second;
- or ``adaptive=conveyor.Adaptive(...)``: no fixed numbers; the concurrency grows while the
  server answers and halves when it answers 429, so the client finds what it can take.

The server (:class:`CountingServer`, a plain ASGI app served by hypercorn on 127.0.0.1)
records how many requests it serves at once and answers 429 to a request when it already
accepted ``per_second`` requests in the last second (rejected ones do not count, as with a
token bucket). Its own counters prove the limits held.

    python examples/limited_fetch.py                  # both runs against a local server
    python examples/limited_fetch.py --adaptive-only
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

import conveyor

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

URLS = 200


class CountingServer:
    """An ASGI app that counts what it serves and pushes back above ``per_second``.

    Attributes:
        serving: requests being served now.
        peak: the most it ever served at once.
        arrived: requests that arrived; ``ok`` answered 200; ``rejected`` answered 429
            (when ``per_second`` requests were already accepted in the last second).
    """

    def __init__(self, per_second: int, latency: float) -> None:
        self.per_second = per_second
        self.latency = latency
        self.serving = 0
        self.peak = 0
        self.arrived = 0
        self.ok = 0
        self.rejected = 0
        self._recent: deque[float] = deque()  # arrival times within the last second

    def reset(self) -> None:
        self.peak = self.arrived = self.ok = self.rejected = 0
        self._recent.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        now = trio.current_time()
        recent = self._recent
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        self.arrived += 1
        if len(recent) >= self.per_second:
            self.rejected += 1
            await _respond(send, 429, b"too many requests\n", [(b"retry-after", b"1")])
            return
        recent.append(now)
        self.serving += 1
        self.peak = max(self.peak, self.serving)
        try:
            await trio.sleep(self.latency)  # the work behind the endpoint
        finally:
            self.serving -= 1
        self.ok += 1
        await _respond(send, 200, scope["path"].encode() + b"\n", [])


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def start_server(
    nursery: trio.Nursery, app: CountingServer
) -> tuple[str, trio.CancelScope]:
    """Serve ``app`` on a free port of 127.0.0.1; return its base URL and a scope to stop it."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    binds: list[str] = await nursery.start(run)
    return binds[0], scope


class TooManyRequests(Exception):
    """The server answered 429. Carries its Retry-After, which conveyor's retry honours."""

    def __init__(self, url: str, retry_after: float) -> None:
        super().__init__(f"429 for {url}")
        self.retry_after = retry_after


def fetcher(client: httpx.AsyncClient) -> Callable[[str], Awaitable[str]]:
    async def fetch(url: str) -> str:
        response = await client.get(url)
        if response.status_code == 429:
            raise TooManyRequests(url, float(response.headers.get("retry-after", "1")))
        response.raise_for_status()
        return response.text

    return fetch


async def fetch_all(
    base: str,
    *,
    limiter: trio.CapacityLimiter | int | None = None,
    rate: conveyor.Rate | None = None,
    adaptive: conveyor.Adaptive | None = None,
    count: int = URLS,
) -> conveyor.Report:
    """Fetch ``count`` URLs of ``base`` through conveyor with the given limits."""
    urls = [f"{base}/item/{i}" for i in range(count)]
    retry = conveyor.Retry(attempts=8, retry_on=(TooManyRequests, httpx.TransportError))
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        return await conveyor.run(
            fetcher(client), urls, workers=32, retry=retry,
            limiter=limiter, rate=rate, adaptive=adaptive,
        )


def describe(name: str, report: conveyor.Report, app: CountingServer, elapsed: float) -> str:
    s = report.stats
    return (
        f"{name}: {len(report.succeeded)} fetched, {len(report.failed)} failed, "
        f"{len(report.unfinished)} unfinished in {elapsed:.1f} s | server: peak {app.peak} "
        f"at once, {app.rejected} answered 429 | attempts {s.attempts}, "
        f"latency p50 {1000 * (s.attempt_latency.p50 or math.nan):.0f} ms"
        + (f" | adaptive limit now {s.adaptive_limit}" if s.adaptive_limit is not None else "")
    )


async def main(per_second: int, latency: float, fixed: bool, adaptive: bool) -> None:
    app = CountingServer(per_second=per_second, latency=latency)
    async with trio.open_nursery() as nursery:
        base, server = await start_server(nursery, app)
        print(f"server on {base}: answers 429 above {per_second} requests/s", flush=True)
        if fixed:
            t0 = trio.current_time()
            report = await fetch_all(base, limiter=4, rate=conveyor.Rate(per_second * 0.8))
            print(describe("limiter=4, rate=Rate(0.8 x server's)", report, app,
                           trio.current_time() - t0), flush=True)
            app.reset()
            await trio.sleep(1.1)  # let the server's one-second window empty
        if adaptive:
            t0 = trio.current_time()
            limit = conveyor.Adaptive(overload_on=TooManyRequests, min=1, max=32)
            report = await fetch_all(base, adaptive=limit)
            print(describe("adaptive, no rate", report, app, trio.current_time() - t0),
                  flush=True)
        server.cancel()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-second", type=int, default=50, help="the server's limit")
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds/request")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fixed-only", action="store_true")
    group.add_argument("--adaptive-only", action="store_true")
    args = parser.parse_args(argv)
    trio.run(main, args.per_second, args.latency, not args.adaptive_only, not args.fixed_only)


if __name__ == "__main__":
    cli()
