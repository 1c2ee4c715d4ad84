"""Runs inside a replica's jail for a moment: hands a pty to the relay, then
becomes the program that stays (``sleep`` for a pane, ``tmux attach`` for a mate).

The relay (``tether.relay.replica_direct``) feeds a replica tmux from its own
process, so it needs each replica pane's tty and each mate's pty master, and
only a process inside the jail can open them. Rather than a Python worker that
lives as long as the session (5-6 MiB each), the replica's own tmux starts
this script as a pane's command and it execs away within milliseconds:

``python -I -S pane_helper.py SOCKET pane``
    sends its stdin (the new pane's tty) to SOCKET, then execs ``sleep``.
``python -I -S pane_helper.py SOCKET mate ID COLS ROWS TERM [ro]``
    opens a pty of COLS x ROWS, sends its master to SOCKET tagged with the
    mate's ID, and forks a child that execs ``tmux attach`` (read-only with
    ``ro``) on its slave; the pane's own process exits, so its window closes.

SOCKET is the relay's listening socket in the session directory, bound before
the jail started. The script imports nothing of tether's (``-I -S``: no site,
no environment) so it starts in a few milliseconds; what it sends is checked
by the relay, which trusts nothing from the jail.
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


def _mate(path: str, args: list[str]) -> None:
    import fcntl
    import struct
    import termios

    mate, cols, rows, term = int(args[0]), int(args[1]), int(args[2]), args[3]
    readonly = args[4:] == ["ro"]
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    _send(path, b"m%d" % mate, master)
    os.close(master)
    # a pane's process leads its session already; a child may start one whose
    # controlling terminal is the new pty. The pane's process exits once it has
    # (so its window closes), and tmux's SIGHUP to the pane's group misses it.
    done_r, done_w = os.pipe()
    if os.fork():
        os.close(done_w)
        os.read(done_r, 1)
        os._exit(0)
    os.close(done_r)
    os.login_tty(slave)
    os.close(done_w)
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    env.update(TERM=term, LANG="C.UTF-8", LC_ALL="C.UTF-8")
    server = os.path.join(os.path.dirname(path), "tmux.sock")
    argv = ["tmux", "-u", "-S", server, "attach", "-t", "tether"]
    os.execvpe("tmux", [*argv, "-r"] if readonly else argv, env)


def main() -> None:
    path, kind = sys.argv[1], sys.argv[2]
    if kind == "pane":
        _send(path, b"p", 0)
        os.execvp(SLEEP[0], list(SLEEP))
    elif kind == "mate":
        _mate(path, sys.argv[3:])
    sys.exit(2)


if __name__ == "__main__":
    main()
