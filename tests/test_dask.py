"""conveyor with Dask distributed as the engine: ``in_process(f, executor=client.get_executor())``.

End to end against a real ``LocalCluster`` (2 worker processes on 127.0.0.1, no dashboard):
the report equals the local backend's, and a Dask worker killed mid-run loses no item.
Skipped only when the ``conveyor[dask]`` extra (``distributed``) is not installed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import conveyor
from tests import _procfuncs as pf
from tests.test_offload import pid_running, read_pids, wait_for_files

distributed = pytest.importorskip(
    "distributed", reason="the conveyor[dask] extra (distributed) is not installed"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    # distributed logs at INFO/WARNING about workers starting, dying and being restarted,
    # which these tests do on purpose; keep the test output readable.
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()
        quiet.setLevel(level)


def summary(report: conveyor.Report) -> dict[str, Any]:
    """What a report says, minus the parts that legitimately differ (tracebacks' paths)."""
    return {
        "succeeded": sorted((r.item, r.value, r.attempts) for r in report.succeeded),
        "failed": sorted(
            (r.item, type(r.error), str(r.error), r.attempts) for r in report.failed
        ),
        "unfinished": sorted(r.item for r in report.unfinished),
    }


async def test_same_report_as_the_local_backend(client: Any) -> None:
    f = functools.partial(pf.fail_on, 5)
    retry = conveyor.Retry(attempts=2, backoff=None)
    local = await conveyor.run(conveyor.in_process(f), range(12), workers=4, retry=retry)
    remote = await conveyor.run(
        conveyor.in_process(f, executor=client.get_executor()), range(12), workers=4, retry=retry
    )
    assert summary(remote) == summary(local)
    assert summary(remote)["failed"] == [(5, pf.ItemError, "item 5 is bad", 2)]
    # the worker-side frames came back from the Dask worker too
    (failed,) = remote.failed
    assert "in _inner_failure" in failed.traceback and "in fail_on" in failed.traceback


async def test_killed_dask_worker_loses_no_item(client: Any, tmp_path: Path) -> None:
    f = functools.partial(pf.write_pid_then_sleep, str(tmp_path), 0.3)
    fn = conveyor.in_process(f, executor=client.get_executor())
    worker_pids = set(client.run(os.getpid).values())
    report = None

    async def go() -> None:
        nonlocal report
        report = await conveyor.run(
            fn, range(10), workers=4, retry=conveyor.Retry(attempts=3, backoff=None)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(go)
        victim, *_ = await wait_for_files(tmp_path, 1)
        assert victim in worker_pids  # a Dask worker that is running one of our jobs
        os.kill(victim, signal.SIGKILL)

    assert report is not None
    assert not pid_running(victim)
    assert sorted(r.value for r in report.succeeded) == list(range(10))
    assert not report.failed and not report.unfinished
    # The job the victim was running (none had finished yet) ran again on another worker.
    assert str(victim) not in read_pids(tmp_path)
