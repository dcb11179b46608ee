"""Pipelines: a sequence of stages, each an engine of its own, with one ledger from input to
output. See docs/design.md, "Pipelines".

Shape::

    items / submit() ─► stage 0 ─► stage 1 ─► ... ─► stage n-1 ─► the ledger ─► results / report
                        (engines linked directly: a worker hands its value into the next
                         stage's work channel; see ``_stages``)

This module holds the declarations (:func:`stage`, :class:`Batch`, :func:`pipeline`), one run
of a pipeline (:class:`_Run`: intake, the ledger of inputs, the output, stop and the
lifetime) and its readers. Every input is an :class:`_Input` (its branches alive, its
outputs, its first failure); every job inside a stage's engine carries it (``Job.origin``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from itertools import compress, islice, repeat
from operator import add, attrgetter
from typing import TYPE_CHECKING, Any, NoReturn, cast, final

import trio
from trio.lowlevel import ParkingLot

from ._api import items_total, make_engine, with_progress
from ._final import NoPublicConstructor
from ._host import BareHost, Entered, EnteredStream
from ._journal import JournalSpec, check_journal, journaled
from ._limits import Adaptive, PerKey, Rate, build_limits
from ._observe import Observer
from ._options import (
    SHAPE,
    check_bool,
    check_count,
    check_drain,
    check_fn,
    check_items,
    check_options,
    check_seconds,
    describe_callable,
    invalid,
)
from ._pool import running as running_pool
from ._pool import sole_error
from ._pool_options import check_name, check_observers, resolve
from ._progress import PipelineProgress, Progress

if TYPE_CHECKING:
    from ._engine import Engine, Job
from ._records import Failed, Record, Report, Succeeded, Unfinished, with_index
from ._retry import Retry
from ._stages import BatchStage, StageRun, Stopped, make_stage
from ._stats import Stats
from ._window import Window

__all__ = ["Batch", "Pipeline", "PipelineRun", "PipelineStream", "Stage", "pipeline", "stage"]

Items = Iterable[Any] | AsyncIterable[Any]

logger = logging.getLogger("conveyor")
_make = tuple.__new__
_index_of = attrgetter("index")
_item_of = attrgetter("item")
_attempts_of = attrgetter("attempts")
_MISSING: Any = object()


# ---------------------------------------------------------------------------- declaring


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Makes a stage a batching stage: ``stage(fn, batch=Batch(500, max_wait=0.05))``.

    Items are grouped into batches of up to ``size`` items; a batch goes when it is full or
    ``max_wait`` seconds after its first item arrived, whichever comes first. ``fn`` is
    called once per batch with the list of its items and returns one value per item, in
    order; an ``Exception`` instance in an item's place fails that item alone.

    ``split``: a batch call that raises an error the stage's ``retry`` would not retry (a
    400 naming a bad row) is split in halves, recursively, so that only the items that make
    it fail get the error. Errors the policy retries (a 503) retry the whole batch; met by
    a part of a split batch, they retry that part, by the same policy (its attempts counted
    per part), so a transient error while a bad row is being isolated gives up no good item.
    """

    size: int
    max_wait: float = 0.05
    split: bool = False

    def __post_init__(self) -> None:
        check_count("size", self.size, minimum=1, owner="Batch", example="size=500")
        check_seconds("max_wait", self.max_wait, minimum=0, owner="Batch",
                      example="max_wait=0.05")
        check_bool("split", self.split, owner="Batch")


@final
class Stage(metaclass=NoPublicConstructor):
    """One stage of a pipeline, as made by :func:`conveyor.stage` (read-only)."""

    _factory = "conveyor.stage(fn, ...)"

    __slots__ = ("batch", "fanout", "fn", "name", "options")

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        options: dict[str, Any],
        batch: Batch | None,
        fanout: bool,
    ) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self.batch = batch
        self.fanout = fanout

    def __repr__(self) -> str:
        kind = " batch" if self.batch else " fan-out" if self.fanout else ""
        return f"<conveyor.Stage {self.name!r}{kind}>"

    @property
    def capacity(self) -> int:
        """The most items this stage holds at once, its unread output included."""
        workers: int = self.options["workers"]
        buffer: int | None = self.options["buffer"]
        held = (max(256, workers) if buffer is None else buffer) + workers
        if self.batch is not None:
            # The pool holds `held` batches; one more batch fills in front of it.
            return (held + 1) * self.batch.size
        return held


