"""The system task behind a bare ``async for`` loop (``conveyor.map``, ``Pipeline.map``).

A nursery must not stay open across the caller's loop (leaving it early would exit cancel
scopes out of order), so the work runs in a system task, and the caller's loop reads its
records directly. A host is all that task holds: never the reader, so that dropping the
reader (leaving the loop) finalises it at once. Subclasses say what runs (:meth:`body`),
what happens once it ended (:meth:`ended`) and how to stop it (:meth:`halt`).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, ClassVar, NoReturn

import trio

from ._records import Record

__all__ = ["BareHost", "Entered", "EnteredStream"]


class Entered:
    """An ``async with`` block around an inner context manager (``_cm``, set by the
    subclass's ``__aenter__``): leaving the block leaves it, once (``open_pool``,
    ``Pipeline.open``, and the streams below)."""

    __slots__ = ("_cm",)
    _cm: AbstractAsyncContextManager[Any] | None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._cm is not None
        cm, self._cm = self._cm, None
        left: bool | None = await cm.__aexit__(exc_type, exc, tb)
        return left


class EnteredStream(Entered):
    """The ``async with`` form of a stream (``conveyor.map``, ``Pipeline.map``): entering
    it enters the subclass's :meth:`_open`, and leaving it leaves that."""

    def _open(self) -> AbstractAsyncContextManager[AsyncIterator[Record]]:
        raise NotImplementedError

    async def __aenter__(self) -> AsyncIterator[Record]:
        self._cm = self._open()
        entered: AsyncIterator[Record] = await self._cm.__aenter__()
        return entered


class BareHost:
    """Runs :meth:`body` in a system task; hands its failure to the reader."""

    __slots__ = ("done", "failure", "scope", "token")
    task_name: ClassVar[str]

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.failure: BaseException | None = None
        self.token = trio.lowlevel.current_trio_token()

    def start(self) -> None:
        trio.lowlevel.spawn_system_task(
            self._main, context=contextvars.copy_context(), name=self.task_name
        )

    async def _main(self) -> None:
        try:
            with self.scope:
                await self.body()
        except BaseException as exc:  # a system task must not raise: hand it over
            self.failure = exc
        finally:
            self.done.set()
            self.ended()

    async def body(self) -> None:
        """The work: the pool or pipeline's run, around its journal."""
        raise NotImplementedError

    def ended(self) -> None:
        """The work has ended (or never ran): wake the reader."""

    def halt(self) -> None:
        """Stop the work now (from trio's thread)."""
        raise NotImplementedError

    async def end(self) -> NoReturn:
        """The reader found nothing more: wait for the end, raise the work's own error."""
        await self.done.wait()
        failure, self.failure = self.failure, None
        if failure is not None and not isinstance(failure, trio.Cancelled):
            raise failure
        raise StopAsyncIteration

    async def interrupted(self) -> None:
        """The reader was cancelled or failed while waiting: stop the work, wait for it.

        An error of the work's own (from ``items``) is raised rather than the cancel: a
        cancel must not swallow it.
        """
        self.halt()
        with trio.CancelScope(shield=True):
            await self.done.wait()
        failure = self.failure
        if failure is not None and not isinstance(failure, trio.Cancelled):
            self.failure = None
            raise failure
