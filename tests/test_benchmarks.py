"""The benchmark runner works; nothing here measures or asserts speed.

Layers: the harness (rotation, medians, ratios, the table) with fake systems; the command
line; and end to end, `python -m benchmarks --smoke` run once on tiny counts in a child
process, checked for one table row per scenario and a valid JSON document.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import instructions
from benchmarks.__main__ import LOCAL, README, RESULTS, SCENARIOS, parse_args, replace_block
from benchmarks._harness import NOT_YET, Case, Sample, System, format_table, rotated, run_case

ROOT = Path(__file__).resolve().parent.parent


def test_rotated_gives_each_system_each_position() -> None:
    systems = ["a", "b", "c"]
    orders = [rotated(systems, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert rotated([], 4) == []


def _fake(name: str, values: list[float], calls: list[str]) -> System:
    it = iter(values)

    def measure() -> Sample:
        calls.append(name)
        v = next(it)
        return Sample(v, {"side": 10 * v})

    return System(name, measure, reference=name == "ref")


def test_run_case_warms_up_rotates_and_takes_medians() -> None:
    calls: list[str] = []
    case = Case(
        "s",
        "case",
        "ms",
        [
            _fake("ref", [99, 2, 4, 3, 1, 5], calls),  # warm-up 99 is discarded
            _fake("x", [99, 6, 10, 8, 2, 30], calls),
            System("later", None),
        ],
        notes={"side": "side {:.0f}"},
    )
    ref, x, later = run_case(case, rounds=5, warmup=1)
    assert calls == ["ref", "x", *["ref", "x", "x", "ref"] * 2, "ref", "x"]
    assert (ref.samples, ref.median, ref.ratio) == ([2, 4, 3, 1, 5], 3, 1.0)
    assert (x.median, x.ratio) == (8, 8 / 3)
    assert x.note == "side 80"
    assert later.samples == [] and later.missing == NOT_YET and later.ratio is None
    table = format_table([ref, x, later])
    assert "ref" in table and "2.67x" in table and NOT_YET in table
    assert x.as_json()["min"] == 2 and x.as_json()["max"] == 30


def test_rounds_below_five_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "3"])
    assert "--rounds must be >= 5, got 3" in capsys.readouterr().err
    assert parse_args(["--smoke"]).rounds == 1
    assert parse_args(["--only", "io", "--only", "memory"]).only == ["io", "memory"]


def _git_status() -> list[str]:
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(done.stdout.splitlines())


@pytest.mark.slow
def test_smoke_run_prints_every_scenario_and_leaves_the_clone_unmodified() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    status_before = _git_status()
    tracked_before = RESULTS.read_bytes()
    readme_before = README.read_bytes()
    out = LOCAL / "latest.json"
    out.unlink(missing_ok=True)
    out.with_suffix(".png").unlink(missing_ok=True)  # (left by an earlier `make bench`)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-chart"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A plain run writes into the ignored local directory; nothing tracked changes and
    # nothing new shows up in `git status`.
    assert RESULTS.read_bytes() == tracked_before
    assert README.read_bytes() == readme_before
    assert _git_status() == status_before
    assert f"wrote {out}" in done.stdout

    table = done.stdout.splitlines()
    for name in SCENARIOS:
        assert any(line.startswith(name) for line in table), (name, done.stdout)

    doc = json.loads(out.read_text())
    assert doc["mode"] == "smoke"
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["platform"]
    assert doc["versions"]["trio"] and doc["versions"]["python"]
    assert doc["date"]
    rows = doc["rows"]
    assert {r["scenario"] for r in rows} == set(SCENARIOS)
    for case in {r["case"] for r in rows}:
        refs = [r for r in rows if r["case"] == case and r["reference"]]
        assert len(refs) == 1 and refs[0]["ratio"] == 1.0, case
    for r in rows:
        assert r["missing"] is not None or (r["median"] is not None and r["median"] >= 0), r
    assert not out.with_suffix(".png").exists()  # --no-chart


@pytest.mark.slow
def test_out_puts_the_json_where_asked(tmp_path: Path) -> None:
    out = tmp_path / "mine.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-chart", "--only", "io", "--out",
         str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["scenarios"] == ["io"]


def test_local_results_are_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = LOCAL / "latest.json"
    done = subprocess.run(
        ["git", "check-ignore", "-q", str(probe)], cwd=ROOT, capture_output=True, check=False
    )
    assert done.returncode == 0, f"{probe} is not ignored by git"


@pytest.mark.parametrize("flag", [["--smoke"], ["--only", "io"], ["--out", "x.json"]])
def test_publish_refuses_a_partial_run(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--publish", *flag])
    err = capsys.readouterr().err
    assert f"cannot be combined with {flag[0]}" in err
    # The suggested fix: the same run without the flag is accepted.
    assert parse_args(["--publish"]).publish


def test_jobs_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--instructions", "--jobs", "0"])
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_publish_replaces_only_the_marked_block() -> None:
    text = "intro\n<!-- bench:table -->\n```\nold\n```\n<!-- /bench:table -->\nafter\n"
    new = replace_block(text, "bench:table", "```\nnew\n```")
    assert new == "intro\n<!-- bench:table -->\n```\nnew\n```\n<!-- /bench:table -->\nafter\n"
    with pytest.raises(ValueError, match="no <!-- bench:instructions -->"):
        replace_block(text, "bench:instructions", "x")


def test_readme_has_the_blocks_publish_fills() -> None:
    text = README.read_text()
    for name in ("bench:table", "bench:instructions"):
        assert replace_block(text, name, "x").count(f"<!-- {name} -->\nx\n<!-- /{name} -->") == 1


def test_instruction_arithmetic_and_parsing() -> None:
    stderr = "==1== Events    : Ir\n==1== Collected : 1,234,567\n==1==\n==1== I   refs: 1\n"
    assert instructions.parse_collected(stderr) == 1_234_567
    with pytest.raises(instructions.MeasureError, match="no 'Collected : N' line"):
        instructions.parse_collected("valgrind: command not found")
    with pytest.raises(ValueError, match="sizes must be two counts"):
        instructions.measure(sizes=(600, 200))


@pytest.mark.slow
def test_instructions_smoke_run_prints_a_table_that_parses(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--instructions", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if not instructions.has_valgrind():
        assert done.stdout.strip() == instructions.NO_VALGRIND
        assert not out.exists()
        pytest.skip("valgrind is not installed")
    doc = json.loads(out.read_text())
    assert doc["sizes"] == [200, 600]
    rows = {r["case"]: r for r in doc["rows"]}
    ref, run = rows["asyncio (seed 000), no-op"], rows["conveyor.run, no-op"]
    for row in (ref, run):
        small, large = row["instructions"]
        assert 0 < small < large
        assert row["per_item"] == pytest.approx((large - small) / 400, abs=0.1)
    assert ref["ratio"] == 1.0
    assert run["ratio"] == pytest.approx(run["per_item"] / ref["per_item"], rel=1e-3)
    lines = done.stdout.splitlines()
    assert any(line.startswith("conveyor.run, no-op") and "x" in line for line in lines), lines


def test_instructions_without_valgrind_say_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.__main__ import main

    monkeypatch.setenv("PATH", "")  # no valgrind (nor anything else) on PATH
    assert main(["--instructions", "--smoke"]) == 0
    assert capsys.readouterr().out.strip() == instructions.NO_VALGRIND
