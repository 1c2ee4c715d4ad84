"""A terminal type's capabilities as a tmux client sends them to its server.

A tmux 3.x server does not read terminfo for its clients: each client looks
its ``TERM`` up and sends the capabilities tmux knows as ``name=value``
strings (``MSG_IDENTIFY_TERMINFO``, tmux's ``tty_term_read_list``). A client
spoken by the relay (``tmux_imsg``) must do the same. Python's ``curses``
cannot: it sets a terminal up once per process, so a second ``TERM`` would get
the first one's answers; this calls the system's terminfo library directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading

from tether.core.errors import TetherError

_KEYS = ["kDC", "kDN", "kEND", "kHOM", "kIC", "kLFT", "kNXT", "kPRV", "kRIT", "kUP"]
STRINGS = (
    "acsc bel Bidi blink bold civis clear Clmg Cmg cnorm Cr csr Cs cub1 cub cud1 cud cuf1 "
    "cuf cup cuu1 cuu cvvis dch1 dch dim dl1 dl Dseks Dsfcs Dsbp Dsmg E3 ech ed el1 el enacs "
    "Enbp Eneks Enfcs Enmg fsl home hpa ich1 ich il1 il indn invis kcbt kcub1 kcud1 kcuf1 "
    "kcuu1 kdch1 kend khome kich1 kind kmous knp kpp kri Ms ol op Rect rev rin ri rmacs "
    "rmcup rmkx setab setaf setal setrgbb setrgbf Setulc Se sgr0 sitm smacs smcup smkx Smol "
    "smso Smulx smul smxx Ss Swd Sync tsl vpa"
).split() + [f"kf{n}" for n in range(1, 64)] + [
    f"{k}{m}" for k in _KEYS for m in ("", "3", "4", "5", "6", "7")
]
"""tmux 3.3a's string capabilities (``tty_term_codes`` in ``tty-term.c``); a
server ignores names it does not know."""
NUMBERS = ("colors", "U8")
FLAGS = ("am", "AX", "bce", "RGB", "Tc", "XT")


class TerminfoError(TetherError):
    """No terminfo entry, or no terminfo library, for a terminal type."""


_lock = threading.Lock()


@functools.cache
def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("tinfo") or ctypes.util.find_library("ncursesw")
    if name is None:
        raise TerminfoError("no terminfo library (libtinfo) here")
    lib = ctypes.CDLL(name)
    lib.setupterm.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.setupterm.restype = ctypes.c_int
    lib.tigetstr.argtypes = [ctypes.c_char_p]
    lib.tigetstr.restype = ctypes.c_void_p
    lib.tigetnum.argtypes = [ctypes.c_char_p]
    lib.tigetnum.restype = ctypes.c_int
    lib.tigetflag.argtypes = [ctypes.c_char_p]
    lib.tigetflag.restype = ctypes.c_int
    lib.set_curterm.argtypes = [ctypes.c_void_p]
    lib.set_curterm.restype = ctypes.c_void_p
    lib.del_curterm.argtypes = [ctypes.c_void_p]
    lib.del_curterm.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=64)
def capabilities(term: str) -> tuple[bytes, ...]:
    """``name=value`` for each capability of ``term`` tmux knows, as tmux's
    client sends them; ``TerminfoError`` for a type with no entry."""
    if not term or len(term) > 64 or "/" in term or not term.isprintable():
        raise TerminfoError(f"not a terminal type: {term!r}")
    lib = _library()
    caps: list[bytes] = []
    with _lock:  # the library's current terminal is process-wide
        err = ctypes.c_int(0)
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            if lib.setupterm(term.encode(), fd, ctypes.byref(err)) != 0:
                raise TerminfoError(f"no terminfo entry for {term!r}")
        finally:
            os.close(fd)
        try:
            for name in STRINGS:
                p = lib.tigetstr(name.encode())
                if p is None or p in (0, ctypes.c_void_p(-1).value):
                    continue
                caps.append(name.encode() + b"=" + ctypes.string_at(p))
            for name in NUMBERS:
                n = lib.tigetnum(name.encode())
                if n >= 0:
                    caps.append(b"%s=%d" % (name.encode(), n))
            for name in FLAGS:
                n = lib.tigetflag(name.encode())
                if n >= 0:
                    caps.append(b"%s=%d" % (name.encode(), 1 if n else 0))
        finally:
            lib.del_curterm(lib.set_curterm(None))
    return tuple(caps)
