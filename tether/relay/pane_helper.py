"""Runs inside a replica's jail for a moment as a new pane's command: hands the
pane's tty to the relay, then becomes ``sleep``.

The relay (``tether.relay.replica_direct``) feeds a replica tmux from its own
process, so it needs each replica pane's tty, and only a process inside the
jail can open it. Rather than a Python worker that lives as long as the
session (5-6 MiB each), the replica's own tmux starts this script as a pane's
command and it execs away within milliseconds:

``python -I -S pane_helper.py SOCKET pane``
    sends its stdin (the new pane's tty) to SOCKET, then execs ``sleep``.

SOCKET is the relay's listening socket in the session directory, bound before
the jail started. The script imports nothing of tether's (``-I -S``: no site,
no environment) so it starts in a few milliseconds; what it sends is checked
by the relay, which trusts nothing from the jail. (Mates' tmux clients are no
processes: the relay speaks tmux's client protocol itself, ``tmux_imsg``.)
"""

import os
import sys
from _socket import AF_UNIX, SCM_RIGHTS, SOCK_STREAM, SOL_SOCKET, socket

SLEEP = ("sleep", "2147483647")


def _send(path: str, tag: bytes, fd: int) -> None:
    s = socket(AF_UNIX, SOCK_STREAM)
    try:
        s.connect(path)
        s.sendmsg([tag], [(SOL_SOCKET, SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
    finally:
        s.close()


def main() -> None:
    path, kind = sys.argv[1], sys.argv[2]
    if kind == "pane":
        _send(path, b"p", 0)
        os.execvp(SLEEP[0], list(SLEEP))
    sys.exit(2)


if __name__ == "__main__":
    main()
