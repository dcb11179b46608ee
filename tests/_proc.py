"""Helpers for the end-to-end tests that run an example as a real process."""

from __future__ import annotations

import trio


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    """One line from a child's stdout (byte by byte: nothing past the newline is consumed)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data.decode()
