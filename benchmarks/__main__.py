"""`python -m benchmarks`: conveyor against the asyncio patterns, same work, same run.

Runs every scenario (or `--only NAME`), prints one table (scenario, system, median, min-max,
ratio to the asyncio reference measured in the same run), writes
`benchmarks/results/latest.json` (machine, versions, date, every sample) and, when matplotlib
is installed, `latest.png` (the ratios). Quick by default (the whole suite in about two to
three minutes on 2 cores; the machine may be shared, so the counts are modest and the table
says which ones it used); `--full` for the issue's full counts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._harness import Config, Row, format_table, run_case

# Scenario name -> module; the order of the table.
SCENARIOS = {
    "overhead": "benchmarks.overhead",
    "io": "benchmarks.io_retry",
    "offload": "benchmarks.offload",
    "responsiveness": "benchmarks.responsiveness",
    "memory": "benchmarks.memory",
}
RESULTS = Path(__file__).parent / "results" / "latest.json"
MIN_ROUNDS = 5
PACKAGES = ("conveyor", "trio", "trio-parallel", "outcome", "uvloop", "aiometer", "anyio")


def git_revision() -> str | None:
    """The checkout's commit (with "-dirty" if the tree has changes), when run from git."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "git": git_revision()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the issue's full counts (slower)")
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=MIN_ROUNDS,
        help=f"measured rounds per system (default and minimum {MIN_ROUNDS}, but see --smoke)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny counts, 1 round, no warm-up: proves the runner works, measures nothing",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = 1
    elif args.rounds < MIN_ROUNDS:
        p.error(f"--rounds must be >= {MIN_ROUNDS}, got {args.rounds}")
    return args


def chart(rows: Sequence[Row], path: Path) -> Path | None:
    """A horizontal bar chart of the ratios (log scale); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [r for r in rows if r.ratio is not None and not r.reference]
    if not shown:
        return None
    labels = [f"{r.case}\n{r.system}" for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.5))
    colors = ["tab:green" if r.ratio is not None and r.ratio <= 1 else "tab:red" for r in shown]
    ax.barh(range(len(shown)), [r.ratio or 0 for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("median / asyncio reference in the same run (lower is better)")
    ax.set_title("conveyor and friends against the asyncio patterns")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load(load: Sequence[float] | None) -> str:
    return "?" if not load else "/".join(f"{x:.1f}" for x in load)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(full=args.full, smoke=args.smoke)
    names = args.only or list(SCENARIOS)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    mach, vers = machine(), versions()

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for name in names:
        t_scenario = time.perf_counter()
        module = importlib.import_module(SCENARIOS[name])
        progress(f"{name} ...")
        for case in module.cases(cfg):
            rows.extend(
                run_case(case, rounds=args.rounds, warmup=0 if args.smoke else 1, progress=progress)
            )
        seconds[name] = round(time.perf_counter() - t_scenario, 1)
        progress(f"{name}: {seconds[name]:.0f} s")
    elapsed = time.perf_counter() - t0
    load = os.getloadavg() if hasattr(os, "getloadavg") else None

    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    header = (
        f"conveyor {vers['conveyor']} ({vers['git']}) benchmarks, {started:%Y-%m-%d %H:%M} UTC, "
        f"{mode} run, {args.rounds} rounds (median, min-max), {elapsed:.0f} s\n"
        f"{mach['cpu_count']} CPUs, {mach['platform']}, {mach['python']}; trio {vers['trio']}, "
        f"trio-parallel {vers['trio-parallel']}, uvloop {vers['uvloop']}, "
        f"aiometer {vers['aiometer']}; load average {_load(mach['load_avg_at_start'])} at start, "
        f"{_load(load)} at end\n"
        "ratio = median / the asyncio reference (ref) measured in the same run; lower is better"
    )
    print(header)
    print(format_table(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "mode": mode,
        "rounds": args.rounds,
        "elapsed_s": round(elapsed, 1),
        "scenario_seconds": seconds,
        "load_avg_at_end": list(load) if load else None,
        "scenarios": names,
        "machine": mach,
        "versions": vers,
        "rows": [r.as_json() for r in rows],
    }
    args.out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")
    if not args.no_chart:
        png = chart(rows, args.out.with_suffix(".png"))
        if png is not None:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