def _is_async_generator_function(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isasyncgenfunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's
    return not inspect.isfunction(fn) and call is not None and inspect.isasyncgenfunction(call)


def stage(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    workers: int = 10,
    buffer: int | None = None,
    retry: Retry | None = None,
    timeout: float | None = None,
    limiter: trio.CapacityLimiter | int | None = None,
    rate: Rate | None = None,
    per_key: PerKey[Any] | None = None,
    adaptive: Adaptive | None = None,
    batch: Batch | None = None,
) -> Stage:
    """Declare one stage of a pipeline: ``fn`` with the options of a pool.

    Args:
        fn: an ``async def fn(item)`` whose return value goes on to the next stage; or an
            async generator function (fan-out): each value it yields goes on, 0..n per
            item. A fan-out attempt's outputs are sent on when the generator ends; an
            attempt that raises part-way is retried whole and what it yielded is dropped.
            With ``batch``: ``fn(list_of_items)`` returns one value per item, in order.
        name: the stage's name in records and stats (default: ``fn``'s name); distinct
            within a pipeline.
        workers, buffer, retry, timeout, limiter, rate, per_key, adaptive: as for
            :func:`conveyor.run`, for this stage's pool. The stage holds at most
            ``buffer + workers`` items, its output not yet taken by the next stage
            included (with ``batch``: that many batches, plus one being filled).
        batch: a :class:`conveyor.Batch`: a batching stage. One batch is one item of the
            stage's pool, so ``workers``, ``retry``, ``timeout`` and the limits apply to
            batch calls, and ``buffer`` counts batches (default: ``workers``). ``per_key``
            is refused with ``batch``.

    Bad values raise ``TypeError``/``ValueError`` here, naming the parameter.
    """
    fanout = _is_async_generator_function(fn)
    if not fanout:
        check_fn(fn)
    if name is None:
        name = describe_callable(fn).rpartition(".")[2]  # "fetch", not "main.<locals>.fetch"
    check_name(name)
    check_options(workers=workers, buffer=buffer, retry=retry, timeout=timeout, drain=0.0)
    build_limits(limiter=limiter, rate=rate, per_key=per_key, adaptive=adaptive)
    if batch is not None:
        if not isinstance(batch, Batch):
            raise invalid("batch", batch, "a conveyor.Batch, or None", "batch=conveyor.Batch(500)",
                          kind=TypeError)
        if fanout:
            raise invalid(
                "batch", batch, f"None for {name!r}, an async generator function (a batch "
                f"function returns one value per item; it cannot yield)", "batch=None",
            )
        if per_key is not None:
            raise invalid(
                "per_key", per_key, "None on a batching stage (a batch holds items of many "
                "keys): put the per-key limit on a stage of its own", "per_key=None",
            )
    if batch is not None and buffer is None:
        buffer = workers  # batches waiting for a worker: enough to keep every worker busy
    options = dict(
        workers=workers, buffer=buffer, retry=retry, timeout=timeout, limiter=limiter,
        rate=rate, per_key=per_key, adaptive=adaptive,
    )
    return Stage._create(fn, name, options, batch, fanout)


def pipeline(*stages: Stage | Callable[..., Any]) -> Pipeline:
    """A pipeline of ``stages`` (each a :func:`conveyor.stage`, or a plain task function:
    a stage with the default options). Run it with :meth:`Pipeline.run`,
    :meth:`Pipeline.map` or :meth:`Pipeline.open`; it can be run any number of times.

    Refused here (``stages=... is not valid``): no stage, a stage that is neither a
    :func:`conveyor.stage` nor a task function, two stages of one name."""
    if not stages:
        raise invalid("stages", stages, f"at least one stage: {_A_STAGE}",
                      "conveyor.pipeline(conveyor.stage(fn))", owner="pipeline")
    made = tuple(s if isinstance(s, Stage) else _as_stage(s, k, len(stages))
                 for k, s in enumerate(stages))
    seen: set[str] = set()
    for s in made:
        if s.name in seen:
            raise invalid(
                "stages", made, f"distinct stage names, but two stages are named {s.name!r}",
                f"conveyor.pipeline(conveyor.stage(fn, name={s.name!r}), "
                f"conveyor.stage(fn, name={s.name + '_2'!r})) (each stage its own name=)",
                owner="pipeline",
            )
        seen.add(s.name)
    return Pipeline._create(made)


_CHUNK = 1 << 16  # the most inputs a batching first stage is fed in one go
_A_STAGE = "a conveyor.stage(...) or a task function (async def fn(item))"


def _as_stage(fn: object, k: int = 0, count: int = 1) -> Stage:
    """A plain task function given to :func:`pipeline`: a stage with the defaults."""
    where = f" (stage {k + 1} of {count})" if count > 1 else ""
    if not callable(fn):
        raise invalid("stages", fn, f"each stage {_A_STAGE}, not an object of type "
                      f"{type(fn).__name__}{where}",
                      "conveyor.pipeline(conveyor.stage(fn))", owner="pipeline",
                      kind=TypeError)
    try:
        return stage(fn)
    except (TypeError, ValueError) as error:
        refused = SHAPE.match(str(error))
        why = refused["expected"] if refused else str(error)
        note = f" (fn here: {refused['fix'].removeprefix('fn=')})" if refused else ""
        raise invalid(
            "stages", fn, f"each stage {_A_STAGE}; as a task function{where}: {why}",
            f"conveyor.pipeline(conveyor.stage(fn)){note}", owner="pipeline",
            kind=type(error),
        ) from None


@final
class Pipeline(metaclass=NoPublicConstructor):
    """A sequence of stages, as made by :func:`conveyor.pipeline`."""

    _factory = "conveyor.pipeline(stage, ...)"

    __slots__ = ("stages",)

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.stages = stages

    def __repr__(self) -> str:
        return f"<conveyor.Pipeline {' -> '.join(s.name for s in self.stages)}>"

    @property
    def fans_out(self) -> bool:
        """Whether any stage fans out (then a success's value is a list of outputs)."""
        return any(s.fanout for s in self.stages)

    async def run(
        self,
        items: Items,
        *,
        drain: float = 0.0,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], str | int | bytes] | None = None,
        observers: Sequence[Observer] = (),
        progress: bool | Progress = False,
    ) -> Report:
        """Run every input through every stage and return the account: one record per
        input (see :class:`Report`; ``report.stages`` has each stage's own stats).

        A cancel, Ctrl-C or an error from ``items`` stops every stage (running attempts
        get ``drain`` seconds) and propagates; use :meth:`open` to keep the account of a
        stopped run.

        ``journal=PATH`` (and ``key=``, as for :func:`conveyor.run`) records each *input*
        as its record settles, with its final value. Run again with the same journal: an
        input held as succeeded is not run, its record comes back with the stored value;
        every other input runs again from the first stage.

        ``observers``: given to every stage's pool, which is named after its stage
        (``PoolInfo.name``).

        ``progress``: as for :func:`conveyor.run` (``True`` or a :class:`conveyor.Progress`),
        one line for the whole pipeline: its inputs (done of ``len(items)`` when known) and
        each stage by name with its own counts (done, in flight, queued, retries, failed).
        """
        check_items(items)
        check_drain(drain)
        spec = check_journal(journal, key)
        checked = check_observers(observers)
        run = _Run(self, drain, observers=checked, progress=with_progress((), progress),
                   total=items_total(items))
        async with journaled(run.as_pool(), spec, items) as feed:
            assert feed is not None
            async with run.running(feed):
                pass
        return run.report()

    def map(
        self,
        items: Items,
        *,
        ordered: bool = False,
        window: int | None = None,
        drain: float = 0.0,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], str | int | bytes] | None = None,
        observers: Sequence[Observer] = (),
        progress: bool | Progress = False,
    ) -> PipelineStream:
        """Stream one record per input as it settles (``async for``, or ``async with``).

        At most ``window`` inputs (default: twice the sum of the stages' capacities) are
        between intake and the caller, so memory is bounded. ``ordered=True`` yields in
        input order; later inputs keep flowing through every stage behind a slow one,
        within the window. Leaving the loop early stops the pipeline. ``journal`` and
        ``key`` as for :meth:`run` (inputs from the journal are yielded too, in their place
        when ordered). ``progress`` as for :meth:`run`; its final line is written also
        when the caller leaves the loop early.
        """
        check_items(items)
        check_drain(drain)
        spec = check_journal(journal, key)
        checked = check_observers(observers)
        shown = with_progress((), progress)
        check_bool("ordered", ordered)
        if window is not None:
            check_count("window", window, minimum=1)
        else:
            window = 2 * sum(s.capacity for s in self.stages)
        run = _Run(self, drain, window=window, ordered=ordered, observers=checked,
                   progress=shown, total=items_total(items))
        return PipelineStream._create(run, items, spec)

    def open(
        self,
        *,
        drain: float = 0.0,
        journal: str | os.PathLike[str] | None = None,
        key: Callable[[Any], str | int | bytes] | None = None,
        observers: Sequence[Observer] = (),
        progress: bool | Progress = False,
    ) -> AbstractAsyncContextManager[PipelineRun]:
        """Open the pipeline and feed it by hand::

            async with pipe.open() as p:
                await p.submit(item)     # waits while the first stage is full
                p.close()                # optional: leaving the block closes it too
                async for record in p.results():
                    ...
            report = p.report()          # also after a cancel or an error

        ``journal`` and ``key`` as for :meth:`run`: an input submitted that the journal
        holds as succeeded is not run; its record comes at once, with the stored value.
        ``progress`` as for :meth:`run` (the inputs submitted so far: no total).
        """
        check_drain(drain)
        spec = check_journal(journal, key)
        checked = check_observers(observers)
        shown = with_progress((), progress)
        return _OpenRun(_Run(self, drain, observers=checked, progress=shown), spec)


