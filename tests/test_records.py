"""Records are immutable values with their own equality (issue 11: made in one C call)."""

from __future__ import annotations

import copy
import pickle

import pytest

from conveyor import Failed, Succeeded, Unfinished


def test_fields_by_name_and_assignment_refused() -> None:
    record = Succeeded("x", 2, 3, index=7)
    assert (record.item, record.value, record.attempts, record.index) == ("x", 2, 3, 7)
    with pytest.raises(AttributeError):
        record.value = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        record.other = 1  # type: ignore[attr-defined]


def test_equality_leaves_index_out_and_tells_kinds_apart() -> None:
    error = ValueError("e")
    assert Succeeded("x", 1, 1, 0) == Succeeded("x", 1, 1, 5)
    assert hash(Succeeded("x", 1, 1, 0)) == hash(Succeeded("x", 1, 1, 5))
    assert Succeeded("x", 1, 1) != Succeeded("x", 2, 1)
    assert Failed("x", error, 1, "tb") == Failed("x", error, 1, "tb", index=3)
    assert Unfinished("x", 1, None) != Succeeded("x", 1, None)  # same fields, other kind
    assert Succeeded("x", 1, 1) != ("x", 1, 1, -1)  # nor a plain tuple, either way round
    assert ("x", 1, 1, -1) != Succeeded("x", 1, 1)
    assert len({Succeeded("x", 1, 1, 0), Succeeded("x", 1, 1, 1)}) == 1


def test_repr_names_the_fields_and_hides_the_traceback() -> None:
    assert repr(Succeeded("x", 1, 2, 3)) == "Succeeded(item='x', value=1, attempts=2, index=3)"
    failed = Failed("x", KeyError("k"), 1, "Traceback...", 4)
    assert repr(failed) == "Failed(item='x', error=KeyError('k'), attempts=1, index=4)"


def test_pickle_and_copy_keep_every_field() -> None:
    for record in (
        Succeeded("x", [1], 2, 3),
        Failed("x", ValueError("v"), 1, "tb", 9),
        Unfinished("x", 0, None, 2),
    ):
        for clone in (pickle.loads(pickle.dumps(record)), copy.copy(record),
                      copy.deepcopy(record)):
            assert type(clone) is type(record)
            assert clone.index == record.index
            assert repr(clone) == repr(record)


def test_match_by_kind_and_fields() -> None:
    def describe(record: object) -> str:
        match record:
            case Succeeded(item, value):
                return f"{item}={value}"
            case Failed(item, error):
                return f"{item}!{type(error).__name__}"
            case Unfinished(item):
                return f"{item}?"
        return "other"

    assert describe(Succeeded("a", 1, 1)) == "a=1"
    assert describe(Failed("b", KeyError(), 1, "")) == "b!KeyError"
    assert describe(Unfinished("c", 0, None)) == "c?"
    assert describe(("a", 1, 1, -1)) == "other"
