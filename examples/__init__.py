"""Runnable examples (``python -m examples.predict ...`` from the repository root)."""