# ---------------------------------------------------------------------------- the ledger


class _Input:
    """One input on its way through the pipeline (the pipeline's ledger entry).

    An input taken in a chunk into a first stage is first only its index (an ``int``
    origin, its item in ``_Run.fresh``; between plain stages its ``Job`` carries the
    attempts of the stages before, ``Job.prior``): it gets its ``_Input``
    (:meth:`_Run.full`) when it needs one (it fails, is left unfinished, waits for room in
    the next stage, fans out, or goes into or out of a batching stage). One that never does
    is settled from its index and its item (:meth:`_Run.finish_job`, or
    :meth:`_Run.finish_many` in a C loop). An object and a dict entry less per input, and
    the garbage collector's passes over them (docs/design.md, "An input known by its
    index").
    """

    __slots__ = ("alive", "attempts", "failure", "index", "item", "outputs", "unfinished")

    def __init__(self, index: int, item: Any) -> None:
        self.index = index
        self.item = item
        self.alive = 1  # branches not settled yet (a fan-out adds branches)
        self.attempts = 0
        self.outputs: list[Any] | None = None  # a fan-out's outputs, made when needed
        self.failure: Failed | None = None
        self.unfinished: Unfinished | None = None


class _Run:
    """One run of a pipeline: the stages, the ledger of inputs, the output."""

    def __init__(
        self,
        pipe: Pipeline,
        drain: float,
        *,
        window: int | None = None,
        ordered: bool = False,
        observers: tuple[Observer, ...] = (),
        progress: tuple[Observer, ...] = (),
        total: int | None = None,
    ) -> None:
        self.pipe = pipe
        self.observers = observers
        self.progress = PipelineProgress(progress)  # the pipeline's own line (progress=)
        self.total = total  # inputs that will run, when known (the journal may set it)
        self.drain = drain
        self.fans_out = pipe.fans_out
        self.stages = [make_stage(self, k, s) for k, s in enumerate(pipe.stages)]
        for st, nxt in zip(self.stages, self.stages[1:], strict=False):
            st.next = nxt
        self.next_input = 0
        self.taken = 0
        self.inputs: dict[int, _Input] = {}
        self.fresh: dict[int, Any] = {}  # inputs known by their index only: their items
        self.ordered = ordered
        self.window = Window(window) if window is not None else None
        # Output: records not handed out yet (succeeded ones kept for the report when
        # nobody reads them), failures and unfinished always.
        self.outbox: deque[Record] = deque()
        self.failed: list[Failed] = []
        self.unfinished: list[Unfinished] = []
        self.succeeded = 0
        self.reader_lot = ParkingLot()
        self.readers_waiting = 0  # parked in reader_lot (a plain int: read per input)
        self.started = False
        self.done = False
        self.tasks_done = False
        self.stopping = False
        self.intake_closed = False
        self.feed_scope = trio.CancelScope()
        self.feed_error: Exception | None = None
        self.caller_error: BaseException | None = None
        self.t0 = 0.0
        self.t_end: float | None = None
        # The journal's seam (see as_pool): told of each record as it settles.
        self.observe: Callable[[Record], None] | None = None
        self.gate: Callable[[Any], bool] | None = None
        self.unwindowed: set[int] = set()  # records settled without a window slot

    def as_pool(self) -> Engine:
        """This run, as the journal (``_journal.journaled``) sees a pool's engine."""
        return cast("Engine", _JournalSeam(self))

    def settle_unrun(self, record: Succeeded[Any] | Failed) -> None:
        """An input settled without running: its stored success from the journal (not this
        run's work: not in the stats), or a ``Failed`` for a bad key (attempts 0)."""
        if not self.started:
            raise RuntimeError("submit() is only possible inside the pipeline's `async with` block")
        index = self.next_input
        self.next_input = index + 1
        record = with_index(record, index)
        if type(record) is Failed:
            self.taken += 1
            self.failed.append(record)
        if self.window is not None:
            self.unwindowed.add(index)
        self.outbox.append(record)
        if self.reader_lot:
            self.reader_lot.unpark_all()

    # -- ledger

    def take(self, item: Any) -> _Input:
        index = self.next_input
        self.next_input = index + 1
        origin = _Input(index, item)
        self.inputs[index] = origin
        self.taken += 1
        return origin

    def full(self, origin: _Input | int) -> _Input:
        """The ``_Input`` of ``origin``, made now if the input was known only by its index
        (see :class:`_Input`). Idempotent: an index made full before gives the same one."""
        if isinstance(origin, _Input):
            return origin
        item = self.fresh.pop(origin, _MISSING)
        if item is _MISSING:
            return self.inputs[origin]
        full = self.inputs[origin] = _Input(origin, item)
        return full

    def branch_done(self, origin: _Input) -> None:
        origin.alive -= 1
        if origin.alive == 0:
            self.settle(origin)

    def finish(self, origin: _Input, value: Any) -> None:
        """A branch of ``origin`` came out of the last stage with ``value``."""
        if self.fans_out:
            if origin.outputs is None:
                origin.outputs = []
            origin.outputs.append(value)
            self.branch_done(origin)
            return
        # One branch per input: it settles now (the common case, written out).
        del self.inputs[origin.index]
        self.succeeded += 1
        # Succeeded(item, value, attempts, index), made in one C call
        record = _make(Succeeded, (origin.item, value, origin.attempts, origin.index))
        if self.observe is not None:
            self.observe(record)
        self.outbox.append(record)
        if self.readers_waiting:
            self.reader_lot.unpark_all()

    def finish_job(self, job: Job, value: Any) -> bool:
        """:meth:`finish` for a success of the last stage's ``job`` where no stage fans
        out: the last plain stage's ``link.pass_nowait`` itself (one call per input at the
        end). Always True: the end of the pipeline has no bound. The attempts: the job's
        in this stage and the stages before (``job.prior``), and, for an input with its
        ``_Input``, those its ``_Input`` counts."""
        origin = job.origin
        self.succeeded += 1
        # Succeeded(item, value, attempts, index), made in one C call
        if type(origin) is int:  # an input known by its index (see _Input)
            record = _make(
                Succeeded, (self.fresh.pop(origin), value, job.prior + job.attempts, origin)
            )
        else:
            del self.inputs[origin.index]
            record = _make(Succeeded, (
                origin.item, value, origin.attempts + job.prior + job.attempts, origin.index
            ))
        if self.observe is not None:
            self.observe(record)
        self.outbox.append(record)
        if self.readers_waiting:
            self.reader_lot.unpark_all()
        return True

    def finish_many(
        self, origins: list[_Input | int], answers: list[Any], attempts: int,
        indexes_only: bool = False,
    ) -> list[int]:
        """:meth:`finish` for a batch's answers (a batching last stage), each input's
        attempts counting the batch's ``attempts``; an ``Exception`` answer is left to the
        caller: the positions of those are returned. ``indexes_only``: every origin is an
        index (see :class:`_Input`)."""
        if len(answers) != len(origins):
            raise ValueError(f"{len(answers)} answers for {len(origins)} items")
        if self.observe is None and not self.fans_out and not any(
            map(isinstance, answers, repeat(Exception))
        ):
            # The whole batch succeeded (the common case): settled in C loops, no
            # bytecode per input. The same records as the loop below makes.
            items: Iterator[Any]
            counts: Iterator[int]
            if indexes_only:
                # Inputs known by their index: the item from `fresh`, the attempts the
                # batch's (there was no stage before).
                indexes = cast("list[int]", origins)
                items = map(self.fresh.pop, indexes)
                counts = repeat(attempts, len(indexes))
            else:
                made = list(map(self.full, origins))
                indexes = list(map(_index_of, made))
                deque(map(self.inputs.pop, indexes), maxlen=0)
                items = map(_item_of, made)
                counts = map(add, map(_attempts_of, made), repeat(attempts))
            self.outbox.extend(map(_make, repeat(Succeeded), zip(
                items, answers, counts, indexes, strict=True
            )))
            self.succeeded += len(origins)
            if self.readers_waiting:
                self.reader_lot.unpark_all()
            return []
        failed: list[int] = []
        if self.fans_out:
            for i, (some, answer) in enumerate(zip(origins, answers, strict=True)):
                if isinstance(answer, Exception):
                    failed.append(i)
                else:
                    origin = self.full(some)
                    origin.attempts += attempts
                    self.finish(origin, answer)
            return failed
        inputs = self.inputs
        observe = self.observe
        append = self.outbox.append
        error = Exception
        full = self.full
        for i, (some, answer) in enumerate(zip(origins, answers, strict=True)):
            if isinstance(answer, error):
                failed.append(i)
                continue
            origin = full(some)
            index = origin.index
            del inputs[index]
            record = _make(Succeeded, (origin.item, answer, origin.attempts + attempts, index))
            if observe is not None:
                observe(record)
            append(record)
        self.succeeded += len(origins) - len(failed)
        if self.readers_waiting:
            self.reader_lot.unpark_all()
        return failed

    def branch_failed(
        self, origin: _Input, stage: str, item: Any, error: BaseException, attempts: int,
        text: str,
    ) -> None:
        if origin.failure is None:
            origin.failure = Failed(
                origin.item, error, attempts, text, index=origin.index, stage=stage,
                stage_item=item,
            )
        self.branch_done(origin)

    def branch_unfinished(
        self, origin: _Input, stage: str, item: Any, attempts: int,
        last_error: BaseException | None,
    ) -> None:
        if origin.unfinished is None:
            origin.unfinished = Unfinished(
                origin.item, attempts, last_error, index=origin.index, stage=stage,
                stage_item=item,
            )
        self.branch_done(origin)

    def settle(self, origin: _Input) -> None:
        del self.inputs[origin.index]
        record: Record
        if origin.failure is not None:
            record = origin.failure
            self.failed.append(record)
        elif origin.unfinished is not None:
            # As with a pool: an Unfinished record is in the report, not in the stream.
            self.unfinished.append(origin.unfinished)
            return
        else:
            outputs = origin.outputs if origin.outputs is not None else []
            value = outputs if self.fans_out else outputs[0]
            record = Succeeded(origin.item, value, origin.attempts, index=origin.index)
            self.succeeded += 1
        if self.observe is not None:
            self.observe(record)
        self.outbox.append(record)
        if self.reader_lot:
            self.reader_lot.unpark_all()

    # -- intake

    async def submit(self, item: Any) -> None:
        if self.intake_closed:
            raise trio.ClosedResourceError(self._closed_message())
        if not self.started:
            raise RuntimeError("submit() is only possible inside the pipeline's `async with` block")
        if self.gate is not None and not self.gate(item):
            await trio.lowlevel.checkpoint()
            return  # settled by the journal
        first = self.stages[0]
        origin = self.take(item)
        try:
            await first.accept(item, origin)
        except BaseException as exc:
            # Not accepted (cancelled, or the pipeline stopped meanwhile), as with a pool.
            del self.inputs[origin.index]
            self.taken -= 1
            if isinstance(exc, Stopped):
                raise trio.ClosedResourceError(self._closed_message()) from None
            raise

    def _closed_message(self) -> str:
        how = "stop()" if self.stopping else "close()"
        return f"the pipeline takes no more items: {how} was called or its block ended"

    async def feed(self, items: Items) -> None:
        """Take every input of ``items`` as the first stage makes room; then close it.

        Room (and a window slot) is awaited *before* the next input is taken, and an input
        taken is in the ledger at once: whatever happens next, it is accounted for.
        """
        first = self.stages[0]
        window = self.window
        sync_iterator: Any = None
        async_iterator: Any = None
        if isinstance(items, AsyncIterable):
            async_iterator = aiter(items)
        else:
            sync_iterator = iter(items)
        hand_in = first.hand_in
        has_room = first.has_room
        inputs = self.inputs
        engine = first.engine if type(first) is StageRun else None  # a plain first stage
        with self.feed_scope:
            try:
                if (
                    isinstance(first, BatchStage)
                    and sync_iterator is not None
                    and self.gate is None
                ):
                    # In chunks, each input numbered after its chunk is taken. Not with a
                    # journal: its filter settles a skipped input (with the next index)
                    # while it is iterated, so an input is numbered as soon as it comes.
                    await self.feed_batching(first, sync_iterator)
                elif engine is not None and sync_iterator is not None and self.gate is None:
                    await self.feed_plain(first, engine, sync_iterator)  # the same, chunked
                else:
                    while True:
                        if window is not None:
                            if window.value:
                                window.value -= 1  # a slot, no task switch (Window)
                            else:
                                await window.acquire()
                        try:
                            if not has_room():
                                await first.wait_room()
                            if async_iterator is not None:
                                item = await anext(async_iterator)
                            else:
                                item = next(sync_iterator)
                        except BaseException:
                            if window is not None:
                                window.release()
                            raise
                        # self.take(item), written out (per input, in this task only)
                        index = self.next_input
                        self.next_input = index + 1
                        origin = _Input(index, item)
                        inputs[index] = origin
                        self.taken += 1
                        try:
                            if not hand_in(item, origin):
                                await first.accept(item, origin)
                        except trio.ClosedResourceError:  # from hand_in: the stage has stopped
                            first.refuse(origin, item)
                            raise Stopped from None
                        except BaseException:
                            first.refuse(origin, item)
                            raise
            except (StopIteration, StopAsyncIteration):
                pass
            except Stopped:
                return
            except Exception as exc:
                self.feed_error = exc
                self.stop()
                return
            finally:
                aclose = getattr(async_iterator, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
        if not self.stopping and not self.feed_scope.cancelled_caught:
            self.close()

    async def feed_plain(
        self, first: StageRun, engine: Engine, iterator: Iterator[Any]
    ) -> None:
        """:meth:`feed` into a plain first stage, in chunks: as many inputs as its ledger
        and channel (and the window) have room for, taken, numbered, put in the ledger and
        handed in with C loops (:meth:`Engine.hand_in_many`). Returns at the end of
        ``items``.

        Raises:
            Stopped: the stage takes no more items.
        """
        window = self.window
        while True:
            if engine.intake_closed:
                raise Stopped
            room = engine.room_now()
            if window is not None:
                room = min(room, window.value)
            if room <= 0:
                if window is not None and window.value == 0:
                    await window.wait_free()
                elif len(engine.outstanding) >= engine.capacity:
                    await first.wait_room()
                else:
                    # The ledger has room, the channel none (a worker between two items):
                    # one input, the per-input way (accept waits for the channel).
                    if not await self.feed_one(first, iterator):
                        return  # the end of the items
                continue
            room = min(room, _CHUNK)
            items, origins, error = self.take_chunk(iterator, room, indexes_only=True)
            if items:
                if window is not None:
                    window.value -= len(items)  # (Window: there are `room` slots)
                engine.hand_in_many(items, origins)
            if error is not None:
                raise error
            if len(items) < room:
                return  # the end of the items

    def take_chunk(
        self, iterator: Iterator[Any], room: int, indexes_only: bool = False
    ) -> tuple[list[Any], list[Any], BaseException | None]:
        """Up to ``room`` inputs of ``iterator``, taken, numbered and in the ledger, in C
        loops (an input's only bytecode is its ``_Input``'s): their items, their inputs
        (with ``indexes_only``, their indexes: see :class:`_Input`), and the error
        ``items`` raised, if it did, after the ones it gave (``list.extend`` keeps what it
        took). For a chunked feed (:meth:`feed_plain`, :meth:`feed_batching`), which puts
        them in its first stage before any await."""
        items: list[Any] = []
        error: BaseException | None = None
        try:
            items.extend(islice(iterator, room))
        except BaseException as exc:
            error = exc
        index = self.next_input
        end = self.next_input = index + len(items)
        self.taken += len(items)
        if indexes_only:
            indexes = list(range(index, end))
            self.fresh.update(zip(indexes, items, strict=True))
            return items, indexes, error
        origins = list(map(_Input, range(index, end), items))
        self.inputs.update(zip(range(index, end), origins, strict=True))
        return items, origins, error

    async def feed_one(self, first: StageRun, iterator: Iterator[Any]) -> bool:
        """One input into ``first`` the per-input way, a window slot free (feed_plain);
        False at the end of the items.

        Raises:
            Stopped: the stage takes no more items.
        """
        try:
            item = next(iterator)
        except StopIteration:
            return False
        if self.window is not None:
            self.window.value -= 1
        origin = self.take(item)
        try:
            await first.accept(item, origin)  # (hand_in would find no room: not tried)
        except BaseException:  # Stopped among them: not in the stage, Unfinished there
            first.refuse(origin, item)
            raise
        return True

    async def feed_batching(self, first: BatchStage, iterator: Iterator[Any]) -> None:
        """:meth:`feed` into a batching first stage, in chunks: as many inputs as the stage
        (and the window) has room for, taken and put into its collector in one go (an
        input costs a tenth of the per-item way here). Returns at the end of ``items``."""
        window = self.window
        while True:
            room = first.room_now()
            if window is not None:
                room = min(room, window.value)
            if room <= 0:
                if window is not None and window.value == 0:
                    await window.wait_free()
                else:
                    await first.wait_room()
                continue
            index = self.next_input
            if window is None:
                # A chunk is at most _CHUNK inputs (islice takes no more than sys.maxsize,
                # and a huge batch size gives a huge room); the loop takes the rest.
                room = min(room, _CHUNK)
                items, origins, error = self.take_chunk(iterator, room, indexes_only=True)
                first.put_many(origins, items)
                if error is not None:
                    raise error
                if len(items) < room:
                    return  # the end of the items
                continue
            chunk: list[_Input | int] = []  # indexes only (see _Input)
            chunk_items: list[Any] = []
            fresh = self.fresh
            append = chunk.append
            append_item = chunk_items.append
            try:
                for _ in range(room):
                    if window is not None:
                        window.acquire_nowait()  # there are `room` slots: no wait
                    try:
                        item = next(iterator)
                    except BaseException as exc:
                        if window is not None:
                            window.release()
                        if isinstance(exc, StopIteration):
                            return  # (the chunk goes in, in the `finally`)
                        raise
                    fresh[index] = item
                    append(index)
                    index += 1
                    append_item(item)
            finally:
                # Taken: in the ledger and in the stage now (no await since its room was
                # counted), whatever ended the chunk.
                self.next_input = index
                self.taken += len(chunk)
                first.put_many(chunk, chunk_items)

    def close(self) -> None:
        if self.intake_closed:
            return
        self.intake_closed = True
        if self.started:
            self.stages[0].close_intake()

    def stop_attempts(self) -> None:
        """No stage starts another attempt from now on (flags only; :meth:`stop` follows)."""
        self.stopping = True
        for st in self.stages:
            if st.engine is not None:
                st.engine.stopping = True  # read by every worker before it starts an attempt

    def stop(self, drain: float | None = None) -> None:
        if drain is not None:
            check_drain(drain)
        self.stopping = True
        self.intake_closed = True
        self.feed_scope.cancel()
        for st in self.stages:
            st.stop(self.drain if drain is None else drain)
        if self.reader_lot:
            self.reader_lot.unpark_all()

    # -- lifetime

    @asynccontextmanager
    async def running(self, feed: Items | None = None) -> AsyncIterator[_Run]:
        if self.started:
            raise RuntimeError("a pipeline run runs once: call pipe.open() again for a new one")
        self.started = True
        self.t0 = trio.current_time()
        self.progress.open(self.pipe.stages, self.total, lambda: self.stats, self.stage_stats)
        error: BaseException | None = None
        try:
            try:
                async with AsyncExitStack() as stack:
                    for st in self.stages:
                        options = resolve("stage", {
                            **st.spec.options, "drain": self.drain, "name": st.name,
                            "observers": self.observers,
                        })
                        st.engine = make_engine(st.make_fn(), options)
                    for st in self.stages:
                        st.bind()
                    for st in self.stages:
                        engine = st.engine
                        assert engine is not None
                        engine.link = st.link()  # after every door is bound
                        await stack.enter_async_context(running_pool(engine))
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.tasks, feed)
                        nursery.start_soon(self.progress.tick)  # until tasks() ends
                        try:
                            yield self
                        except BaseException as exc:
                            self.caller_error = exc
                            self.stop()
                            raise
                        if feed is None:
                            self.close()
            except BaseExceptionGroup as group:
                error = sole_error(group, self.caller_error)
                if error is None:
                    raise
        finally:
            self.caller_error = None
            self.finalize()
            self.progress.close(self.report)
        if self.feed_error is not None and (error is None or isinstance(error, trio.Cancelled)):
            error, self.feed_error = self.feed_error, None
        if error is not None:
            try:
                raise error
            finally:
                error = None

    async def tasks(self, feed: Items | None) -> None:
        """The feeder and the batchers, until every stage's engine has ended; then the
        readers are told."""
        try:
            async with trio.open_nursery() as nursery:
                for st in self.stages:
                    nursery.start_soon(st.tasks)
                if feed is not None:
                    nursery.start_soon(self.feed, feed)
                elif self.intake_closed:
                    self.stages[0].close_intake()
                for st in self.stages:
                    await st.done.wait()
        finally:
            self.progress.stop()
            self.tasks_done = True
            if self.reader_lot:
                self.reader_lot.unpark_all()

    def finalize(self) -> None:
        """Settle whatever is left (the pools have ended): nothing taken is lost."""
        for st in self.stages:
            st.sweep()
        for index in list(self.fresh):  # pragma: no cover - a bug if any
            self.full(index)
        for origin in list(self.inputs.values()):  # pragma: no cover - a bug if any
            logger.error("pipeline: input %r was not accounted for; unfinished", origin.item)
            origin.alive = 1
            self.branch_unfinished(origin, self.stages[0].name, origin.item, 0, None)
        self.done = True
        self.t_end = trio.current_time()
        if self.reader_lot:
            self.reader_lot.unpark_all()

    # -- output

    @property
    def stats(self) -> Stats:
        stages = [st.stats() for st in self.stages]
        end = self.t_end if self.t_end is not None else trio.current_time()
        return Stats(
            submitted=self.taken,
            succeeded=self.succeeded,
            failed=len(self.failed),
            unfinished=len(self.unfinished),
            retried=sum(s.retried for s in stages),
            attempts=sum(s.attempts for s in stages),
            in_flight=sum(s.in_flight for s in stages),
            queued=sum(s.queued for s in stages),
            waiting_retry=sum(s.waiting_retry for s in stages),
            elapsed=max(0.0, end - self.t0) if self.started else 0.0,
            limited=sum(s.limited for s in stages),
            parked=sum(s.parked for s in stages),
        )

    def stage_stats(self) -> dict[str, Stats]:
        return {st.name: st.stats() for st in self.stages}

    def report(self) -> Report:
        outbox = self.outbox
        succeeded = cast(  # the Succeeded records, picked in a C loop
            "list[Succeeded[Any]]",
            list(compress(outbox, map(isinstance, outbox, repeat(Succeeded)))),
        )
        return Report(
            succeeded, list(self.failed), list(self.unfinished), self.stats,
            stages=self.stage_stats(),
        )


