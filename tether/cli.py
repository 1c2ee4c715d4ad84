"""The ``tether`` command line: tmate's interface, a relay, and the netsim harness.

Imports are deferred to the branch that needs them: ``tether -S SOCK display``
and friends must start as fast as tmux itself.
"""

from __future__ import annotations

import os
import sys

USAGE = """\
usage: tether [-S SOCKET] [-f CONFIG] [-a AUTHORIZED_KEYS] [-v] [COMMAND [ARGS...]]

Share a tmux session instantly. With no command, start a shared session and
attach to it; the connection strings appear in the status area and in
`tether show-messages`.

commands:
  new-session [-d] [TMUX ARGS]   start a shared session (-d: stay detached)
  wait tether-ready              block until the session is shared
  display -p '#{tether_ssh}'     print the read-write ssh connection string
  display -p '#{tether_ssh_ro}'  print the read-only ssh connection string
  display -p '#{tether_join}'    print the read-write `tether join` command (and _ro)
  display -p '#{tether_web}'     print the read-write browser link, if the relay
                                 serves browsers (and _ro)
  show-messages                  tether's log, including connection strings
  list-mates                     the mates connected now: id, ssh/join/web,
                                 rw/ro, address, key fingerprint
  kick-mate ID                   disconnect a mate (its link still works for
                                 others; give a new session to shut it out)
  relay [OPTIONS]                run a relay (see `tether relay --help`)
  netsim ...                     the network-fault harness (`tether netsim --help`)
  join TOKEN@HOST[:PORT]         join a session as a roaming mate (`tether join --help`)
  ANY TMUX COMMAND               passed through to the session's tmux

options:
  -S SOCKET   the tmux server socket (default: a new one for plain `tether`,
              or the session you are in)
  -f CONFIG   tether config file (default ~/.tether.conf, tmux syntax)
  -a AUTHORIZED_KEYS
              only mates with a key in this file may join (default: anyone
              with the connection string)
  -v          verbose agent log
  -V          print the version
  -h, --help  this help

Config (~/.tether.conf):
  set -g tether-server-host relay.example.org
  set -g tether-server-port 2222
  set -g tether-server-ed25519-fingerprint SHA256:...
  set -g tether-identity ~/.ssh/id_ed25519
With no tether-server-host, tether runs an embedded relay on 127.0.0.1.
"""


def _die(msg: str, code: int = 2) -> int:
    print(f"tether: {msg}", file=sys.stderr)
    return code


def _leave(status: int) -> int:
    """Exit now, without the interpreter's teardown (~2.5 ms, a tenth of a warm
    start): nothing here needs it, no atexit handler and no buffered output but
    stdout's and stderr's, flushed first."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return status  # the normal way, which reports it
    os._exit(status)


def _current_socket() -> str | None:
    env = os.environ.get("TMUX")
    return env.split(",")[0] if env else None


def _new_socket() -> str:
    base = os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tether-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return os.path.join(base, f"s{os.getpid()}-{os.urandom(3).hex()}")


def _translate(arg: str) -> str:
    """tmate's format names to the user options the agent publishes."""
    return arg.replace("#{tether_", "#{@tether_")


class _Options:
    """The global options before the command (``-S``, ``-f``, ``-a``, ``-v``)."""

    def __init__(self) -> None:
        self.socket: str | None = None
        self.conf: str | None = None
        self.authorized: str | None = None
        self.verbose = False


def _parse_options(args: list[str], opts: _Options) -> int | None:
    """Take the global options off the front of ``args`` into ``opts``; an exit
    status if the command line is done (help, version, an error)."""
    while args and args[0].startswith("-") and args[0] != "-":
        opt = args.pop(0)
        if opt in ("-h", "--help"):
            print(USAGE, end="")
            return 0
        if opt in ("-V", "--version"):
            from tether import __version__

            print(f"tether {__version__}")
            return 0
        if opt == "-v":
            opts.verbose = True
        elif opt.startswith("-S"):
            opts.socket = opt[2:] or (args.pop(0) if args else None)
            if not opts.socket:
                return _die("-S needs a socket path")
        elif opt.startswith("-a"):
            opts.authorized = opt[2:] or (args.pop(0) if args else None)
            if not opts.authorized:
                return _die("-a needs an authorized_keys file")
        elif opt.startswith("-f"):
            opts.conf = opt[2:] or (args.pop(0) if args else None)
            if not opts.conf:
                return _die("-f needs a config file")
        elif opt == "--":
            break
        else:
            return _die(f"unknown option {opt}; see `tether --help`")
    return None


