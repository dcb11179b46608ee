"""The measuring machinery shared by every scenario: cases, rounds, medians, the table.

A *case* is one question ("100k no-op items, 20 workers") answered by several *systems*
(asyncio with the seed's pattern, the same on uvloop, conveyor, ...). Each system is a
zero-argument callable that performs ONE measurement in a fresh event loop (it calls
`asyncio.run` / `trio.run` itself) and returns a `Sample`.

Method (issue 5): one warm-up measurement per system, then `rounds` rounds; in round r the
systems run in an order rotated by r (A B C, B C A, C A B, ...), so neither drift on a shared
machine nor cache effects favour whoever goes first. We report the median and the min-max of
the rounds, and the ratio of the medians to the case's reference system (the asyncio pattern)
measured in the same run.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

NOT_YET = "n/a (not yet available)"


@dataclass(frozen=True)
class Sample:
    """One measurement: the headline value (lower is better) plus named side figures."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class System:
    """One way of doing a case's work. `measure=None` means it cannot run here (`missing`)."""

    name: str
    measure: Callable[[], Sample] | None
    reference: bool = False
    missing: str = NOT_YET


@dataclass(frozen=True)
class Case:
    """One question, answered by every system, reported in `unit` (lower is better)."""

    scenario: str
    name: str
    unit: str
    systems: Sequence[System]
    # How to print side figures in the note column: extra key -> format, e.g. "x ideal {:.3f}".
    notes: dict[str, str] = field(default_factory=dict)
    comment: str = ""


@dataclass
class Row:
    """A system's result in a case: what the table prints and the JSON keeps."""

    case: str
    scenario: str
    system: str
    unit: str
    samples: list[float]
    extras: dict[str, list[float]]
    reference: bool = False
    missing: str | None = None
    ratio: float | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def as_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "scenario": self.scenario,
            "system": self.system,
            "unit": self.unit,
            "reference": self.reference,
            "missing": self.missing,
            "median": self.median,
            "min": min(self.samples) if self.samples else None,
            "max": max(self.samples) if self.samples else None,
            "ratio": self.ratio,
            "samples": self.samples,
            "extras": {k: statistics.median(v) for k, v in self.extras.items() if v},
            "extras_samples": self.extras,
            "note": self.note,
        }


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """`items` rotated left by `shift`: the running order of round `shift`."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


def _one(system: System) -> Sample:
    assert system.measure is not None
    gc.collect()  # garbage left by the previous measurement is not this one's cost
    return system.measure()


def run_case(
    case: Case,
    *,
    rounds: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every available system of `case`; return one row per system (in case order)."""
    rows = {
        s.name: Row(
            case=case.name,
            scenario=case.scenario,
            system=s.name,
            unit=case.unit,
            samples=[],
            extras={},
            reference=s.reference,
            missing=None if s.measure is not None else s.missing,
        )
        for s in case.systems
    }
    available = [s for s in case.systems if s.measure is not None]
    for _ in range(warmup):
        for s in available:
            _one(s)
    for r in range(rounds):
        for s in rotated(available, r):
            sample = _one(s)
            row = rows[s.name]
            row.samples.append(sample.value)
            for key, value in sample.extra.items():
                row.extras.setdefault(key, []).append(value)
        if progress is not None:
            progress(f"  {case.name}: round {r + 1}/{rounds}")

    reference = next((rows[s.name] for s in case.systems if s.reference), None)
    ref_median = reference.median if reference is not None else None
    for row in rows.values():
        med = row.median
        if med is not None and ref_median:
            row.ratio = med / ref_median
        parts = [
            fmt.format(statistics.median(row.extras[key]))
            for key, fmt in case.notes.items()
            if row.extras.get(key)
        ]
        if row.missing is None and case.comment and row.reference:
            parts.append(case.comment)
        row.note = "; ".join(parts)
    return [rows[s.name] for s in case.systems]


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: scenario, system, median, min-max, ratio, note."""
    header = ("scenario", "system", "median", "min-max", "ratio", "note")
    lines: list[tuple[str, ...]] = []
    last_case = None
    for row in rows:
        case = row.case if row.case != last_case else ""
        last_case = row.case
        if row.missing is not None or not row.samples:
            lines.append((case, row.system, row.missing or "-", "", "", ""))
            continue
        med = row.median
        assert med is not None
        lines.append(
            (
                case,
                row.system,
                f"{_num(med)} {row.unit}",
                f"{_num(min(row.samples))}-{_num(max(row.samples))}",
                "ref" if row.reference else (f"{row.ratio:.2f}x" if row.ratio else "-"),
                row.note,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    out.extend(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    return "\n".join(out)


@dataclass(frozen=True)
class Config:
    """How big the run is: quick (default), `--full`, or `--smoke` (tiny, for the test)."""

    full: bool = False
    smoke: bool = False

    def pick(self, quick: int, full: int, smoke: int) -> int:
        """The count for this run size."""
        if self.smoke:
            return smoke
        return full if self.full else quick


def run_loop(factory: Callable[[], Any], *, uvloop: bool = False) -> Any:
    """Run the coroutine `factory()` in a fresh asyncio (or uvloop) event loop."""
    import asyncio

    if uvloop:
        import uvloop as uv

        return uv.run(factory())
    return asyncio.run(factory())


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def has_aiometer() -> bool:
    try:
        import aiometer  # noqa: F401
    except ImportError:
        return False
    return True


def conveyor_has(*names: str) -> bool:
    """Whether the installed conveyor already exposes every name (the library is growing)."""
    try:
        import conveyor
    except ImportError:
        return False
    return all(hasattr(conveyor, n) for n in names)
