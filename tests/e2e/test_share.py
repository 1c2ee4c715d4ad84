"""Sharing a session: a host behind `tether`, mates joining with plain OpenSSH."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from .helpers import Host, Mate, RelayProcess, strip_lines, tmux, wait_for


def join(mates: list[Mate], tmp_path: Path, ssh: str, size: tuple[int, int] = (100, 30),
         name: str = "mate") -> Mate:
    m = Mate(tmp_path, ssh, size, name)
    mates.append(m)
    wait_for(lambda: "0:" in m.status_line(), 15, f"{name} to attach")
    return m


def test_mate_sees_screen_colours_utf8_and_next_typing(host: Host, mates: list[Mate],
                                                      tmp_path: Path) -> None:
    host.type(r"printf '\033[31mred\033[0m \033[38;5;208mamber\033[0m "
              r"\033[38;2;10;200;30mtrue\033[0m héllo wörld ✓\n'")
    wait_for(lambda: "héllo wörld ✓" in host.screen().split("printf")[-1], 10, "host output")
    mate = join(mates, tmp_path, host.ssh_rw)
    screen = mate.wait_text("héllo wörld ✓")
    assert "red amber true héllo wörld ✓" in screen
    coloured = mate.screen(escapes=True)
    assert "\x1b[31mred" in coloured
    assert "38;5;208mamber" in coloured
    assert "38;2;10;200;30mtrue" in coloured
    host.type("echo next-$((40+2))")
    mate.wait_text("next-42")


def test_mate_types_a_command_that_runs_on_the_host(host: Host, mates: list[Mate],
                                                    tmp_path: Path) -> None:
    mate = join(mates, tmp_path, host.ssh_rw)
    out = tmp_path / "from-mate.txt"
    mate.type(f"echo typed-by-mate-$((6*7)) > {out}")
    wait_for(lambda: out.exists() and out.read_text() == "typed-by-mate-42\n", 10,
             "the mate's command to run on the host")
    mate.type("echo ctrl-c-test; sleep 100")
    wait_for(lambda: "ctrl-c-test" in host.screen(), 10, "sleep started")
    mate.keys("C-c")
    mate.type("echo after-interrupt")
    wait_for(lambda: "after-interrupt" in host.screen().split("ctrl-c-test")[-1], 10,
             "Ctrl-C from the mate to interrupt the host's sleep")


def test_readonly_mate_cannot_type_or_resize(host: Host, mates: list[Mate],
                                             tmp_path: Path) -> None:
    rw = join(mates, tmp_path, host.ssh_rw, (100, 30), "rw")
    wait_for(lambda: host.display("#{window_width}x#{window_height}") == "100x29", 10,
             "window to follow the read-write mate")
    ro = join(mates, tmp_path, host.ssh_ro, (60, 15), "ro")
    planted = tmp_path / "ro-was-here"
    ro.type(f"touch {planted}")
    ro.keys("C-c", "C-d")
    ro.resize(40, 10)
    # a read-write marker typed afterwards proves the input path was flushed
    rw.type("echo rw-marker-$((2+3))")
    wait_for(lambda: "rw-marker-5" in host.screen(), 10, "the read-write mate's marker")
    assert not planted.exists()
    assert "touch" not in host.screen()
    assert host.display("#{window_width}x#{window_height}") == "100x29"
    assert ro.alive()
    ro.wait_text("rw-marker-5")


def test_layout_replicates_and_mate_prefix_keys_act_on_the_host(host: Host, mates: list[Mate],
                                                              tmp_path: Path) -> None:
    mate = join(mates, tmp_path, host.ssh_rw, (100, 30))
    host.tmux("split-window", "-h")
    host.tmux("new-window", "-n", "second")
    host.tmux("select-window", "-t", ":0")
    width = int(host.tmux("display", "-p", "-t", ":0.0", "#{pane_width}").strip())
    mate.wait_text("1:second")
    def border() -> bool:
        return all(len(ln) > width and ln[width] == "│" for ln in mate.lines()[:5])

    wait_for(border, 10, "the split pane border on the mate's screen")
    panes_before = len(host.tmux("list-panes").splitlines())
    mate.keys("C-b", "%")
    wait_for(lambda: len(host.tmux("list-panes").splitlines()) == panes_before + 1, 10,
             "the mate's C-b % to split the host's window")
    mate.keys("C-b", "c")
    wait_for(lambda: len(host.tmux("list-windows").splitlines()) == 3, 10,
             "the mate's C-b c to create a host window")
    mate.wait_text("2:")


def test_window_follows_smallest_read_write_mate(host: Host, mates: list[Mate],
                                                 tmp_path: Path) -> None:
    a = join(mates, tmp_path, host.ssh_rw, (120, 40), "a")
    join(mates, tmp_path, host.ssh_rw, (90, 25), "b")
    join(mates, tmp_path, host.ssh_ro, (50, 12), "ro")
    wait_for(lambda: host.display("#{window_width}x#{window_height}") == "90x24", 10,
             "window sized to the smallest read-write mate")
    a.resize(80, 20)
    wait_for(lambda: host.display("#{window_width}x#{window_height}") == "80x19", 10,
             "window to follow the mate that shrank")


@pytest.mark.parametrize("attached", [False, True], ids=["detached", "host-terminal"])
def test_burst_of_20mb_converges(host: Host, mates: list[Mate], tmp_path: Path,
                                 attached: bool, request: pytest.FixtureRequest) -> None:
    """A flooding pane goes as frames, whether or not the host's own terminal reads it too."""
    if attached:
        term = str(tmp_path / "host-terminal.sock")
        subprocess.run(["tmux", "-S", term, "-f", "/dev/null", "new-session", "-d", "-x", "100",
                        "-y", "31", f"env -u TMUX tmux -S {host.sock} attach; sleep 60"],
                       check=True)
        request.addfinalizer(lambda: tmux(term, "kill-server", check=False))
        try:
            wait_for(lambda: "0" in host.tmux("list-clients", "-F",
                                              "#{client_control_mode}").split(),
                     10, "the host's terminal to attach")
        except AssertionError:
            raise AssertionError(tmux(term, "capture-pane", "-p", check=False)) from None
    mate = join(mates, tmp_path, host.ssh_rw, (100, 30))
    wait_for(lambda: host.display("#{window_width}x#{window_height}") == "100x29", 10,
             "window size")
    host.type("seq 1 2800000 | awk '{print $1, \"abcdefgh\"}'; echo burst-done")
    wait_for(lambda: "burst-done" in host.screen().split("echo burst-done")[-1], 120,
             "the burst to finish on the host")

    def same() -> bool:
        ours = strip_lines(host.screen())[:29]
        theirs = strip_lines(mate.screen())[:29]
        return ours == theirs

    wait_for(same, 60, "the mate's pane to equal the host's")
    # the burst went as frames (screens), not as 20 MB of bytes, then back to bytes
    log = host.agent_log()
    assert "floods: sending its screen" in log
    wait_for(lambda: "calm again" in host.agent_log(), 10, "the pane to leave frame mode")
    host.type("echo after-burst")
    mate.wait_text("after-burst", 10)
    wait_for(same, 10, "the mate's pane to equal the host's after the burst")


