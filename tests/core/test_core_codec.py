"""The wire schema and the bounded frame codec.

Valid messages of every type round-trip; anything else a peer can send is
refused with ``RemoteProtocolError`` and nothing else, bounds are enforced
before buffering, and the stream decoder does not care how bytes are chunked.
"""

from __future__ import annotations

import inspect
import os
import struct
import types
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.core import codec, records
from tether.core import messages as m
from tether.core.errors import LocalProtocolError, RemoteProtocolError
from tether.core.limits import MAX_DATA, MAX_FRAME, MAX_ITEMS, MAX_STR

FAST = settings(max_examples=30, deadline=None, derandomize=True)
FUZZ_EXAMPLES = int(os.environ.get("TETHER_FUZZ_EXAMPLES", "120"))
"""A modest budget in the suite; ``TETHER_FUZZ_EXAMPLES=20000 ./test tests/core`` for a
long run (random, not derandomized, when raised)."""
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=FUZZ_EXAMPLES <= 120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MESSAGE_TYPES: list[type[m.Message]] = sorted(m._REGISTRY.values(), key=lambda c: c.TYPE)


# --- strategies: valid instances, built from each record's annotations ----------


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Valid values for one annotation of messages.py (small, within every bound)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(
            [st.none() if a is type(None) else strategy_for(a) for a in typing.get_args(tp)]
        )
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
        return st.tuples(*(strategy_for(a) for a in args))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(
            st.integers(-5, 300),
            st.integers(m.INT_MIN, m.INT_MAX),
            st.sampled_from([m.INT_MIN, m.INT_MAX, 2**32, -(2**31)]),
        )
    if tp is str:
        return st.text(max_size=24)
    if tp is bytes:
        return st.binary(max_size=48)
    if records.is_record(tp):
        return instances(tp)
    raise TypeError(f"no strategy for {tp!r}")


def instances(cls: type) -> st.SearchStrategy[Any]:
    hints = records.field_types(cls)
    fields = {f: strategy_for(hints[f]) for f in records.fields(cls)}
    return st.builds(cls, **fields)


any_message: st.SearchStrategy[m.Message] = st.one_of([instances(c) for c in MESSAGE_TYPES])


def reachable_records(cls: type, seen: set[type]) -> set[type]:
    """Every record reachable from ``cls`` through its annotations."""
    if cls in seen:
        return seen
    seen.add(cls)

    def walk(tp: Any) -> None:
        if records.is_record(tp):
            reachable_records(tp, seen)  # type: ignore[arg-type]
        for a in typing.get_args(tp):
            walk(a)

    for hint in records.field_types(cls).values():
        walk(hint)
    return seen


# --- helpers ----------------------------------------------------------------------


def wire(msg: m.Message) -> Any:
    """The msgpack object a message travels as."""
    return codec.unpack_body(msg.encode()[4:])


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def decode_or_reject(data: bytes) -> list[m.Message] | None:
    """Decode a byte stream; None if refused. Any other exception fails the test."""
    try:
        return m.MessageDecoder().feed(data)
    except RemoteProtocolError:
        return None


def obj_or_reject(obj: Any) -> m.Message | None:
    try:
        msg = m.decode(obj)
    except RemoteProtocolError:
        return None
    assert isinstance(msg, m.Message)
    return msg


def same_wire(got: Any, canonical: Any) -> bool:
    """Equal with exact types (1 != 1.0 != True); a sender may omit trailing defaults
    (the decoder itself checks that only fields with a default are missing)."""
    if type(got) is not type(canonical):
        return False
    if isinstance(got, list):
        canonical = canonical[: len(got)]
        return len(got) == len(canonical) and all(
            same_wire(a, b) for a, b in zip(got, canonical, strict=True)
        )
    return bool(got == canonical)


def assert_canonical_if_accepted(obj: Any) -> None:
    """A decoder that accepts ``obj`` must have read it exactly as the schema says."""
    msg = obj_or_reject(obj)
    if msg is not None:
        assert same_wire(obj, wire(msg)), (obj, msg)


# --- schema coverage --------------------------------------------------------------


def test_every_record_in_messages_is_reachable_from_a_message() -> None:
    defined = {
        obj
        for _, obj in inspect.getmembers(m, inspect.isclass)
        if records.is_record(obj) and obj.__module__ == m.__name__ and obj is not m.Message
    }
    reachable: set[type] = set()
    for cls in MESSAGE_TYPES:
        reachable_records(cls, reachable)
    assert defined == reachable
    assert {m.Window, m.PaneImage, m.Binding, m.Snapshot, m.Event} <= reachable


