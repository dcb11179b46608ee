"""examples/predict end to end: real servers (processes on free ports), the real client.

End-to-end layer: every good row is scored exactly once and equals the model computed here;
every bad row is reported with the server's reason; nothing is lost or duplicated with about
20% of requests failing (10% 503, 10% dropped connections). On servers whose 400 does not say
which row is bad, split-on-failure gives up the bad rows alone, where the client without it
gives up their whole batches. The client killed half-way
(SIGINT, then SIGKILL) and run again: the output is complete, each row once, and the second
run sent only what the journal did not hold. The server answers a hypothesis-fuzzed set of
bad bodies with a 4xx each and stays up. Contract layer: the model's checks name the row.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.predict import client
from examples.predict.model import WIDTH, BadBatch, check_batch, predict_row

ROOT = Path(__file__).resolve().parents[1]
ROWS = 20_000  # 40 batches of 500
BAD = 10
REASONS = {
    "nan": "column 3: NaN",
    "short": f"expected {WIDTH} values, got {WIDTH - 1}",
    "long": f"expected {WIDTH} values, got {WIDTH + 1}",
    "text": "column 1: not a number: 'n/a'",
    "huge": "column 5: out of range",
}


# ---------------------------------------------------------------------------------------------
# Servers: processes started once per module, stopped by closing their stdin


def start_servers(*flag_lists: list[str]) -> Iterator[list[str]]:
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "examples.predict", "serve", "--port", "0", "--stop-on-eof",
             "--serve-for", "300", "--seed", str(i), *flags],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        for i, flags in enumerate(flag_lists)
    ]
    try:
        urls = []
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline().decode()
            assert line.startswith("listening on 127.0.0.1:"), line
            urls.append("http://" + line.removeprefix("listening on ").strip())
        yield urls
    finally:
        for process in processes:
            assert process.stdin is not None
            process.stdin.close()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()


@pytest.fixture(scope="module")
def flaky_fleet() -> Iterator[list[str]]:
    """Two servers failing about 20% of requests: 10% 503, 10% cut off half-way."""
    yield from start_servers(*[["--fail-rate", "0.1", "--drop-rate", "0.1"]] * 2)


@pytest.fixture(scope="module")
def terse_fleet() -> Iterator[list[str]]:
    """Two servers failing about 20% of requests whose 400 does not say which row is bad."""
    yield from start_servers(*[["--fail-rate", "0.1", "--drop-rate", "0.1", "--terse-400"]] * 2)


@pytest.fixture(scope="module")
def slow_fleet() -> Iterator[list[str]]:
    """One server taking 0.1 s a request: a client can be killed half-way through."""
    yield from start_servers(["--delay", "0.1"])


@pytest.fixture(scope="module")
def clean_server() -> Iterator[httpx.Client]:
    """One server, no faults, a 64 KiB body limit (so the fuzzer reaches 413 cheaply), and
    one HTTP client for it (a client per request would cost more than the request)."""
    for urls in start_servers(["--max-body", "65536"]):
        with httpx.Client(base_url=urls[0], timeout=30) as http:
            yield http


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    path = tmp_path_factory.mktemp("predict") / "sample.csv"
    planted = client.write_sample(path, ROWS, seed=1, bad=BAD)
    return path, dict(planted)


# ---------------------------------------------------------------------------------------------
# What a correct output is


def check_output(sample_path: Path, output: Path, planted: dict[int, str],
                 terse: bool = False) -> None:
    """Each row once, in order; a good row's prediction equals the model computed here; a bad
    row has none and is in the failures file with the server's reason; nothing given up."""
    inputs = list(client.iter_csv(sample_path))[1:]
    outputs = list(client.iter_csv(output))
    assert outputs[0] == ["row", "prediction"]
    assert [int(row) for row, _ in outputs[1:]] == list(range(len(inputs)))
    for position, ((_, prediction), text) in enumerate(zip(outputs[1:], inputs, strict=True)):
        if position in planted:
            assert prediction == "", position
        else:
            assert float(prediction) == predict_row([float(x) for x in text]), position
    failures = list(client.iter_csv(client.failures_path(output)))
    assert failures[0] == ["kind", "rows", "attempts", "reason"]
    assert all(kind == "bad row" for kind, *_ in failures[1:]), failures  # none given up
    reported = {int(rows): why for _, rows, _, why in failures[1:]}
    assert set(reported) == set(planted)
    for position, kind in planted.items():
        why = "rejected: 400: bad input" if terse else REASONS[kind]
        assert why in reported[position], (position, kind, reported[position])


