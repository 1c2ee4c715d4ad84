"""Records on the wire: each record type compiled once into its field names and
a checker per field, so decoding checks every field's type and bound without
walking the annotations again per message.

``tether.core.messages`` declares the records; this is the machinery under
them. A malformed value raises ``RemoteProtocolError``.
"""

from __future__ import annotations

import types

from .errors import RemoteProtocolError
from .limits import MAX_DATA, MAX_ITEMS, MAX_STR
from .records import Record, defaults, field_types, fields, is_record

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is 0.5 MiB and 4 ms in every replica worker
    from collections.abc import Callable
    from typing import Any

    Checker = Callable[[Any, str], Any]

INT_MIN, INT_MAX = -(2**63), 2**63 - 1

# Every message goes through here (a keystroke is several messages), so each
# record type is compiled once, on first use, into a list of field names and a
# checker per field; the annotations are not walked again per message.

_SIMPLE = (int, str, bytes, bool, type(None))


def to_wire(obj: Any) -> Any:
    """A record (or a value holding records) as the lists msgpack encodes."""
    if type(obj) in _SIMPLE:
        return obj
    compiled = spec(type(obj)) if isinstance(obj, Record) else None
    if compiled is not None:
        values = [
            getattr(obj, n) if simple else to_wire(getattr(obj, n))
            for n, simple in compiled.wire
        ]
        return [compiled.type_id, *values] if compiled.type_id >= 0 else values
    if isinstance(obj, tuple | list):
        return [to_wire(x) for x in obj]
    return obj


class _Spec:
    """A record type, compiled: field names, per-field checkers, defaults."""

    __slots__ = ("checkers", "cls", "names", "required", "type_id", "wire")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.type_id: int = getattr(cls, "TYPE", -1)
        hints = field_types(cls)
        names = fields(cls)
        optional = defaults(cls)
        self.names = list(names)
        self.required = sum(1 for f in names if f not in optional)
        self.wire = [(f, _is_simple(hints[f])) for f in names]
        self.checkers: list[tuple[str, Checker, str]] = []
        _SPECS[cls] = self  # before the fields: records may nest
        self.checkers = [(f, _checker(hints[f]), f"{cls.__name__}.{f}") for f in names]

    def build(self, values: list[Any]) -> Any:
        if not self.required <= len(values) <= len(self.names):
            raise RemoteProtocolError(f"{self.cls.__name__}: wrong number of fields")
        kwargs = {
            name: check(v, where)
            for (name, check, where), v in zip(self.checkers, values, strict=False)
        }
        return self.cls(**kwargs)


_SPECS: dict[type, _Spec] = {}
_CHECKERS: dict[Any, Checker] = {}


def spec(cls: type) -> _Spec:
    """The compiled form of record type ``cls`` (compiled on first use)."""
    found = _SPECS.get(cls)
    return found if found is not None else _Spec(cls)


def _is_simple(tp: Any) -> bool:
    """A field whose value goes on the wire as it is."""
    if tp in _SIMPLE:
        return True
    if isinstance(tp, types.UnionType):
        return all(a in _SIMPLE for a in tp.__args__)
    return False


def _checker(tp: Any) -> Checker:
    check = _CHECKERS.get(tp)
    if check is None:
        check = _CHECKERS[tp] = _make_checker(tp)
    return check


def _make_checker(tp: Any) -> Checker:
    """The checker of one annotation: a union, a tuple, a scalar or a record."""
    if isinstance(tp, types.UnionType):
        return _union_checker(tp.__args__)
    if getattr(tp, "__origin__", None) is tuple:
        return _tuple_checker(tp.__args__)
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        return scalar
    if is_record(tp):
        return _record_checker(tp)
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this module


def _union_checker(args: tuple[Any, ...]) -> Checker:
    optional = type(None) in args
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        inner = _checker(members[0])

        def check_optional(value: Any, where: str) -> Any:
            if value is None and optional:
                return None
            return inner(value, where)

        return check_optional
    by_id = {getattr(m, "TYPE", -1): m for m in members}

    def check_union(value: Any, where: str) -> Any:
        if value is None and optional:
            return None
        # a union of messages: the type id picks the member
        if isinstance(value, list) and value and type(value[0]) is int:
            cls = by_id.get(value[0])
            if cls is not None:
                return spec(cls).build(value[1:])
        raise RemoteProtocolError(f"{where}: unexpected value")

    return check_union


def _tuple_checker(args: tuple[Any, ...]) -> Checker:
    if len(args) == 2 and args[1] is Ellipsis:
        item = _checker(args[0])

        def check_list(value: Any, where: str) -> Any:
            if not isinstance(value, list) or len(value) > MAX_ITEMS:
                raise RemoteProtocolError(f"{where}: expected a list of at most {MAX_ITEMS}")
            return tuple([item(v, where) for v in value])

        return check_list
    items = [_checker(a) for a in args]

    def check_tuple(value: Any, where: str) -> Any:
        if not isinstance(value, list) or len(value) > MAX_ITEMS:
            raise RemoteProtocolError(f"{where}: expected a list of at most {MAX_ITEMS}")
        if len(value) != len(items):
            raise RemoteProtocolError(f"{where}: expected {len(items)} items")
        return tuple([c(v, where) for v, c in zip(value, items, strict=True)])

    return check_tuple


def _record_checker(cls: type) -> Checker:
    type_id = getattr(cls, "TYPE", -1)

    def check_record(value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise RemoteProtocolError(f"{where}: expected a record")
        if type_id >= 0:
            if not value or type(value[0]) is not int or value[0] != type_id:
                raise RemoteProtocolError(f"{where}: expected a {cls.__name__}")
            value = value[1:]
        return spec(cls).build(value)

    return check_record


def _check_bool(value: Any, where: str) -> Any:
    if not isinstance(value, bool):
        raise RemoteProtocolError(f"{where}: expected a boolean")
    return value


def _check_int(value: Any, where: str) -> Any:
    if type(value) is not int or not INT_MIN <= value <= INT_MAX:
        raise RemoteProtocolError(f"{where}: expected an integer")
    return value


def _check_str(value: Any, where: str) -> Any:
    if type(value) is not str or len(value) > MAX_STR:
        raise RemoteProtocolError(f"{where}: expected text of at most {MAX_STR}")
    return value


def _check_bytes(value: Any, where: str) -> Any:
    if type(value) is not bytes or len(value) > MAX_DATA:
        raise RemoteProtocolError(f"{where}: expected bytes of at most {MAX_DATA}")
    return value


_SCALARS: dict[Any, Checker] = {
    bool: _check_bool,
    int: _check_int,
    str: _check_str,
    bytes: _check_bytes,
}