def test_type_ids_are_pinned() -> None:
    """Type ids are the wire format: renumbering breaks every deployed peer."""
    ids = {c.__name__: c.TYPE for c in MESSAGE_TYPES}
    assert ids == {
        "Hello": 1, "Welcome": 2, "Error": 3,
        "Output": 10, "Structure": 11, "PaneReset": 12, "Status": 13, "Bindings": 14,
        "Snapshot": 15, "Frame": 16, "Event": 20, "Ack": 21,
        "Input": 30, "InputAck": 31, "Resize": 32, "Ping": 33, "Pong": 34, "Notice": 35,
        "End": 36, "Resync": 37, "InputRepeat": 38, "EventRepeat": 39,
        "MateAttach": 40, "HostPresence": 41, "Mates": 42, "Kick": 43,
        "Join": 50, "Joined": 51,
    }  # fmt: skip


def test_golden_encodings() -> None:
    assert m.Ack(7).encode() == bytes.fromhex("00000003") + bytes([0x92, 21, 7])
    assert m.Output(3, b"hi").encode() == bytes.fromhex("00000007 93 0a 03 c4 02 6869")
    ev = m.Event(1, m.Output(0, b""))
    assert wire(ev) == [20, 1, [10, 0, b""]]
    snap = m.Snapshot(m.Structure((), 0), m.Status((("a", "b"),)), m.Bindings("C-b", ()))
    assert wire(snap) == [15, [11, [], 0], [13, [["a", "b"]]], [14, "C-b", []]]
    win = m.Window(1, 0, "w", "b25d,80x24,0,0,0", 0)
    assert wire(m.Structure((win,), 1)) == [11, [[1, 0, "w", "b25d,80x24,0,0,0", 0]], 1]


# --- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_round_trip_every_message_type(cls: type[m.Message], data: st.DataObject) -> None:
    msg = data.draw(instances(cls))
    frames = msg.encode()
    assert struct.unpack(">I", frames[:4])[0] == len(frames) - 4
    assert m.MessageDecoder().feed(frames) == [msg]
    assert m.decode(wire(msg)) == msg


event_bodies = st.one_of([instances(c) for c in typing.get_args(m.EventBody)])


@FAST
@given(body=event_bodies, seq=st.integers(0, m.INT_MAX))
def test_round_trip_every_event_body(body: m.EventBody, seq: int) -> None:
    ev = m.Event(seq, body)
    (back,) = m.MessageDecoder().feed(ev.encode())
    assert back == ev
    assert type(back.body) is type(body)  # type: ignore[attr-defined]


def test_round_trip_at_the_bounds() -> None:
    big = [
        m.Output(1, b"\xff" * MAX_DATA),
        m.Notice("x" * MAX_STR),
        m.Status(tuple((str(i), "v") for i in range(MAX_ITEMS))),
        m.Ping(m.INT_MAX),
        m.Pong(m.INT_MIN),
        m.Input(m.INT_MAX, 1, 2, b"k", m.Binding("root", "C-c")),
    ]
    for msg in big:
        assert m.MessageDecoder().feed(msg.encode()) == [msg]


def test_omitted_trailing_defaults_are_accepted_required_fields_are_not() -> None:
    assert m.decode([1, 1, "tether"]) == m.Hello(1, "tether")
    welcome = [2, 1, "s", b"k", "rw", "ro", "ssh-rw", "ssh-ro", None]
    assert m.decode(welcome) == m.Welcome(1, "s", b"k", "rw", "ro", "ssh-rw", "ssh-ro", None)
    with pytest.raises(RemoteProtocolError):
        m.decode(welcome[:-1])  # next_seq may be None but must be there
    assert m.decode([30, 1, 2, 3, b"x"]) == m.Input(1, 2, 3, b"x", None)
    with pytest.raises(RemoteProtocolError):
        m.decode([1, 1])
    with pytest.raises(RemoteProtocolError):
        m.decode([10, 1])


# --- malformed input: RemoteProtocolError, and only that ----------------------------


def test_not_a_message() -> None:
    for obj in [None, 1, "x", b"x", {}, [], ["1"], [1.0, 1, "c"], [None], [{}], [99], [-1]]:
        with pytest.raises(RemoteProtocolError):
            m.decode(obj)


