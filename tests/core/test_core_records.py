"""Records: what the wire schema relies on, now that they are not dataclasses."""

from __future__ import annotations

import pickle
from typing import ClassVar

import pytest

from tether.core import records
from tether.core.records import Record


class Point(Record):
    """A frozen record with a default."""

    KIND: ClassVar[str] = "point"
    x: int
    y: int = 0


class Box(Record, frozen=False):
    items: list[int]


def test_fields_defaults_and_init() -> None:
    assert records.fields(Point) == ("x", "y")
    assert records.defaults(Point) == {"y": 0}
    assert Point(1) == Point(1, 0) == Point(x=1)
    assert Point(1, 2).y == 2
    assert Point.KIND == "point"
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, 3)  # type: ignore[call-arg]


def test_frozen_records_are_immutable_hashable_and_slotted() -> None:
    p = Point(1, 2)
    with pytest.raises(AttributeError, match="frozen"):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.z = 1  # type: ignore[attr-defined]
    assert not hasattr(p, "__dict__")
    assert {p, Point(1, 2)} == {p}
    assert hash(p) != hash(Point(2, 1))
    assert repr(p) == "Point(x=1, y=2)"
    assert pickle.loads(pickle.dumps(p)) == p


def test_equality_needs_the_same_class() -> None:
    class Other(Record):
        x: int
        y: int = 0

    assert Point(1, 2) != Other(1, 2)
    assert Point(1, 2) != (1, 2)


def test_mutable_records_can_change_and_are_not_hashable() -> None:
    b = Box([1])
    b.items.append(2)
    b.items = [3]
    assert b == Box([3])
    with pytest.raises(TypeError):
        hash(b)


def test_a_field_without_default_cannot_follow_one_with() -> None:
    with pytest.raises(TypeError, match="without a default"):

        class Bad(Record):
            a: int = 0
            b: int


def test_is_record() -> None:
    assert records.is_record(Point) and records.is_record(Point(1))
    assert not records.is_record(int) and not records.is_record(3)
    assert not records.is_record(tuple[int, ...])
