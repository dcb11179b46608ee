"""The public surface: everything in __all__ exists, and the contract names are there.

The contract is summarised in docs/design.md ("The public contract...", invariant 15).
"""

from __future__ import annotations

import conveyor

CONTRACT = {
    "run", "map", "open_pool", "Retry", "Backoff", "Succeeded", "Failed", "Unfinished",
    "Report", "Stats",
}


def test_all_names_exist_and_are_public() -> None:
    for name in conveyor.__all__:
        assert hasattr(conveyor, name), name
        assert not name.startswith("_")
    assert len(set(conveyor.__all__)) == len(conveyor.__all__)


def test_contract_names_exported() -> None:
    assert CONTRACT <= set(conveyor.__all__)


def test_modules_are_private() -> None:
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(conveyor.__path__)]
    assert names and all(n.startswith("_") for n in names), names