def _run_program(command: str | None, args: list[str]) -> int | None:
    """Run a command that is a program of its own (relay, netsim, the agent...);
    None if ``command`` is not one."""
    if command == "relay":
        from tether.relay.cli import main as relay_main

        return relay_main(args)
    if command == "netsim":
        try:
            from tether.netsim.cli import main as netsim_main
        except ImportError as exc:
            return _die(f"netsim is not available: {exc}")
        return netsim_main(args)
    if command == "join":
        from tether.client.join_cli import main as join_main

        return join_main(args)
    if command == "_zygote":
        from tether.zygote import main as zygote_main

        return zygote_main(args)
    if command == "_agent":
        # asyncio imports ssl (~16 ms) for TLS the agent never uses; aioquic
        # imports it again once the session is shared, off the start-up path
        had_ssl = "ssl" in sys.modules
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
        try:
            from tether.agent import main as agent_main
        finally:
            if not had_ssl:
                del sys.modules["ssl"]
        return agent_main(args)
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = _Options()
    done = _parse_options(args, opts)
    if done is not None:
        return done
    command = args[0] if args else None
    status = _run_program(command, args[1:])
    if status is not None:
        return status

    if command is None or command in ("new-session", "new"):
        detached = "-d" in args[1:]
        rest = [a for a in args[1:] if a != "-d"]
        sock = opts.socket or _new_socket()
        status = new_session(sock, rest, detached, opts.conf, opts.verbose, opts.authorized)
        return _leave(status) if argv is None else status

    sock = opts.socket or _current_socket()
    if sock is None:
        return _die("no session given: use -S SOCKET (or run this inside a tether session)")
    if command in ("show-messages", "showmsgs"):
        return show_messages(sock)
    if command in ("wait", "wait-for") and args[1:] == ["tether-ready"]:
        status = wait_ready(sock)
        return _leave(status) if argv is None else status
    if command == "list-mates":
        return list_mates(sock) if len(args) == 1 else _die("usage: tether list-mates")
    if command == "kick-mate":
        if len(args) != 2 or not args[1].isdigit():
            return _die("usage: tether kick-mate ID (the ID column of tether list-mates)")
        return kick_mate(sock, int(args[1]))
    os.execvp("tmux", ["tmux", "-S", sock, *[_translate(a) for a in args]])
    return 0  # not reached


def new_session(
    sock: str,
    tmux_args: list[str],
    detached: bool,
    conf: str | None,
    verbose: bool,
    authorized: str | None = None,
) -> int:
    from tether.client.paths import state_path

    state = state_path()
    env = dict(os.environ)
    env.pop("TMUX", None)
    log_path = os.path.join(state, f"agent-{os.path.basename(sock)}.log")
    agent_args = ["--socket", sock, "--session", "-"]
    if conf:
        agent_args += ["--config", conf]
    if verbose:
        agent_args.append("-v")
    if authorized:
        agent_args += ["--authorized-keys", os.path.abspath(os.path.expanduser(authorized))]
    # warm: the user's zygote forks an agent that starts tmux itself and says how
    # it went; this process imports nothing more (``tether.zygote``)
    from tether.zygote import request_session

    with open(log_path, "ab") as logf:
        answer = request_session(state, [*agent_args, "--", *tmux_args], env, logf.fileno())
    if answer is None:
        session, problem = _cold_start(sock, tmux_args, conf, authorized, state, env,
                                       agent_args, log_path)
    else:
        session, problem = answer
    if session is None:
        return _die(problem)
    if detached:
        return 0
    os.execvpe("tmux", ["tmux", "-S", sock, "attach", "-t", session], env)
    return 0  # not reached


