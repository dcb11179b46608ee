"""Benchmarks: conveyor against the asyncio patterns it replaces, same work, same run.

Run them with `python -m benchmarks` (or `make bench`); see `benchmarks/__main__.py` for the
options and `benchmarks/_harness.py` for the method. Nothing here is imported by the library,
and importing this package imports neither trio nor asyncio's extras: the memory scenario's
child processes import only what their system needs.
"""
