"""Micro-batching: group items into batches by size or waiting time, and call a batch function
once per batch while giving each item its own result or error.

Two building blocks, used by the pipeline's batching stage (and usable on their own):

- :func:`collect` takes the next batch from a trio memory channel: it waits for a first item,
  then takes more until it holds ``size`` items or ``max_wait`` seconds have passed since the
  first one arrived, whichever comes first. :class:`Collector` does the same without a
  channel: items are put in with a plain method call (a list append), about ten times
  cheaper per item than a channel's ``send_nowait`` and ``receive_nowait``.
- :func:`call_batch` calls ``batch_fn(items)`` once and turns its answer into one
  :class:`outcome.Outcome` per item. With ``split=True`` a call that raises is split in halves,
  recursively, so that only the items that make the batch fail get the error (the poison row
  that makes a prediction server answer 400 for a whole batch). :func:`call_batch_flat` does
  the same and answers with one entry per item, the value or an ``Exception`` instance, so
  that a batch that succeeds whole costs no object per item.

Neither adds a task, a lock or a per-item await: collecting takes the items already waiting
without a checkpoint each.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

import outcome
import trio

from ._retry import Retry

__all__ = ["BatchAnswerError", "Collector", "call_batch", "call_batch_flat", "collect"]

T = TypeVar("T")


class BatchAnswerError(TypeError):
    """A batch function answered something other than one value per item, in order: a value
    that is not a sequence, or a sequence of another length than the batch.

    Every item of that batch fails with it. It is a bug in the batch function, so it would
    fail the same way again: it carries ``retryable = False`` (a pool records it at once and
    does not retry), and :func:`call_batch` never splits a batch because of it.
    """

    retryable = False


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"batch size must be an int >= 1, got {size!r}")
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return size


def _check_wait(max_wait: object) -> float:
    if isinstance(max_wait, bool) or not isinstance(max_wait, int | float):
        raise TypeError(f"max_wait must be a number of seconds >= 0, got {max_wait!r}")
    if not math.isfinite(max_wait) or max_wait < 0:
        raise ValueError(f"max_wait must be a finite number of seconds >= 0, got {max_wait!r}")
    return float(max_wait)


async def collect(receive: trio.MemoryReceiveChannel[T], size: int, max_wait: float) -> list[T]:
    """The next batch from ``receive``: between 1 and ``size`` items, in channel order.

    Waits (without limit) for a first item; then takes more until the batch holds ``size``
    items or ``max_wait`` seconds have passed since the first item was taken, whichever comes
    first. Items already waiting in the channel are taken at once, without a checkpoint each.
    With ``max_wait=0`` a batch is the first item plus whatever is already waiting. A
    producer slower than this consumer wakes it once per item (a trio scheduling round
    each); a :class:`Collector` wakes its taker once per batch.

    Returns ``[]`` once the channel has ended (every sender closed) and holds nothing more; a
    channel that ends while a batch is being filled ends that batch at once (the partial
    batch is returned, the next call returns ``[]``).

    **Cancellation handling** (nothing taken is ever lost):

    - cancelled while waiting for the first item: raises ``trio.Cancelled`` having taken
      nothing (every item is still in the channel);
    - cancelled after taking at least one item: returns the items taken so far (a batch
      smaller than ``size``, sooner than ``max_wait``) instead of raising. The cancel is not
      lost: trio's cancellation is level-triggered, so the caller's next checkpoint raises
      it; the caller must account for the returned items before that checkpoint.

    Args:
        receive: the channel to take items from (it is not closed here).
        size: the most items in a batch (an int >= 1).
        max_wait: seconds to wait for more items after the first one (finite, >= 0).

    Raises:
        TypeError, ValueError: ``size`` or ``max_wait`` out of range (before anything is
            taken).
        trio.ClosedResourceError: ``receive`` was closed.
    """
    _check_size(size)
    _check_wait(max_wait)
    try:
        first = await receive.receive()
    except trio.EndOfChannel:
        return []
    batch = [first]
    if size == 1:
        return batch
    deadline = trio.current_time() + max_wait
    take_nowait = receive.receive_nowait
    try:
        # One cancel scope for the whole wait (entering one per item costs more than the
        # item): the deadline ends it; each item is taken at once if it is there.
        with trio.move_on_at(deadline):
            while len(batch) < size:
                try:
                    batch.append(take_nowait())
                except trio.WouldBlock:
                    batch.append(await receive.receive())
    except trio.EndOfChannel:  # the batch goes at once; the next call returns []
        return batch
    except trio.Cancelled:
        # Items were taken (the first at least): hand them back as a batch rather than lose
        # them; the cancel reaches the caller at its next checkpoint.
        return batch
    return batch


class Collector(Generic[T]):
    """Items put in one at a time; batches taken out by size or waiting time.

    :meth:`put` is a plain method (no await, no checkpoint): it appends the item, and wakes a
    task waiting in :meth:`take` only when the item is the first of a batch or completes
    one. :meth:`take` returns the next batch: between 1 and ``size`` items, in the order
    they were put, as soon as ``size`` items are there, or ``max_wait`` seconds after the
    first of them was put, or at once when the collector is closed; ``[]`` once it is closed
    and empty.

    A collector is unbounded: the caller bounds what it puts in (a pipeline stage holds at
    most its room's items). Items waiting when a batch is taken start the next batch, and
    their ``max_wait`` counts from that moment.

    **Cancellation handling**: :meth:`take` removes the items only as it returns them (no
    checkpoint in between), so a take that is cancelled takes nothing: every item stays in
    the collector for the next take. Nothing taken is ever lost.

    Args:
        size: the most items in a batch (an int >= 1).
        max_wait: seconds a batch waits for more items after its first one (finite, >= 0).

    Raises:
        TypeError, ValueError: ``size`` or ``max_wait`` out of range.
    """

    __slots__ = ("_closed", "_first_at", "_head", "_items", "_lot", "_max_wait", "_size")

    def __init__(self, size: int, max_wait: float) -> None:
        self._size = _check_size(size)
        self._max_wait = _check_wait(max_wait)
        # The items waiting are _items[_head:]: a take moves _head, and the taken ones are
        # cut off only once they are half the list (a take costs its batch, not the backlog).
        self._items: list[T] = []
        self._head = 0
        self._first_at = 0.0  # when the first item of the forming batch was put
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False

    def __len__(self) -> int:
        """The number of items waiting."""
        return len(self._items) - self._head

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def put(self, item: T) -> None:
        """Add ``item`` to the forming batch (never blocks).

        Raises:
            trio.ClosedResourceError: the collector was closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("put on a closed Collector")
        items = self._items
        items.append(item)
        n = len(items) - self._head
        if n == 1:
            self._first_at = trio.current_time()
            if self._lot:
                self._lot.unpark_all()
        elif n == self._size and self._lot:
            self._lot.unpark_all()

    def put_many(self, items: list[T]) -> None:
        """Add ``items``, in order, as :meth:`put` would one by one (in one call).

        Raises:
            trio.ClosedResourceError: the collector was closed (nothing was added).
        """
        if self._closed:
            raise trio.ClosedResourceError("put on a closed Collector")
        if not items:
            return
        waiting = self._items
        before = len(waiting) - self._head
        waiting.extend(items)
        if before == 0:
            self._first_at = trio.current_time()
        if self._lot and (before == 0 or before < self._size <= before + len(items)):
            self._lot.unpark_all()

    def close(self) -> None:
        """No more items: the items waiting go out as a last batch (or batches), at once."""
        self._closed = True
        self._lot.unpark_all()

    def drain(self) -> list[T]:
        """Remove and return every item waiting (for a caller that gives up on them)."""
        items = self._items[self._head:]
        self._items = []
        self._head = 0
        return items

    async def take(self) -> list[T]:
        """The next batch; ``[]`` once the collector is closed and empty."""
        await trio.lowlevel.checkpoint()
        size = self._size
        while True:
            while not len(self):
                if self._closed:
                    return []
                await self._lot.park()
            if len(self) < size and not self._closed:
                deadline = self._first_at + self._max_wait
                if deadline > trio.current_time():
                    with trio.move_on_at(deadline):
                        while len(self) < size and not self._closed:
                            await self._lot.park()
            if len(self):  # (another taker may have emptied it meanwhile: wait again)
                break
        # From here to the return, no checkpoint: the items are taken exactly as returned.
        items = self._items
        head = self._head
        if len(items) - head <= size:
            batch = items[head:] if head else items
            self._items = []
            self._head = 0
            return batch
        batch = items[head:head + size]
        head += size
        if head * 2 >= len(items):
            del items[:head]
            head = 0
        self._head = head
        self._first_at = trio.current_time()
        return batch


async def call_batch(
    batch_fn: Callable[[list[Any]], Any],
    items: list[Any],
    *,
    split: bool,
    split_on: Callable[[Exception], bool] | None = None,
    retry: Retry | None = None,
) -> list[outcome.Outcome[Any]]:
    """Call ``batch_fn(items)`` and give each item its own outcome, in order.

    ``batch_fn`` takes a list of items and returns one value per item, in the same order: a
    sequence (list, tuple, or any sized iterable that is not a str, bytes or mapping) of
    ``len(items)`` entries. It may be an ``async def`` function or return an awaitable (then
    awaited); a sync function is called on the event loop (offload heavy work, e.g. with
    ``conveyor.in_process``).

    What each item gets:

    - the entry at its index, as ``outcome.Value``; except that an entry which is an
      ``Exception`` *instance* fails only that item, as ``outcome.Error`` (so a batch function
      reports a bad row by putting its exception in that row's place, and the others
      succeed). To give an item an exception object as its *value*, wrap it.
    - if the call raises an ``Exception``: with ``split=False``, or for a single item, every
      item fails with that error (each with its own copy, same type, args, ``__cause__`` and
      traceback). With ``split=True`` and more than one item, the batch is split in two
      halves (the first ``len // 2`` items, then the rest), each called again, recursively:
      only the items that make a call fail get its error, from the call of the smallest
      part that failed. With ``p`` such items among ``n``, that is at most
      ``1 + 2 p ceil(log2 n)`` calls, the halves one after the other. ``split_on`` (a
      predicate on the error) limits splitting to the errors it accepts, e.g. a 400 naming
      a bad row but not a 503 that a retry heals; by default every ``Exception`` splits.
    - an answer that is not one value per item fails every item of that call with
      :class:`BatchAnswerError`, naming both lengths; it is never split nor retried.
    - with ``retry`` (a :class:`conveyor.Retry`), a call that raises an error the policy
      retries (``retry.should_retry(error, attempts)``, attempts counted per call: the whole
      batch, or one part of it) is made again after ``retry.delay(error, attempts)``
      seconds, before any split. This is for the parts of a split batch: while a poison row
      is being isolated, a half that meets a 503 is retried rather than failed, so the good
      rows in it are not given up. An error the policy does not retry, or one that is still
      there when the attempts run out, then splits (``split_on`` permitting) or fails the
      items. The policy's ``budget`` is not applied here (the caller's pool applies it to
      the whole call).

    ``BaseException`` that is not an ``Exception`` (``trio.Cancelled``, ``KeyboardInterrupt``)
    propagates: a cancel during a call leaves the outcomes of the parts already called
    behind, so the caller accounts for every item of ``items`` itself.

    Args:
        batch_fn: the batch function, sync or async.
        items: the batch (not modified; each call gets a list of its own).
        split: split a failing batch in halves to isolate the items that make it fail.
        split_on: which errors split a batch (with ``split=True``); None: every error.
        retry: retry each call (each part of a split batch) per this policy; None: never.

    Returns:
        ``len(items)`` outcomes, in the order of ``items`` (``[]`` for no items, without
        calling ``batch_fn``).
    """
    entries = await call_batch_flat(
        batch_fn, items, split=split, split_on=split_on, retry=retry
    )
    error_type, Value, Error = Exception, outcome.Value, outcome.Error
    return [Error(e) if isinstance(e, error_type) else Value(e) for e in entries]


async def call_batch_flat(
    batch_fn: Callable[[list[Any]], Any],
    items: list[Any],
    *,
    split: bool,
    split_on: Callable[[Exception], bool] | None = None,
    retry: Retry | None = None,
) -> list[Any]:
    """:func:`call_batch` without the outcome objects: one entry per item, in order, which
    is the item's value, or an ``Exception`` instance when the item failed.

    The same calls, splitting and errors as :func:`call_batch`; only the shape of the answer
    differs. It exists for speed: a batch that succeeds whole costs no object per item (the
    batch function's own list is returned), where an ``outcome.Value`` costs about ten
    times a tuple. Use it where items are counted by the million; :func:`call_batch` where
    an ``Outcome`` per item reads better.
    """
    if not callable(batch_fn):
        raise TypeError(f"batch_fn must be callable, got {batch_fn!r}")
    if not isinstance(split, bool):
        raise TypeError(f"split must be True or False, got {split!r}")
    if split_on is not None and not callable(split_on):
        raise TypeError(f"split_on must be a callable taking the error, or None, got {split_on!r}")
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(f"retry must be a conveyor.Retry or None, got {retry!r}")
    if not items:
        return []
    return await _call(batch_fn, items, split, split_on, retry)


async def _call(
    batch_fn: Callable[[list[Any]], Any],
    items: list[Any],
    split: bool,
    split_on: Callable[[Exception], bool] | None,
    retry: Retry | None,
) -> list[Any]:
    n = len(items)
    attempts = 0
    while True:
        attempts += 1
        try:
            answer = batch_fn(list(items))  # its own list: items stay as they are
            if inspect.isawaitable(answer):
                answer = await answer
            else:  # a sync batch function: still a checkpoint, as every trio async call is
                await trio.lowlevel.checkpoint()
            break
        except Exception as error:
            if retry is not None and retry.should_retry(error, attempts):
                await trio.sleep(retry.delay(error, attempts))
                continue
            if split and n > 1 and _should_split(split_on, error):
                half = n // 2
                first = await _call(batch_fn, items[:half], split, split_on, retry)
                return first + await _call(batch_fn, items[half:], split, split_on, retry)
            return _fail_all(error, n)
    try:
        return _as_list(answer, n)
    except BatchAnswerError as error:
        return _fail_all(error, n)


def _should_split(split_on: Callable[[Exception], bool] | None, error: Exception) -> bool:
    if split_on is None:
        return True
    return bool(split_on(error))  # an error raised by split_on itself propagates


def _as_list(answer: object, n: int) -> list[Any]:
    if type(answer) is list:  # the batch function's own list, handed on as it is
        values: list[Any] = answer
    elif (
        isinstance(answer, str | bytes | bytearray | Mapping)
        or not isinstance(answer, Iterable)
    ):
        raise BatchAnswerError(
            f"the batch function must return a sequence of one value per item ({n}, in"
            f" order), got {type(answer).__name__} {_short_repr(answer)}"
        )
    else:
        values = list(answer)
    if len(values) != n:
        raise BatchAnswerError(
            f"the batch function returned {len(values)} values for a batch of {n} items:"
            f" it must return exactly one value per item, in order (an Exception instance"
            f" in an item's place fails that item alone)"
        )
    return values


def _fail_all(error: Exception, n: int) -> list[Any]:
    # Each item gets its own copy: one exception object raised from many tasks would collect
    # all their frames in one traceback.
    failures: list[Any] = [error]
    for _ in range(n - 1):
        failures.append(_copy_error(error))
    return failures


def _copy_error(error: Exception) -> Exception:
    try:
        twin = copy.copy(error)
    except Exception:
        return error
    twin.__cause__ = error.__cause__
    twin.__context__ = error.__context__
    twin.__suppress_context__ = error.__suppress_context__
    twin.__traceback__ = error.__traceback__
    return twin


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split_calls_bound(n: int, poison: int) -> int:
    """The most calls :func:`call_batch` makes with ``split=True`` for ``n`` items of which
    ``poison`` make any call containing them fail (tests check it)."""
    if poison == 0:
        return 1
    return 1 + 2 * poison * math.ceil(math.log2(n))