# ---------------------------------------------------------------------------- reading

_STREAK = 64  # records handed out without waiting before a checkpoint anyway


class _Reader:
    """The records of a pipeline run, per input, as they settle (or in input order)."""

    __slots__ = ("_expected", "_ordered", "_pending", "_run", "_streak")

    def __init__(self, run: _Run, ordered: bool = False) -> None:
        self._run = run
        self._ordered = ordered
        self._pending: dict[int, Record] = {}
        self._expected = 0
        self._streak = 0

    def __aiter__(self) -> _Reader:
        return self

    async def __anext__(self) -> Record:
        run = self._run
        outbox = run.outbox
        window = run.window
        while True:
            record: Record | None = None
            if self._ordered:
                pending = self._pending
                while outbox:
                    got = outbox.popleft()
                    pending[got.index] = got
                record = pending.pop(self._expected, None)
                if record is not None:
                    self._expected += 1
                elif run.tasks_done and pending:
                    record = pending.pop(min(pending))  # stopped early: the rest, in order
            elif outbox:
                record = outbox.popleft()
            if record is not None:
                if window is not None:
                    unwindowed = run.unwindowed
                    if unwindowed and record.index in unwindowed:
                        unwindowed.discard(record.index)
                    elif window.waiting:
                        window.release()  # to the feed, waiting for it
                    else:
                        window.value += 1  # Window.release, written out
                self._streak += 1
                if self._streak >= _STREAK:
                    self._streak = 0
                    await self._wait(trio.lowlevel.checkpoint)
                return record
            if run.tasks_done:
                await self._end()
            self._streak = 0
            await self._wait(self._park)

    async def _park(self) -> None:
        run = self._run
        run.readers_waiting += 1
        try:
            await run.reader_lot.park()
        finally:
            run.readers_waiting -= 1

    async def _wait(self, wait: Callable[[], Awaitable[None]]) -> None:
        try:
            await wait()
        except BaseException:
            self.give_back()  # now, not when this reader is collected: the report has them
            await self._interrupted()
            raise

    async def _end(self) -> NoReturn:
        raise StopAsyncIteration

    async def _interrupted(self) -> None:
        pass

    def give_back(self) -> None:
        """Records held back for their turn go back to the report."""
        if self._pending:
            self._run.outbox.extendleft(
                self._pending[i] for i in sorted(self._pending, reverse=True)
            )
            self._pending.clear()