def succeeded_in_journal(journal: Path) -> int:
    conn = sqlite3.connect(journal)
    try:
        (count,) = conn.execute(
            "SELECT count(*) FROM conveyor_items WHERE status = 'succeeded'"
        ).fetchone()
        return int(count)
    except sqlite3.OperationalError:
        return 0  # not created yet
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
async def test_every_good_row_is_scored_once_and_every_bad_row_reported_at_20pct_failures(
    flaky_fleet: list[str], sample: tuple[Path, dict[int, str]], tmp_path: Path
) -> None:
    sample_path, planted = sample
    output = tmp_path / "out.csv"
    outcome = await client.score_file(sample_path, output, flaky_fleet, progress=False)
    check_output(sample_path, output, planted)
    assert outcome.scored == ROWS - BAD
    assert outcome.from_journal == 0
    assert outcome.rows_given_up == BAD and not outcome.given_up_rows
    # The faults really happened, and only retryable ones were retried.
    failed_attempts = sum(1 for _, ok in outcome.latencies if not ok)
    assert failed_attempts >= 0.1 * len(outcome.latencies)
    assert set(outcome.retries) <= {"503 unavailable", "connection dropped"}
    assert outcome.retries["503 unavailable"] > 0 and outcome.retries["connection dropped"] > 0
    # The 400s named their rows: nothing was split.
    assert outcome.split_batches == 0
    assert outcome.requests == len(outcome.latencies)


@pytest.mark.slow
async def test_split_on_failure_gives_up_only_the_bad_rows_a_terse_400_refused(
    terse_fleet: list[str], sample: tuple[Path, dict[int, str]], tmp_path: Path
) -> None:
    sample_path, planted = sample
    # Without splitting (the client before batching), each batch holding a bad row is given
    # up whole: hundreds of good rows for the sake of one.
    whole = await client.score_file(sample_path, tmp_path / "whole.csv", terse_fleet,
                                    progress=False, split=False)
    lost = {position for position, _ in whole.given_up_rows}
    assert set(planted) <= lost and not whole.bad_rows
    assert BAD < whole.rows_given_up <= BAD * client.BATCH_SIZE
    assert whole.scored == ROWS - whole.rows_given_up
    assert all("its whole batch of" in why for _, why in whole.given_up_rows)
    # With it, the same faults give up the bad rows alone; every good row is scored once.
    output = tmp_path / "out.csv"
    outcome = await client.score_file(sample_path, output, terse_fleet, progress=False)
    check_output(sample_path, output, planted, terse=True)
    assert outcome.rows_given_up == BAD and not outcome.given_up_rows
    assert 1 <= outcome.split_batches <= BAD
    # O(p log n) requests to isolate them: beyond one answered request per batch, at most
    # 2 ceil(log2 500) = 18 per bad row (the retries of 503s and drops aside).
    answered = sum(1 for _, ok in outcome.latencies if ok)
    assert answered <= outcome.sent_batches + 18 * BAD
    report = client.format_report(outcome, output, len(terse_fleet))
    assert f"given up  {BAD} rows: {BAD} bad rows" in report, report
    assert f"{outcome.split_batches} split in halves" in report, report


async def run_client_and_kill(
    sample_path: Path, output: Path, urls: list[str], how: signal.Signals
) -> tuple[int, int, bytes]:
    """Start the client as a process, wait until the journal holds 8 batches' rows, send
    ``how``; return (exit code, rows in the journal after, stderr)."""
    journal = output.with_name(output.name + ".journal")
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "examples.predict", "client", str(sample_path),
         "--servers", ",".join(urls), "--output", str(output), "--per-server", "1",
         "--no-progress"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(30):
            while await trio.to_thread.run_sync(succeeded_in_journal, journal) < 8 * 500:
                assert process.poll() is None, "the client ended before it was killed"
                await trio.sleep(0.05)
        process.send_signal(how)
        with trio.fail_after(30):
            await process.wait()
        assert process.stderr is not None
        stderr = b""
        while chunk := await process.stderr.receive_some():
            stderr += chunk
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, succeeded_in_journal(journal), stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
async def test_a_client_killed_half_way_resumes_and_scores_each_row_once(
    how: signal.Signals, slow_fleet: list[str], flaky_fleet: list[str],
    sample: tuple[Path, dict[int, str]], tmp_path: Path,
) -> None:
    sample_path, planted = sample
    output = tmp_path / "out.csv"
    code, done, stderr = await run_client_and_kill(sample_path, output, slow_fleet, how)
    if how == signal.SIGINT:
        assert code == 130 and b"interrupted" in stderr, (code, stderr)
    else:
        assert code == -signal.SIGKILL
    assert not output.exists()  # the output is only written by a complete run
    assert 8 * 500 <= done < ROWS - BAD  # half-way: some done, not all

    # Run again (on the flaky fleet, so retries happen in the resumed run too).
    outcome = await client.score_file(sample_path, output, flaky_fleet, progress=False)
    check_output(sample_path, output, planted)
    # Exactly what the journal held was skipped; the rest was sent once each.
    assert outcome.from_journal == done
    assert outcome.sent_rows == ROWS - done


