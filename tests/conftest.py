"""Test-wide settings.

Hypothesis: under CI (the environment sets ``CI``), each property runs the same examples every
time (``derandomize``), so a submission lands or not on its own merits, not on the draw of
that run. Locally the draws stay random, which is how the widened scenarios found their bugs:
run them often, and with ``CONVEYOR_EXAMPLES=10000`` (tests/test_invariants.py) before a
change to the pool is called done.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