def test_host_connection_drops_and_comes_back(tmp_path: Path, mates: list[Mate]) -> None:
    """Over the SSH channel (QUIC off): a proxy between host and relay cuts the link."""
    from .helpers import TcpProxy

    relay = RelayProcess(tmp_path / "relay", None, "--no-quic")
    proxy = TcpProxy(relay.port)
    try:
        h = Host(tmp_path / "host", relay.conf(port=proxy.port))
        try:
            rw_before, ro_before = h.ssh_rw, h.ssh_ro
            mate = join(mates, tmp_path, rw_before.replace(f"-p {proxy.port}", f"-p {relay.port}"))
            h.type("echo before-drop")
            mate.wait_text("before-drop")
            proxy.accepting = False
            assert proxy.cut() >= 2
            mate.wait_text("host is away", 20)
            h.type("echo while-away")
            proxy.accepting = True
            mate.wait_text("while-away", 30)
            assert mate.alive()
            assert (h.ssh_rw, h.ssh_ro) == (rw_before, ro_before)
            mate.type("echo mate-after-$((1+1))")
            wait_for(lambda: "mate-after-2" in h.screen(), 15, "mate input after reconnect")
            wait_for(lambda: strip_lines(h.screen())[:20] == strip_lines(mate.screen())[:20],
                     15, "screens to converge")
        finally:
            h.close()
    finally:
        proxy.close()
        relay.close()