@final
class PipelineRun(metaclass=NoPublicConstructor):
    """A running pipeline, as given by :meth:`Pipeline.open` (do not create it directly).

    Feed it with :meth:`submit`, end intake with :meth:`close` (or leave the block), read
    one record per input with :meth:`results`, get the account with :meth:`report`.
    """

    __slots__ = ("_run",)
    _factory = "pipe.open() (async with), which gives one"

    def __init__(self, run: _Run) -> None:
        self._run = run

    async def submit(self, item: Any) -> None:
        """Hand ``item`` to the first stage, waiting while it is full (backpressure).

        Raises:
            trio.ClosedResourceError: intake is closed (:meth:`close` or :meth:`stop`).

        If the call is cancelled, the item was not accepted and will not be processed.
        """
        await self._run.submit(item)

    def close(self) -> None:
        """No more items: every stage finishes what it holds, then the pipeline ends."""
        self._run.close()

    def stop(self, drain: float | None = None) -> None:
        """Stop now: intake closes, and every stage stops as :meth:`conveyor.Pool.stop`
        does (running attempts get ``drain`` seconds). Everything not settled then is
        ``Unfinished``, naming its stage."""
        self._run.stop(drain)

    def results(self) -> AsyncIterator[Record]:
        """One record per input as it settles; ends when the pipeline has ended. Successes
        handed out here are not kept for :meth:`report` (only counted)."""
        return _Reader(self._run)

    @property
    def stats(self) -> Stats:
        """The pipeline's counters now (inputs; the stages' attempts and queues summed)."""
        return self._run.stats

    @property
    def stages(self) -> dict[str, Stats]:
        """Each stage's own counters now, by name (items of that stage)."""
        return self._run.stage_stats()

    def report(self) -> Report:
        """The account: one record per input (complete once the block has ended)."""
        return self._run.report()


