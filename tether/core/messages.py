"""The wire schema: small frozen records, encoded as msgpack arrays.

Every message is ``[TYPE, field1, field2, ...]``. Decoding checks each field's
type and bound against the record's annotations, so a malformed frame raises
``RemoteProtocolError`` instead of reaching the application as a bad value.
The protocol version is exchanged first (``Hello``/``Welcome``); a peer that
speaks another major version is refused with a clear message.
"""

from __future__ import annotations

from . import codec
from .errors import RemoteProtocolError
from .limits import MAX_DATA
from .records import Record
from .schema import INT_MAX as INT_MAX
from .schema import INT_MIN as INT_MIN
from .schema import spec as _spec
from .schema import to_wire as _to_wire

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is 0.5 MiB and 4 ms in every replica worker
    from typing import Any, ClassVar

PROTOCOL_VERSION = 6
"""2: ``Frame`` events (a flooding pane sent as compressed screens).
3: ``Resync`` (the relay asks its host for a snapshot) and the join role
(``Join``/``Joined``: a mate's client fed the host's log).
4: ``InputRepeat`` (a join client's unacked keys again, as datagrams).
5: ``EventRepeat`` (the relay's unacked small events to a join client, as
datagrams), ``Mates`` and ``Kick`` (presence: who is connected, and the host
disconnecting one of them).
6: no new message; a host's QUIC link acks lazily at both ends while its path
loses nothing, each end expecting the other to (``transport.quic.LAZY_ACK_DELAY``)."""
JOIN_PROTOCOL_VERSIONS = (5, 6)
"""What a relay accepts in ``Join``: 6 changed only host links."""


class Message(Record):
    """Base of all wire records; ``message`` sets each one's ``TYPE``."""

    __slots__ = ()
    TYPE: ClassVar[int] = -1

    def encode(self) -> bytes:
        return codec.pack(_to_wire(self))


_REGISTRY: dict[int, type[Message]] = {}


def message(type_id: int) -> Any:
    """Class decorator: registers a message record under ``type_id``."""

    def wrap(cls: type) -> type:
        cls.TYPE = type_id
        if type_id in _REGISTRY:
            raise RuntimeError(f"duplicate message type {type_id}")
        _REGISTRY[type_id] = cls
        return cls

    return wrap


# --- nested records ------------------------------------------------------------


class Window(Record):
    """One host window. ``layout`` is tmux's layout string, whose leaves name the
    host pane ids in pane order and give every size."""

    id: int
    index: int
    name: str
    layout: str
    active_pane: int


class PaneImage(Record):
    """Bytes that, written into a fresh pane of the right size, redraw it."""

    pane: int
    data: bytes


class Binding(Record):
    """A host key binding a mate may trigger; the host runs its own command.

    ``confirm`` is the prompt of a ``confirm-before`` binding: the mate is asked
    on their own client first, as the host would be."""

    table: str
    key: str
    confirm: str = ""


# --- handshake ------------------------------------------------------------------


@message(1)
class Hello(Message):
    """First frame from a host. ``session``/``secret`` resume an existing session."""

    version: int
    client: str
    session: str | None = None
    secret: bytes | None = None
    rw_token: str | None = None
    """With ``ro_token``: lets a restarted relay re-create the session, same tokens."""
    ro_token: str | None = None
    mate_keys: tuple[str, ...] = ()
    """OpenSSH public keys mates must authenticate with (empty: anyone with a token)."""


@message(2)
class Welcome(Message):
    """The relay's answer: the session, its tokens and where replication resumes.

    ``next_seq`` is the first sequence number the relay still needs; ``None`` means
    it has nothing usable and wants a snapshot."""

    version: int
    session: str
    secret: bytes
    rw_token: str
    ro_token: str
    ssh_rw: str
    ssh_ro: str
    next_seq: int | None
    quic: tuple[str, ...] = ()
    """QUIC endpoints, ``host:port``; an empty host means the host used for SSH."""
    quic_fingerprint: str = ""
    """SHA256 fingerprint of the relay's QUIC certificate, the only one to accept."""
    join_rw: str = ""
    join_ro: str = ""
    """``tether join`` command lines, the relay's host key pinned in them."""
    web_rw: str = ""
    web_ro: str = ""
    """Browser links (``https://relay/t/TOKEN``); empty: the relay serves no browsers."""


@message(3)
class Error(Message):
    """Sent before closing a connection, so the peer can tell its user why."""

    message: str


# --- replicated host events (carried inside Event) ------------------------------


@message(10)
class Output(Message):
    pane: int
    data: bytes


@message(16)
class Frame(Message):
    """A pane's whole screen, zlib-compressed (``codec.compress``): sent instead of
    its bytes while it floods. Writing the inflated bytes into the pane redraws
    its screen; its scrollback is left as it was."""

    pane: int
    data: bytes


@message(11)
class Structure(Message):
    """The whole window/pane structure; idempotent, so it can be resent freely."""

    windows: tuple[Window, ...]
    active_window: int


@message(12)
class PaneReset(Message):
    """Replace one pane's contents (history, screen, cursor, modes)."""

    image: PaneImage


STATUS_OPTIONS = (
    "status",
    "status-position",
    "status-style",
    "status-left",
    "status-right",
    "status-left-length",
    "status-right-length",
    "status-left-style",
    "status-right-style",
    "status-justify",
    "window-status-format",
    "window-status-current-format",
    "window-status-separator",
    "window-status-style",
    "window-status-current-style",
    "pane-border-style",
    "pane-active-border-style",
    "message-style",
    "mode-style",
)
"""The host options that make its status line and borders; a replica takes no others."""


@message(13)
class Status(Message):
    """The host's status line as the host renders it: option name/value pairs."""

    options: tuple[tuple[str, str], ...]