@pytest.mark.slow
def test_the_demo_scores_a_small_sample_and_resumes_from_its_journal(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.predict", "demo", "--rows", "4000",
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "3,999 predictions equal the model computed locally; 1 bad rows reported" in out, out
    assert "given up  1 rows: 1 bad rows" in out, out
    assert "taken from the journal" in out and "output unchanged: True" in out, out
    assert out.count("saw: {") == 4, out


# ---------------------------------------------------------------------------------------------
# The server under fuzzed bodies


def json_values() -> st.SearchStrategy[object]:
    scalars = (
        st.none() | st.booleans() | st.text(max_size=8)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.integers(min_value=-(10**400), max_value=10**400)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=30,
    )


def numbers() -> st.SearchStrategy[object]:
    return (
        st.floats(allow_nan=True, allow_infinity=True)
        | st.integers(min_value=-(10**400), max_value=10**400)
        | st.sampled_from([1e300, -1e308, 1e9, 1e9 + 1, 0.0, -0.0])
    )


def bodies() -> st.SearchStrategy[bytes]:
    rows_like = st.builds(
        lambda rows: {"rows": rows},
        st.lists(st.lists(numbers(), min_size=WIDTH - 1, max_size=WIDTH + 1), max_size=5),
    )
    return st.one_of(
        st.binary(max_size=300),
        json_values().map(lambda v: json.dumps(v).encode()),
        st.builds(lambda v: json.dumps({"rows": v}).encode(), json_values()),
        rows_like.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([
            b"[" * 100_000,  # deeper than the JSON parser's recursion limit
            b'{"rows": [' + b"[0,0,0,0,0,0,0,0]," * 5000 + b"[0,0,0,0,0,0,0,0]]",  # > 64 KiB
            b'{"rows": [[' + b"9" * 5000 + b",0,0,0,0,0,0,0]]}",  # an int of 5000 digits
            b"",
            b"\xff\xfe\x00{",
            b'{"rows": [[NaN, Infinity, -Infinity, 0, 0, 0, 0, 0]]}',
        ]),
    )


@pytest.mark.slow
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies())
def test_the_server_answers_every_bad_body_with_a_4xx_and_stays_up(
    clean_server: httpx.Client, body: bytes
) -> None:
    response = clean_server.post("/predict", content=body)
    assert response.status_code in (200, 400, 413), (response.status_code, body[:200])
    if response.status_code == 400:
        assert response.json()["error"]
    if response.status_code == 200:
        # Only a valid batch is scored, and scored right.
        rows = check_batch(json.loads(body))
        assert response.json()["predictions"] == [predict_row(r) for r in rows]
    assert clean_server.get("/health").text == "ok"


# ---------------------------------------------------------------------------------------------
# Contract: the checks name the row


def test_a_bad_batch_names_each_bad_row_and_why() -> None:
    good = [0.5] * WIDTH
    with pytest.raises(BadBatch) as caught:
        check_batch({"rows": [good, [*good[:3], math.nan, *good[4:]], good[:5], good,
                              [*good[:2], "x", *good[3:]], [*good, 1.0], [10**400] * WIDTH]})
    assert caught.value.rows == [
        (1, "column 3: NaN"),
        (2, f"expected {WIDTH} values, got 5"),
        (4, "column 2: not a number: 'x'"),
        (5, f"expected {WIDTH} values, got {WIDTH + 1}"),
        (6, "column 0: out of range (|x| <= 1e+09)"),
    ]
    assert str(caught.value).startswith("5 bad row(s): row 1: column 3: NaN; row 2:")
    with pytest.raises(BadBatch, match=r'must be a JSON object \{"rows"'):
        check_batch([good])
    with pytest.raises(BadBatch, match=r'"rows" must be a non-empty list'):
        check_batch({"rows": []})
    assert check_batch({"rows": [[1] * WIDTH]}) == [[1.0] * WIDTH]


def test_row_keys_follow_the_position_and_the_text() -> None:
    text = ["1.5"] * WIDTH
    row = client.Row.of(10, text)
    assert row.key == client.Row.of(10, text).key and row.key.startswith("row 10 ")
    assert row.key != client.Row.of(11, text).key
    assert row.key != client.Row.of(10, [*text[:-1], "9"]).key
    assert row.values == (1.5,) * WIDTH
    assert client.Row.of(0, ["nan", "n/a"]).values[1] == "n/a"  # sent as is: the server says


def test_retry_after_is_read_leniently() -> None:
    assert client._retry_after("2") == 2.0
    assert client._retry_after("0.5") == 0.5
    assert client._retry_after(None) == 1.0
    assert client._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 1.0
    assert client._retry_after("1e9") == 60.0
    assert client._retry_after("nan") == 1.0