def test_bool_is_not_an_int() -> None:
    with pytest.raises(RemoteProtocolError):
        m.decode([21, True])
    with pytest.raises(RemoteProtocolError):
        m.decode([True, 1, "client"])  # True == 1 == Hello.TYPE
    with pytest.raises(RemoteProtocolError):
        m.decode([32, False, 0])
    assert m.decode([41, True, ""]) == m.HostPresence(True, "")
    with pytest.raises(RemoteProtocolError):
        m.decode([41, 1, ""])  # and an int is not a bool


def test_float_is_not_an_int() -> None:
    with pytest.raises(RemoteProtocolError):
        m.decode([21, 1.0])
    with pytest.raises(RemoteProtocolError):
        m.decode([21.0, 1])
    snap = wire(m.Snapshot(m.Structure((), 0), m.Status(()), m.Bindings("C-b", ())))
    for i in (1, 2, 3):
        bad = [*snap]
        bad[i] = [float(bad[i][0]), *bad[i][1:]]
        with pytest.raises(RemoteProtocolError):
            m.decode(bad)
    with pytest.raises(RemoteProtocolError):
        m.decode([20, 1, [10.0, 1, b"x"]])
    with pytest.raises(RemoteProtocolError):
        m.decode([20, 1, [True, 1, "x"]])


def test_ints_outside_int64() -> None:
    assert m.MessageDecoder().feed(frame([21, 2**63 - 1])) == [m.Ack(2**63 - 1)]
    assert m.MessageDecoder().feed(frame([21, -(2**63)])) == [m.Ack(-(2**63))]
    for n in (2**63, 2**64 - 1):
        with pytest.raises(RemoteProtocolError):
            m.MessageDecoder().feed(frame([21, n]))
    for n in (2**63, -(2**63) - 1, 2**100):  # bypassing msgpack's own range
        with pytest.raises(RemoteProtocolError):
            m.decode([21, n])


def test_wrong_field_types() -> None:
    cases: list[Any] = [
        [10, 1, "text, not bytes"],
        [35, b"bytes, not text"],
        [3, None],
        [11, {}, 0],
        [11, [[1, 0, "w", "layout"]], 0],  # Window missing a field
        [11, [[1, 0, "w", "layout", 0, 9]], 0],  # Window with an extra field
        [11, [[1, 0, "w", 5, 0]], 0],
        [13, [["a"]]],
        [13, [["a", "b", "c"]]],
        [13, [["a", 1]]],
        [13, "not a list"],
        [14, "C-b", [["root"]]],
        [12, [1, "not bytes"]],
        [12, [10, 1, b"a message where a record belongs"]],
        [20, 1, [1, 1, "Hello is no event body"]],
        [20, 1, [21, 1]],
        [20, 1, []],
        [20, 1, None],
        [20, 1, [10, 1]],
        [30, 1, 2, 3, b"x", ["table"]],
        [30, 1, 2, 3, b"x", None, "extra"],
        [2, 1, "s", b"x", "rw", "ro", "sshrw", "sshro", "nope"],
        [15, [11, [], 0], [13, []]],
        [15, [13, []], [11, [], 0], [14, "", []]],
    ]
    for obj in cases:
        with pytest.raises(RemoteProtocolError):
            m.decode(obj)
        assert decode_or_reject(frame(obj)) is None


def test_extra_and_missing_fields_for_every_type() -> None:
    for cls in MESSAGE_TYPES:
        spec = records.fields(cls)
        required = [f for f in spec if f not in records.defaults(cls)]
        filler = [0] * len(spec)
        with pytest.raises(RemoteProtocolError):
            m.decode([cls.TYPE, *filler, 0])  # one too many
        if required:
            with pytest.raises(RemoteProtocolError):
                m.decode([cls.TYPE, *filler[: len(required) - 1]])


