"""``demo --metrics-port PORT``: the client's pools as Prometheus metrics on 127.0.0.1.

A ``conveyor.PrometheusMetrics`` on a registry of its own, served by prometheus_client's HTTP
server (a thread) at ``http://127.0.0.1:PORT/metrics`` while the demo runs, stopped when it
ends. A scrape reads the running pool's counters through its trio thread, so a scrape every
second costs the pool nothing per item; only the two histograms are updated per attempt.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

import conveyor


@asynccontextmanager
async def serve_metrics(port: int | None) -> AsyncIterator[list[conveyor.Observer]]:
    """Serve the metrics of the pools given the yielded observers on ``port`` (0: any free
    port; None: no metrics, nothing served) until the block ends."""
    if port is None:
        yield []
        return
    try:
        import prometheus_client
    except ImportError:
        raise SystemExit("demo: --metrics-port needs prometheus_client: "
                         "pip install 'conveyor[prometheus]'") from None
    registry = prometheus_client.CollectorRegistry()
    metrics = conveyor.PrometheusMetrics(registry)
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1",
                                                         registry=registry)
    try:
        print(f"metrics: http://127.0.0.1:{server.server_port}/metrics", flush=True)
        yield [metrics]
    finally:
        # Blocks until the server's loop has stopped (up to 0.5 s): in a thread, so that the
        # event loop can still answer a scrape that is under way.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
        thread.join()


async def linger(seconds: float) -> None:
    """Keep serving the final values for ``seconds`` (so that a Prometheus scraping every
    15 s sees them), or until stdin closes, whichever comes first."""
    if seconds <= 0:
        return
    print(f"metrics: serving the final values for {seconds:g} s more "
          f"(close stdin, Ctrl-D, to stop now)", flush=True)
    with trio.move_on_after(seconds):
        await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