def _cold_start(
    sock: str,
    tmux_args: list[str],
    conf: str | None,
    authorized: str | None,
    state: str,
    env: dict[str, str],
    agent_args: list[str],
    log_path: str,
) -> tuple[str | None, str]:
    """No zygote: start the agent first, as a new process (its imports, ~0.3 s,
    then overlap everything else here); it reads the session id from its stdin,
    and leaves quietly if none comes."""
    import subprocess

    from tether import command
    from tether.client.newsession import start_tmux

    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as logf:
            subprocess.Popen(
                command("_agent", *agent_args),
                stdin=read_end,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                env=env,
                close_fds=True,
            )
    finally:
        os.close(read_end)
    agent_in = os.fdopen(write_end, "wb")
    session, problem = start_tmux(sock, tmux_args, conf, authorized, state, env)
    if session is None:
        agent_in.close()
        return None, problem
    try:
        agent_in.write(f"{session}\n".encode())
        agent_in.close()
    except BrokenPipeError:
        return None, f"the tether agent did not start; see {log_path}"
    return session, ""


def _tmux_output(argv: list[str]) -> tuple[int, str]:
    """Run tmux, return its exit status and output (its stderr dropped). Not
    ``subprocess``: its imports (locale, re, selectors, threading) cost the CLI
    ~7 ms, as much as the interpreter's own start."""
    r, w = os.pipe()
    try:
        pid = os.posix_spawnp("tmux", ["tmux", *argv], os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ])
    except OSError as exc:
        os.close(r)
        os.close(w)
        return 127, str(exc)
    os.close(w)
    out = bytearray()
    with open(r, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            out += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


SHARED = "#{@tether_ssh}|#{@tether_error}"
"""The agent's ``@tether_ssh`` (shared) and ``@tether_error`` (the relay refused)."""
NOT_YET = "#{&&:#{==:#{@tether_ssh},},#{==:#{@tether_error},}}"


def wait_ready(sock: str) -> int:
    """`wait tether-ready`: tmux's wait-for, which the agent also signals when the
    relay refuses the session, so a script fails with the reason instead of
    waiting for ever; and at once when the session is already shared.

    One tmux client: it waits only while neither option is set (a signal that
    came first leaves the channel woken, so none is missed), then prints both."""
    code, out = _tmux_output(["-S", sock, "if", "-F", NOT_YET, "wait-for tether-ready", ";",
                              "display", "-p", SHARED])
    if code != 0:
        return _die("the session's tmux server is gone", 1)
    ssh, _, error = out.rstrip("\n").partition("|")
    if ssh:
        return 0
    return _die(f"the session is not shared: {error}", 1)


def show_messages(sock: str) -> int:
    """tether's own log for this session (connection strings, relay state)."""
    from tether.client.paths import messages_path

    path = messages_path(sock)
    if not path.exists():
        return _die(f"no tether messages for {sock} (is it a tether session?)")
    sys.stdout.write(path.read_text())
    return 0


def _ask_agent(sock: str, req: dict[str, object]) -> dict[str, object] | None:
    """The agent's answer (``client.agentctl``); None, said on stderr, if no agent is."""
    from tether.client.agentctl import AgentUnreachable, request

    try:
        return request(sock, req)
    except (AgentUnreachable, OSError) as exc:
        _die(f"no tether agent answers for {sock} (is it a tether session?): {exc}", 1)
        return None


def list_mates(sock: str) -> int:
    """`list-mates`: who is connected now, as the relay last told the agent."""
    answer = _ask_agent(sock, {"op": "mates"})
    if answer is None:
        return 1
    mates = answer.get("mates")
    rows = [m for m in mates if isinstance(m, dict)] if isinstance(mates, list) else []
    if not answer.get("connected"):
        print("(not connected to the relay now: the list is as it last said)")
    if not rows:
        print("no mates connected")
        return 0
    table = [("ID", "KIND", "ACCESS", "ADDRESS", "FINGERPRINT")]
    table += [(str(m.get("id")), str(m.get("kind")), "ro" if m.get("readonly") else "rw",
               str(m.get("address") or "-"), str(m.get("fingerprint") or "-")) for m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    if answer.get("more"):
        print(f"(and more: the relay said {answer['more']})")
    return 0


def kick_mate(sock: str, mate: int) -> int:
    """`kick-mate ID`: the agent asks the relay to disconnect that mate."""
    answer = _ask_agent(sock, {"op": "kick", "mate": mate})
    if answer is None:
        return 1
    if not answer.get("ok"):
        return _die(str(answer.get("error") or "the agent refused"), 1)
    print(answer.get("text") or f"mate {mate} disconnected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
