"""`python -m benchmarks`: conveyor against the asyncio patterns, same work, same run.

Runs every scenario (or `--only NAME`), prints one table (scenario, system, median, min-max,
ratio to the asyncio reference measured in the same run), writes the JSON (machine, versions,
date, every sample) to `benchmarks/results/local/latest.json` (ignored by git; `--out PATH`
to put it elsewhere) and, when matplotlib is installed, `latest.png` (the ratios) beside it.
A plain run leaves the clone's tracked files as they were. Quick by default (the whole suite in
about two to three minutes on 2 cores; the machine may be shared, so the counts are modest and
the table says which ones it used); `--full` for the issue's full counts.

`--publish` is the explicit step that updates the tracked results: the JSON goes to
`benchmarks/results/latest.json` and the table replaces the one in README.md (between the
`<!-- bench:table -->` markers). `--instructions` counts instructions per item with callgrind
instead (see `benchmarks/instructions.py`); with `--publish` its table goes to README.md
(the `bench:instructions` markers) and its JSON to `benchmarks/results/instructions.json`.
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
    "batching": "benchmarks.batching",
    "pipeline": "benchmarks.pipeline",
}
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_DIR / "latest.json"  # tracked: written by --publish only
LOCAL = RESULTS_DIR / "local"  # ignored by git (benchmarks/results/.gitignore): plain runs
INSTRUCTIONS = RESULTS_DIR / "instructions.json"  # tracked: --instructions --publish
README = ROOT / "README.md"
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
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the JSON (default {LOCAL.relative_to(ROOT)}/, ignored by git)",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="update the tracked results and README.md's table (a full-suite run only)",
    )
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per item with callgrind (needs valgrind) instead of timing",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="--instructions: callgrind processes at a time (counts do not depend on load)",
    )
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=(
            "tiny counts, 1 round, no warm-up: proves the runner works, measures nothing "
            "(with --instructions: N=200 and 600, the no-op asyncio and conveyor.run cases only)"
        ),
    )
    args = p.parse_args(argv)
    if args.publish:
        for flag, value in (("--smoke", args.smoke), ("--only", args.only), ("--out", args.out)):
            if value:
                p.error(
                    f"--publish writes the tracked results of a whole run; it cannot be "
                    f"combined with {flag} (run without {flag}, or drop --publish)"
                )
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
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


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the lines between `<!-- name -->` and `<!-- /name -->` replaced by `body`."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README.md has no {start} ... {end} block to replace")
    return text[: i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def publish_block(name: str, body: str, readme: Path = README) -> None:
    """Put `body` (a plain-text table) as a code block into README.md's `name` block."""
    readme.write_text(replace_block(readme.read_text(), name, f"```\n{body}\n```"))
    print(f"updated {readme} ({name})")


def _json_out(args: argparse.Namespace, published: Path) -> Path:
    if args.publish:
        return published
    return args.out if args.out is not None else LOCAL / published.name


def instructions_main(args: argparse.Namespace) -> int:
    """`--instructions`: the callgrind counts, printed (and published with `--publish`)."""
    from benchmarks import instructions as ins

    if not ins.has_valgrind():
        print(ins.NO_VALGRIND)
        return 0
    sizes = ins.SMOKE_SIZES if args.smoke else ins.SIZES
    started = datetime.datetime.now(datetime.UTC)
    vers = versions()
    cases = ins.CASES[:2] if args.smoke else ins.CASES
    results = ins.measure(
        cases,
        sizes=sizes, jobs=args.jobs, progress=lambda m: print(m, file=sys.stderr, flush=True)
    )
    header = (
        f"conveyor {vers['conveyor']} ({vers['git']}) instructions per item (callgrind), "
        f"{started:%Y-%m-%d %H:%M} UTC; CPython {vers['python']}, trio {vers['trio']}\n"
        f"instr/item = (I(N={sizes[1]:,}) - I(N={sizes[0]:,})) / {sizes[1] - sizes[0]:,}; "
        "ratio = instr/item / the asyncio queue's (ref) with the same work; lower is better"
    )
    table = f"{header}\n{ins.format_table(results)}"
    print(table)
    out = _json_out(args, INSTRUCTIONS)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "instructions",
        "sizes": list(sizes),
        "machine": machine(),
        "versions": vers,
        "rows": [r.as_json() for r in results],
    }
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out}")
    if args.publish:
        publish_block("bench:instructions", table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.instructions:
        return instructions_main(args)
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
    table = f"{header}\n{format_table(rows)}"
    print(table)

    out = _json_out(args, RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out}")
    if not args.no_chart:
        png = chart(rows, out.with_suffix(".png"))
        if png is not None:
            print(f"wrote {png}")
    if args.publish:
        publish_block("bench:table", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
