"""Slotted records, made without ``dataclasses``.

``dataclasses`` generates and compiles half a dozen methods for every class
and imports ``inspect`` to do it: about 30 ms of every tether process's start
for the wire schema alone, and 2 MiB more in each replica worker, which needs
no other use of it. A record here gets one generated ``__init__`` and shares
equality, hashing and ``repr`` with every other record.

    class Point(Record):
        x: int
        y: int = 0

Records are frozen unless declared ``class Name(Record, frozen=False)``.
Fields are the class's own annotations, in order, minus ``ClassVar`` ones; a
field with a value in the class body has that value as its default (defaults
must be immutable: they are shared, as in a function signature).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

_set = object.__setattr__


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen: cannot assign to {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")


def _make_init(name: str, fields: tuple[str, ...], defaults: dict[str, Any]) -> Any:
    # one small compile per class; the generated __init__ is as fast as a
    # hand-written one, which matters: every message decoded builds a record
    params = ["self"]
    env: dict[str, Any] = {"_set": _set}
    seen_default = False
    for f in fields:
        if f in defaults:
            env[f"_d_{f}"] = defaults[f]
            params.append(f"{f}=_d_{f}")
            seen_default = True
        elif seen_default:
            raise TypeError(f"{name}: field {f!r} without a default follows one with a default")
        else:
            params.append(f)
    body = "".join(f"\n    _set(self, {f!r}, {f})" for f in fields) or "\n    pass"
    src = f"def __init__({', '.join(params)}):{body}"
    exec(src, env)  # names come from class annotations, never from input
    init = env["__init__"]
    init.__qualname__ = f"{name}.__init__"
    return init


class RecordMeta(type):
    """Turns a class's annotations into slots and an ``__init__``."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], frozen: bool = True
    ) -> RecordMeta:
        if "__slots__" in ns:  # a base that declares its own (Record, Message)
            return super().__new__(mcls, name, bases, ns)
        inherited: tuple[str, ...] = ()
        defaults: dict[str, Any] = {}
        for base in reversed(bases):
            inherited += tuple(f for f in getattr(base, "_fields", ()) if f not in inherited)
            defaults.update(getattr(base, "_defaults", {}))
        own: list[str] = []
        for field, annotation in ns.get("__annotations__", {}).items():
            if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
                continue
            if field not in inherited:
                own.append(field)
            if field in ns:
                defaults[field] = ns.pop(field)
        fields = inherited + tuple(own)
        ns["__slots__"] = tuple(own)
        ns["_fields"] = fields
        ns["_defaults"] = defaults
        ns["__match_args__"] = fields
        ns["__init__"] = _make_init(name, fields, defaults)
        if frozen:
            ns["__setattr__"] = _frozen_setattr
            ns["__delattr__"] = _frozen_delattr
        else:
            ns["__hash__"] = None  # mutable: equal records may change, so no hash
        return super().__new__(mcls, name, bases, ns)


class Record(metaclass=RecordMeta):
    """Base of every record: equality and hashing by value, a readable repr."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, f) for f in self._fields])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self._values())


def is_record(obj: object) -> bool:
    """A record class or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return issubclass(cls, Record)


def fields(cls: type) -> tuple[str, ...]:
    """A record's field names, in order."""
    return cls._fields  # type: ignore[attr-defined, no-any-return]


def defaults(cls: type) -> dict[str, Any]:
    """A record's defaults by field name (the fields that may be left out)."""
    return dict(cls._defaults)  # type: ignore[attr-defined]


def field_types(cls: type) -> dict[str, Any]:
    """A record's field types, evaluated (annotations are strings in the source).

    Like ``typing.get_type_hints``, without importing ``typing`` (0.5 MiB in
    every worker); the strings are tether's own source, never input."""
    types_: dict[str, Any] = {}
    for name in cls._fields:  # type: ignore[attr-defined]
        for klass in cls.__mro__:
            ann = vars(klass).get("__annotations__", {}).get(name)
            if ann is not None:
                module = vars(sys.modules[klass.__module__])
                types_[name] = eval(ann, module) if isinstance(ann, str) else ann
                break
    return types_
