"""The benchmark runner works; nothing here measures or asserts speed.

Layers: the harness (rotation, medians, ratios, the table) with fake systems; the command
line; and end to end, `python -m benchmarks --smoke` run once on tiny counts in a child
process, checked for one table row per scenario and a valid JSON document.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import SCENARIOS, parse_args
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


@pytest.mark.slow
def test_smoke_run_prints_every_scenario_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-chart", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
    assert not (tmp_path / "latest.png").exists()  # --no-chart