@message(14)
class Bindings(Message):
    prefix: str
    keys: tuple[Binding, ...]


@message(15)
class Snapshot(Message):
    """Resets the receiver; supersedes every earlier event. Pane images follow as
    ``PaneReset`` events, so no single frame has to hold a whole session."""

    structure: Structure
    status: Status
    bindings: Bindings


@message(20)
class Event(Message):
    """One entry of the replication log."""

    seq: int
    body: Output | Frame | Structure | PaneReset | Status | Bindings | Snapshot


@message(21)
class Ack(Message):
    """The receiver has applied every event up to and including ``seq``."""

    seq: int


# --- mate input, relay -> host -----------------------------------------------


@message(30)
class Input(Message):
    """Mate input for one pane: raw ``keys``, or a host ``binding`` to run there."""

    stream: int
    seq: int
    pane: int
    keys: bytes
    binding: Binding | None = None


@message(31)
class InputAck(Message):
    stream: int
    seq: int


@message(38)
class InputRepeat(Message):
    """Join client to relay, as a QUIC datagram: its unacked input again, oldest
    first, with each new key (each also goes once on the ordered stream), so a
    lost packet costs the keys in it no round trip. Taken only in order: the
    relay applies an input here only when it is the next of its stream."""

    inputs: tuple[Input, ...]


@message(39)
class EventRepeat(Message):
    """Relay to join client, as a QUIC datagram: small log events the client has
    not acked yet, oldest first (each also goes on the ordered stream), so a lost
    packet costs the echo in it no round trip. Applied only in order: the client
    takes an event here only when it is the next it expects."""

    events: tuple[Event, ...]


class MateInfo(Record):
    """One connected mate, as the host and the web page list them."""

    id: int
    kind: str
    """``ssh``, ``join`` or ``web``."""
    readonly: bool
    address: str
    fingerprint: str = ""
    """SHA256 fingerprint of the key the mate authenticated with ("": none)."""


@message(42)
class Mates(Message):
    """Relay to host: every mate connected now (sent on each join and leave)."""

    mates: tuple[MateInfo, ...]


@message(43)
class Kick(Message):
    """Host to relay: disconnect this mate (its token stays valid for others)."""

    mate: int


@message(32)
class Resize(Message):
    """The smallest read-write mate terminal (0, 0: no read-write mate)."""

    cols: int
    rows: int


@message(33)
class Ping(Message):
    token: int


@message(34)
class Pong(Message):
    token: int


@message(35)
class Notice(Message):
    """A line for people to read (host away/back, warnings)."""

    text: str


@message(36)
class End(Message):
    """The host's session is over: the relay ends it and lets the mates go."""

    reason: str


@message(37)
class Resync(Message):
    """Relay to host: send a snapshot next (a join client needs a starting
    point the relay no longer holds)."""


# --- a join client (``tether join``) and the relay ---------------------------------


@message(50)
class Join(Message):
    """First frame from a join client. Over SSH the token is the login name;
    ``resume`` (the secret of an earlier ``Joined``) takes the same place again,
    over any link, from ``next_seq`` of the host's log (None: a snapshot)."""

    version: int
    client: str
    resume: bytes | None = None
    next_seq: int | None = None
    cols: int = 80
    rows: int = 24


@message(51)
class Joined(Message):
    """The relay's answer to ``Join``: who we are in the session, and how to come
    back (``resume``, over QUIC at ``quic`` with that certificate)."""

    version: int
    session: str
    mate: int
    readonly: bool
    resume: bytes
    quic: tuple[str, ...] = ()
    quic_fingerprint: str = ""


# --- relay <-> replica worker (never on the network) ----------------------------


@message(40)
class MateAttach(Message):
    """Ask the worker for a tmux client of the replica; its pty arrives by fd passing."""

    mate: int
    readonly: bool
    cols: int
    rows: int
    term: str


@message(41)
class HostPresence(Message):
    """Whether the host is connected, for the notice mates see."""

    present: bool
    text: str


EventBody = Output | Frame | Structure | PaneReset | Status | Bindings | Snapshot


def decode(obj: Any) -> Message:
    """Turn one decoded frame into a message, or raise ``RemoteProtocolError``."""
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
        raise RemoteProtocolError("frame is not a message")
    cls = _REGISTRY.get(obj[0])
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {obj[0]}")
    return _spec(cls).build(obj[1:])


class MessageDecoder:
    """Bytes in, messages out."""

    def __init__(self) -> None:
        self._frames = codec.FrameDecoder()

    def feed(self, data: bytes) -> list[Message]:
        return [decode(obj) for obj in self._frames.feed(data)]


def event_size(body: EventBody) -> int:
    """Rough byte weight of an event, for backlog bounds (no encoding needed)."""
    if isinstance(body, Output | Frame):
        return len(body.data) + 16
    if isinstance(body, PaneReset):
        return len(body.image.data) + 16
    return 256


__all__ = [
    "JOIN_PROTOCOL_VERSIONS",
    "MAX_DATA",
    "PROTOCOL_VERSION",
    "Ack",
    "Binding",
    "Bindings",
    "End",
    "Error",
    "Event",
    "EventBody",
    "EventRepeat",
    "Frame",
    "Hello",
    "HostPresence",
    "Input",
    "InputAck",
    "InputRepeat",
    "Join",
    "Joined",
    "Kick",
    "MateAttach",
    "MateInfo",
    "Mates",
    "Message",
    "MessageDecoder",
    "Notice",
    "Output",
    "PaneImage",
    "PaneReset",
    "Ping",
    "Pong",
    "Resize",
    "Resync",
    "Snapshot",
    "Status",
    "Structure",
    "Welcome",
    "Window",
    "decode",
    "event_size",
]