class _OpenRun(Entered):
    """What :meth:`Pipeline.open` returns: enter it once with ``async with``."""

    __slots__ = ("_journal", "_run")

    def __init__(self, run: _Run, journal: JournalSpec | None) -> None:
        self._run = run
        self._journal = journal
        self._cm: AbstractAsyncContextManager[PipelineRun] | None = None

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[PipelineRun]:
        run = self._run
        async with journaled(run.as_pool(), self._journal), run.running():
            yield PipelineRun._create(run)

    async def __aenter__(self) -> PipelineRun:
        cm = self._open()
        running = await cm.__aenter__()
        self._cm = cm
        return running


@final
class PipelineStream(EnteredStream, metaclass=NoPublicConstructor):
    """What :meth:`Pipeline.map` returns: iterate it, or enter it with ``async with``."""

    _factory = "pipe.map(items, ...)"

    def __init__(self, run: _Run, items: Items, journal: JournalSpec | None = None) -> None:
        self._run = run
        self._items = items
        self._journal = journal
        self._used = False
        self._cm: AbstractAsyncContextManager[_Reader] | None = None

    def _use(self) -> None:
        if self._used:
            raise RuntimeError("a pipeline map stream can be iterated once")
        self._used = True

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[_Reader]:
        self._use()
        run = self._run
        reader = _Reader(run, run.ordered)
        try:
            async with (
                journaled(run.as_pool(), self._journal, self._items) as fed,
                run.running(fed),
            ):
                yield reader
                if not run.tasks_done:
                    run.stop()  # the caller left before the end: take and start nothing more
        finally:
            reader.give_back()

    def __aiter__(self) -> AsyncIterator[Record]:
        self._use()
        host = _Host(self._run, self._items, self._journal)
        reader = _BareReader(self._run, self._run.ordered)
        reader._host = host
        host.start()
        return reader

    def report(self) -> Report:
        """The account of the stream's pipeline (complete once it has ended)."""
        return self._run.report()


