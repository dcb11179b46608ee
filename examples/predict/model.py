"""The model the prediction servers run, and the checks a batch must pass.

A fixed linear model with a nonlinearity: ``tanh(BIAS + sum(w * x))`` over ``WIDTH``
features. Cheap on purpose (the demo is about the network, not the maths) and deterministic:
the tests compute it locally with this same function and expect the very same floats back
(JSON carries a float exactly: ``repr`` round-trips).
"""

from __future__ import annotations

import math
from typing import Any

WIDTH = 8
WEIGHTS = tuple(round(math.sin(1.0 + i), 6) for i in range(WIDTH))
BIAS = 0.25
# Feature values must be finite and at most this large (no overflow inside the model).
MAX_ABS = 1e9
# A request holds at most this many rows.
MAX_ROWS = 10_000
# How many bad rows a 400 answer lists (the count is always given).
MAX_LISTED = 20


def predict_row(row: list[float]) -> float:
    """The prediction for one row of ``WIDTH`` finite floats."""
    z = BIAS
    for w, x in zip(WEIGHTS, row, strict=True):
        z += w * x
    return math.tanh(z)


def score_rows(rows: list[list[float]]) -> list[float]:
    """One prediction per row (run in a worker process by the server)."""
    return [predict_row(row) for row in rows]


class BadBatch(ValueError):
    """The request body is not a valid batch; ``rows`` are (row index, reason) pairs."""

    def __init__(self, message: str, rows: list[tuple[int, str]] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []


def _row_problem(row: object) -> str | None:
    if not isinstance(row, list):
        return f"a row must be a list of {WIDTH} numbers, got {type(row).__name__}"
    if len(row) != WIDTH:
        return f"expected {WIDTH} values, got {len(row)}"
    for column, value in enumerate(row):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"column {column}: not a number: {_short(value)}"
        try:
            number = float(value)
        except OverflowError:
            return f"column {column}: out of range (|x| <= {MAX_ABS:g})"
        if math.isnan(number):
            return f"column {column}: NaN"
        if not abs(number) <= MAX_ABS:
            return f"column {column}: out of range (|x| <= {MAX_ABS:g}): {_short(value)}"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_batch(body: Any) -> list[list[float]]:
    """The rows of a decoded request body ``{"rows": [[x0, ..., x7], ...]}``, as floats.

    Raises:
        BadBatch: the body is not such an object, or some rows are bad (all of them are
            found; the first ``MAX_LISTED`` are named, by index in the batch).
    """
    if not isinstance(body, dict) or "rows" not in body:
        raise BadBatch('the body must be a JSON object {"rows": [[...], ...]}')
    rows = body["rows"]
    if not isinstance(rows, list) or not rows:
        raise BadBatch('"rows" must be a non-empty list of rows')
    if len(rows) > MAX_ROWS:
        raise BadBatch(f'"rows" holds {len(rows)} rows, at most {MAX_ROWS} per request')
    bad: list[tuple[int, str]] = []
    for index, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            bad.append((index, problem))
    if bad:
        listed = "; ".join(f"row {i}: {why}" for i, why in bad[:MAX_LISTED])
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise BadBatch(f"{len(bad)} bad row(s): {listed}{more}", bad[:MAX_LISTED])
    return [[float(x) for x in row] for row in rows]