def test_over_long_fields_are_rejected() -> None:
    too_long: list[Any] = [
        [35, "x" * (MAX_STR + 1)],
        [35, "é" * (MAX_STR // 2 + 1)],  # the bound is on encoded bytes too
        [10, 1, b"x" * (MAX_DATA + 1)],
        [13, [["k", "v"]] * (MAX_ITEMS + 1)],
        [14, "C-b", [["root", "x"]] * (MAX_ITEMS + 1)],
    ]
    for obj in too_long:
        assert decode_or_reject(frame(obj)) is None
    # and the schema checks hold on their own, whatever produced the object
    for obj in (
        [35, "x" * (MAX_STR + 1)],
        [10, 1, b"x" * (MAX_DATA + 1)],
        [13, [["k", "v"]] * (MAX_ITEMS + 1)],
    ):
        with pytest.raises(RemoteProtocolError):
            m.decode(obj)


def test_maps_and_extension_types_are_rejected() -> None:
    assert decode_or_reject(frame({"type": 21, "seq": 1})) is None
    assert decode_or_reject(frame([21, {"seq": 1}])) is None
    ext = msgpack.packb([21, msgpack.ExtType(5, b"abcd")])
    assert decode_or_reject(struct.pack(">I", len(ext)) + ext) is None
    intkey = msgpack.packb([35, {1: 2}])
    assert decode_or_reject(struct.pack(">I", len(intkey)) + intkey) is None


def test_empty_frame_and_trailing_garbage_in_a_frame() -> None:
    assert decode_or_reject(b"\x00\x00\x00\x00") is None
    body = msgpack.packb([21, 1]) + b"\xc0"
    assert decode_or_reject(struct.pack(">I", len(body)) + body) is None


def test_deep_nesting_is_rejected_cleanly() -> None:
    body = b"\x91" * 5000 + msgpack.packb([21, 1])  # [[[...[21, 1]...]]]
    assert decode_or_reject(struct.pack(">I", len(body)) + body) is None
    obj: Any = [21, 1]
    for _ in range(5000):
        obj = [obj]
    with pytest.raises(RemoteProtocolError):
        m.decode([20, 1, obj])


# --- frame bounds -------------------------------------------------------------------


def test_oversized_frame_header_is_rejected_before_the_body() -> None:
    dec = codec.FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        dec.feed(struct.pack(">I", 100 * 1024 * 1024))
    assert dec.buffered <= 4
    dec = codec.FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        dec.feed(struct.pack(">I", MAX_FRAME + 1))
    dec = codec.FrameDecoder()
    assert dec.feed(struct.pack(">I", MAX_FRAME)) == []  # allowed: waits for the body
    assert dec.buffered == 4


def test_oversized_header_after_a_good_frame_in_the_same_chunk() -> None:
    dec = codec.FrameDecoder()
    with pytest.raises(RemoteProtocolError):
        dec.feed(m.Ack(1).encode() + struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 64)


def test_custom_frame_bound() -> None:
    dec = codec.FrameDecoder(max_frame=16)
    assert dec.feed(m.Ack(1).encode()) == [[21, 1]]
    with pytest.raises(RemoteProtocolError):
        dec.feed(m.Notice("x" * 40).encode()[:4])


def test_encoding_a_frame_over_the_bound_is_a_local_error() -> None:
    huge = m.Status(tuple(("k" * 8, "v" * 60_000) for _ in range(80)))  # ~4.8 MB
    with pytest.raises(LocalProtocolError):
        huge.encode()
    with pytest.raises(LocalProtocolError):
        codec.pack(b"x" * (MAX_FRAME + 1))


# --- fuzzing ------------------------------------------------------------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(-3, 50)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
objects = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=25,
)
type_ids = st.sampled_from([c.TYPE for c in MESSAGE_TYPES] + [0, 4, 16, 99, -1, 2**40])
message_shaped = st.builds(lambda t, rest: [t, *rest], type_ids, st.lists(objects, max_size=10))


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    decode_or_reject(data)
    decode_or_reject(struct.pack(">I", len(data)) + data)


@FUZZ
@given(obj=objects | message_shaped)
def test_random_objects_are_decoded_canonically_or_rejected(obj: Any) -> None:
    assert_canonical_if_accepted(obj)
    decode_or_reject(frame(obj))


def mutate(obj: Any, data: st.DataObject) -> Any:
    """One random structural change somewhere inside a (copied) wire object."""
    if not isinstance(obj, list) or data.draw(st.integers(0, 3)) == 0:
        return data.draw(objects | type_ids)
    obj = list(obj)
    op = data.draw(st.sampled_from(["descend", "delete", "insert", "replace", "retype"]))
    if not obj or op == "insert":
        obj.insert(data.draw(st.integers(0, len(obj))), data.draw(objects))
        return obj
    i = data.draw(st.integers(0, len(obj) - 1))
    if op == "descend":
        obj[i] = mutate(obj[i], data)
    elif op == "delete":
        del obj[i]
    elif op == "replace":
        obj[i] = data.draw(objects)
    else:  # the same value as another type, or a plainly wrong one
        choices: list[Any] = [True, False, 1.0, -1, 2**63, "1", b"1", None, [], {"a": 1}]
        if type(obj[i]) is int:
            choices += [float(obj[i]), obj[i] != 0]
        obj[i] = data.draw(st.sampled_from(choices))
    return obj


@FUZZ
@given(msg=any_message, data=st.data())
def test_mutated_valid_messages_are_decoded_canonically_or_rejected(
    msg: m.Message, data: st.DataObject
) -> None:
    good = wire(msg)
    bad = mutate(good, data)
    assert_canonical_if_accepted(bad)
    got = decode_or_reject(frame(bad))
    if got is not None:
        assert len(got) == 1 and same_wire(bad, wire(got[0]))


def leaf_paths(obj: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    if isinstance(obj, list):
        return [p for i, x in enumerate(obj) for p in leaf_paths(x, (*path, i))]
    return [path]


def replaced(obj: Any, path: tuple[int, ...], value: Any) -> Any:
    if not path:
        return value
    out = list(obj)
    out[path[0]] = replaced(out[path[0]], path[1:], value)
    return out


def same_value_other_type(value: Any) -> list[Any]:
    if type(value) is int:
        return [float(value), *([bool(value)] if value in (0, 1) else []), str(value)]
    if type(value) is bool:
        return [int(value)]
    if type(value) is str:
        return [value.encode()]
    if type(value) is bytes:
        return [value.decode("latin-1")]
    return []


@settings(max_examples=60, deadline=None, derandomize=True)
@given(msg=any_message)
def test_same_value_as_another_type_is_rejected_at_every_position(msg: m.Message) -> None:
    """Every int (type ids included), bool, str and bytes in a valid message, swapped
    for an equal-looking value of another type, makes the whole message invalid."""
    good = wire(msg)
    for path in leaf_paths(good):
        for other in same_value_other_type(_get(good, path)):
            bad = replaced(good, path, other)
            assert obj_or_reject(bad) is None, (msg, path, other)


def _get(obj: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        obj = obj[i]
    return obj


@FUZZ
@given(msg=any_message, data=st.data())
def test_mutated_valid_frames_are_decoded_or_rejected(msg: m.Message, data: st.DataObject) -> None:
    raw = bytearray(msg.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    got = decode_or_reject(bytes(raw))
    for out in got or []:
        assert m.decode(wire(out)) == out
    cut = data.draw(st.integers(0, len(raw) - 1))
    dec = m.MessageDecoder()
    assert dec.feed(msg.encode()[:cut]) == []  # a truncated frame is just incomplete


@FUZZ
@given(msg=any_message, type_id=st.integers(-1, 60))
def test_changed_type_ids_are_decoded_canonically_or_rejected(msg: m.Message, type_id: int) -> None:
    bad = [type_id, *wire(msg)[1:]]
    assert_canonical_if_accepted(bad)
    if type_id != msg.TYPE and type_id not in m._REGISTRY:
        assert obj_or_reject(bad) is None


# --- chunking -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(msgs=st.lists(any_message, min_size=1, max_size=8), data=st.data())
def test_any_chunking_yields_the_same_messages(msgs: list[m.Message], data: st.DataObject) -> None:
    stream = b"".join(x.encode() for x in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    dec = m.MessageDecoder()
    out: list[m.Message] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += dec.feed(stream[last:cut])
        last = cut
    assert out == msgs
    assert dec._frames.buffered == 0


def test_byte_at_a_time() -> None:
    msgs = [m.Ack(1), m.Output(2, b"\x00\xff" * 100), m.Hello(1, "t", "s", b"k")]
    dec = m.MessageDecoder()
    out: list[m.Message] = []
    for b in b"".join(x.encode() for x in msgs):
        out += dec.feed(bytes([b]))
    assert out == msgs


def test_compressed_frames_round_trip_and_bombs_are_refused() -> None:
    from tether.core.codec import compress, decompress

    screen = b"\x1b[31m" + b"x" * 20000 + b"\x1b[0m"
    assert decompress(compress(screen)) == screen
    bomb = compress(b"\0" * (MAX_DATA + 1))
    assert len(bomb) < 8000
    with pytest.raises(RemoteProtocolError, match="inflates past"):
        decompress(bomb)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decompress(compress(screen)[:-10])
    with pytest.raises(RemoteProtocolError, match="bad compressed data"):
        decompress(b"not zlib at all")


def test_field_types_agree_with_typing() -> None:
    """The schema reads its annotations without ``typing``; it must read them alike."""
    names = {**vars(m), "ClassVar": typing.ClassVar, "Any": typing.Any}
    for cls in reachable_records_of_all():
        hints = typing.get_type_hints(cls, globalns=names)
        assert records.field_types(cls) == {f: hints[f] for f in records.fields(cls)}, cls


def reachable_records_of_all() -> set[type]:
    seen: set[type] = set()
    for cls in MESSAGE_TYPES:
        reachable_records(cls, seen)
    return seen