class _Host(BareHost):
    """The run of a bare ``async for record in pipe.map(...)`` loop, in a system task (a
    nursery must not stay open across the caller's loop; see ``_host``)."""

    __slots__ = ("items", "journal", "run")
    task_name = "conveyor.pipeline"

    def __init__(self, run: _Run, items: Items, journal: JournalSpec | None) -> None:
        super().__init__()
        self.run = run
        self.journal = journal
        self.items: Items | None = items

    async def body(self) -> None:
        items, self.items = self.items, None
        assert items is not None
        run = self.run
        async with journaled(run.as_pool(), self.journal, items) as fed, run.running(fed):
            pass

    def ended(self) -> None:
        self.run.tasks_done = True
        if self.run.reader_lot:
            self.run.reader_lot.unpark_all()

    def halt(self) -> None:
        self.run.stop()

    def left(self, reader: _Reader) -> None:
        """The caller left its loop (called from ``__del__``): no new attempt from now on
        (flags only: a finaliser may not call into trio), then stop the run soon."""
        if not self.done.is_set():
            self.run.stop_attempts()
        reader.give_back()
        try:
            self.token.run_sync_soon(self._stop)
        except trio.RunFinishedError:
            pass

    def _stop(self) -> None:
        if not self.done.is_set():
            self.run.stop()