def test_unknown_token_is_refused_after_a_delay(relay: RelayProcess, host: Host,
                                                tmp_path: Path, mates: list[Mate]) -> None:
    from tether.core.tokens import new_token

    bad = new_token()
    m = Mate(tmp_path, f"ssh -p {relay.port} {bad}@127.0.0.1", name="bad")
    mates.append(m)
    m.wait_text("Invalid or expired session token.")
    wait_for(lambda: not m.alive(), 10, "the connection to close")
    good = host.ssh_rw.split()[-1].split("@")[0]
    join(mates, tmp_path, host.ssh_rw, name="good")
    log = relay.log.read_text()
    assert bad not in log and good not in log, "a whole token reached the relay's log"
    assert bad[:4] + "..." in log


def test_fingerprint_mismatch_is_refused_with_both_fingerprints(relay: RelayProcess,
                                                                tmp_path: Path) -> None:
    wrong = "SHA256:" + "A" * 43
    conf = "\n".join(
        ln if "fingerprint" not in ln else f"set -g tether-server-ed25519-fingerprint {wrong}"
        for ln in relay.conf().splitlines() if "rsa" not in ln
    )
    h = Host(tmp_path / "host", conf, ready=False)
    try:
        text = wait_for(lambda: m if "mismatch" in (m := h.messages()) else "", 20,
                        "a fingerprint mismatch message")
        assert wrong in text and relay.fingerprint in text
    finally:
        h.close()


def test_mates_tmux_is_isolated_from_host_socket(host: Host) -> None:
    # the host's session is a private tmux server of its own socket
    assert tmux(host.sock, "display", "-p", "#{socket_path}").strip() == host.sock


def test_relay_restart_recreates_the_session_with_the_same_tokens(tmp_path: Path,
                                                                  mates: list[Mate]) -> None:
    relay = RelayProcess(tmp_path / "relay")
    port = relay.port
    h = Host(tmp_path / "host", relay.conf())
    try:
        rw, ro = h.ssh_rw, h.ssh_ro
        h.type("echo before-restart")
        # a mate types before the restart: the re-created session's input starts
        # over at 1, and the host must not take it for what it applied then
        early = join(mates, tmp_path, rw)
        for n in range(3):
            early.type(f"echo early-{n}-$((6*7))")
            wait_for(lambda n=n: f"early-{n}-42" in h.screen(), 15, "the early mate's keys")
        relay.close()
        seen = len(relay.log.read_text())
        relay = RelayProcess(tmp_path / "relay", port)  # same keys, same port
        wait_for(lambda: "attached to session" in relay.log.read_text()[seen:], 30,
                 "the host to come back to the restarted relay")
        h.type("echo after-restart")
        mate = join(mates, tmp_path, rw)  # the old token works on the new relay
        mate.wait_text("after-restart", 30)
        assert (h.ssh_rw, h.ssh_ro) == (rw, ro)
        mate.type("echo typed-after-restart")
        wait_for(lambda: "typed-after-restart" in h.screen().split("echo typed-after-restart")[-1],
                 15, "mate input on the re-created session")
    finally:
        h.close()
        relay.close()


def test_an_idle_host_on_quic_is_not_reported_away(host: Host, mates: list[Mate],
                                                   tmp_path: Path) -> None:
    """Over QUIC an idle host's pings are datagrams the link answers itself: the relay
    must count them, or mates read "the host is away" after 5 s of quiet and the
    host's next output waits behind the "back" message (tmux freezes the screen)."""
    from tether.relay.server import HOST_SILENCE

    mate = join(mates, tmp_path, host.ssh_rw)
    wait_for(lambda: "quic" in host.display("#{@tether_status}"), 20, "the host on QUIC")
    host.type("echo before-quiet")
    mate.wait_text("before-quiet")
    # nothing happens for longer than the relay's silence limit (a condition cannot
    # be waited on for "nothing happened": the window itself is the test). The
    # host's status line settles (its RTT figure) within a few seconds; twice the
    # limit leaves more than the limit of true silence
    deadline = time.monotonic() + 2 * HOST_SILENCE + 2
    while time.monotonic() < deadline:
        assert "away" not in mate.status_line(), mate.status_line()
        time.sleep(0.25)
    host.type("echo after-quiet")
    mate.wait_text("after-quiet", 5)