class _BareReader(_Reader):
    __slots__ = ("_host",)
    _host: _Host

    async def _end(self) -> NoReturn:
        await self._host.end()

    async def _interrupted(self) -> None:
        await self._host.interrupted()

    def __del__(self) -> None:
        host = getattr(self, "_host", None)
        if host is not None and not host.done.is_set():
            host.left(self)


class _JournalSeam:
    """What ``_journal.journaled`` needs of a pool's engine, for a pipeline run: it filters
    intake (``gate``, ``settle_unrun``), is told of each record (``observe_settled``), reads
    the unfinished ones from ``report()`` at the end, and stops the run if it cannot write.
    ``total`` (the number of items that will run) is the run's, the progress line's total."""

    __slots__ = ("_run",)

    def __init__(self, run: _Run) -> None:
        self._run = run

    @property
    def total(self) -> int | None:
        return self._run.total

    @total.setter
    def total(self, total: int | None) -> None:
        self._run.total = total  # the inputs that will run: the progress line's total

    def observe_settled(self, observe: Callable[[Record], None]) -> None:
        self._run.observe = observe

    @property
    def gate(self) -> Callable[[Any], bool] | None:
        return self._run.gate

    @gate.setter
    def gate(self, gate: Callable[[Any], bool] | None) -> None:
        self._run.gate = gate

    def settle_unrun(self, record: Succeeded[Any] | Failed) -> None:
        self._run.settle_unrun(record)

    def report(self) -> Report:
        return self._run.report()

    def stop(self, drain: float | None = None) -> None:
        self._run.stop(drain)
