"""A browser mate in real headless Chromium (Debian's package, driven by Playwright):
the page from the host's `#{tether_web}` link shows the host's screen, runs what is
typed into it, follows the window's size, and comes back by itself after its
connection drops; the read-only link shows the screen and types nothing.

The page's terminal text is read from its DOM (xterm.js's rows), as a screen
reader or find-in-page would read it. Every wait has a deadline."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.env import tether
from tether.testing.proxy import TcpProxy

from .helpers import Host, Mate, RelayProcess, free_port, wait_for

CHROMIUM = "/usr/bin/chromium"

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - the README's test command installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="needs playwright (pip install playwright)"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM) or shutil.which("tmux") is None,
                       reason="needs Debian's chromium package and tmux"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:  # type: ignore[misc]
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[RelayProcess, Host, TcpProxy]]:
    relay = RelayProcess(tmp_path / "relay", None, "--web-port", str(free_port()))
    host = Host(tmp_path / "host", relay.conf())
    port = int(relay.web_base.rsplit(":", 1)[1])
    proxy = TcpProxy(port)  # the browser's way in, which the test can cut
    yield relay, host, proxy
    proxy.cut()
    proxy.close()
    host.close()
    relay.close()


def via(proxy: TcpProxy, link: str) -> str:
    """The host's printed link, through the proxy."""
    return f"http://127.0.0.1:{proxy.port}/t/{link.rsplit('/t/', 1)[1]}"


def screen(page: Page) -> str:
    return page.inner_text(".xterm-rows")


def wait_text(page: Page, text: str, timeout: float = 20) -> None:
    try:
        wait_for(lambda: text in screen(page), timeout, f"{text!r} in the browser")
    except Exception as exc:
        raise AssertionError(f"{exc}\npage shows:\n{screen(page)}") from None


def test_a_browser_sees_types_resizes_and_comes_back(
    browser: Browser, shared: tuple[RelayProcess, Host, TcpProxy]
) -> None:
    _, host, proxy = shared
    host.type("echo hello-$((6*7))")
    t0 = time.monotonic()
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        page.goto(via(proxy, host.display("#{tether_web}")))
        wait_text(page, "hello-42")
        print(f"\nbrowser: link opened -> host's screen shown in {time.monotonic() - t0:.2f}s")
        assert page.title().startswith("tether")
        # typed in the page, run on the host, its output back in the page
        page.click(".xterm")
        page.keyboard.type("echo typed-$((7*6))")
        page.keyboard.press("Enter")
        wait_for(lambda: "typed-42" in host.screen().split("echo typed")[-1], 20,
                 "the browser's command to run on the host")
        wait_text(page, "typed-42")
        # the host's window follows the only read-write mate's size, as it changes
        before = int(host.read_format("#{window_width}"))
        page.set_viewport_size({"width": 600, "height": 500})
        wait_for(lambda: int(host.read_format("#{window_width}")) < before, 20,
                 "the host's window to follow the browser's smaller size")
        # the connection drops: the page says so, comes back by itself, current again
        assert proxy.cut() >= 1
        wait_for(lambda: "reconnecting" in page.inner_text("#state"), 10,
                 "the page to show it is reconnecting")
        wait_for(lambda: page.inner_text("#state") == "connected" and proxy.connections > 0,
                 20, "the page to reconnect")
        host.type("echo after-$((6*7))")
        wait_text(page, "after-42")
    finally:
        page.close()


def test_a_read_only_browser_shows_the_screen_and_types_nothing(
    browser: Browser, shared: tuple[RelayProcess, Host, TcpProxy]
) -> None:
    _, host, proxy = shared
    host.type("echo shared-$((6*7))")
    ro = browser.new_page(viewport={"width": 900, "height": 600})
    rw = browser.new_page(viewport={"width": 900, "height": 600})
    try:
        ro.goto(via(proxy, host.display("#{tether_web_ro}")))
        wait_text(ro, "shared-42")
        assert ro.inner_text("#mode") == "read-only"
        ro.click(".xterm")
        ro.keyboard.type("echo ro-typed")
        ro.keyboard.press("Enter")
        # a marker typed afterwards by a read-write mate shows the ro keys went nowhere
        rw.goto(via(proxy, host.display("#{tether_web}")))
        wait_text(rw, "shared-42")
        rw.click(".xterm")
        rw.keyboard.type("echo marker-$((6*7))")
        rw.keyboard.press("Enter")
        wait_for(lambda: "marker-42" in host.screen().split("echo marker")[-1], 20,
                 "the read-write mate's command on the host")
        wait_text(ro, "marker-42")
        assert "ro-typed" not in host.screen()
    finally:
        ro.close()
        rw.close()


def test_the_page_names_the_session_and_shows_who_else_is_connected(
    browser: Browser, shared: tuple[RelayProcess, Host, TcpProxy], tmp_path: Path
) -> None:
    _, host, proxy = shared
    host.type("echo together-$((6*7))")
    session = host.display("#{tether_session}")
    assert session
    rw = browser.new_page(viewport={"width": 900, "height": 600})
    ro = browser.new_page(viewport={"width": 900, "height": 600})
    viewer = Mate(tmp_path, host.ssh_ro, name="viewer")
    try:
        rw.goto(via(proxy, host.display("#{tether_web}")))
        ro.goto(via(proxy, host.display("#{tether_web_ro}")))
        wait_text(rw, "together-42")
        wait_text(ro, "together-42")
        viewer.wait_text("together-42")
        assert rw.title() == f"tether: {session}"
        assert ro.title() == f"tether: {session} (read-only)"
        assert rw.inner_text("#name") == f"tether: {session}"
        # the bar counts the others by kind and access; a click lists them
        wait_for(lambda: rw.inner_text("#mates") == "2 others: 1 ssh ro, 1 web ro", 20,
                 "the read-write page to count an ssh and a web viewer")
        wait_for(lambda: ro.inner_text("#mates") == "2 others: 1 ssh ro, 1 web rw", 20,
                 "the read-only page to count an ssh viewer and a web typist")
        rw.click("#mates")
        rows = rw.inner_text("#mate-list").splitlines()
        assert len(rows) == 3
        assert any(r.startswith("you · web · read-write · 127.0.0.1:") for r in rows), rows
        assert any(r.startswith("mate ") and " · ssh · read-only · 127.0.0.1:" in r
                   for r in rows), rows
        # a read-only link may be posted widely: its viewers see no addresses
        ro.click("#mates")
        ro_rows = ro.inner_text("#mate-list").splitlines()
        assert len(ro_rows) == 3 and "you · web · read-only" in ro_rows
        assert not any("127.0.0.1" in r for r in ro_rows), ro_rows
        # someone leaves: every page's list follows
        viewer.close()
        wait_for(lambda: rw.inner_text("#mates") == "1 other: 1 web ro", 20,
                 "the page to see the ssh viewer leave")
        wait_for(lambda: len(rw.inner_text("#mate-list").splitlines()) == 2, 10,
                 "the list to lose the ssh viewer")
    finally:
        viewer.close()
        rw.close()
        ro.close()


def test_a_kicked_browser_says_so_and_does_not_reconnect(
    browser: Browser, shared: tuple[RelayProcess, Host, TcpProxy]
) -> None:
    _, host, proxy = shared
    host.type("echo kick-me-$((6*7))")
    page = browser.new_page(viewport={"width": 900, "height": 600})
    try:
        page.goto(via(proxy, host.display("#{tether_web_ro}")))
        wait_text(page, "kick-me-42")
        ids = wait_for(lambda: [ln.split()[0] for ln in tether(
            host.env, "-S", host.sock, "list-mates").splitlines()[1:] if " web " in ln],
            20, "the browser to be listed")
        tether(host.env, "-S", host.sock, "kick-mate", ids[0])
        wait_for(lambda: "the host disconnected you" in page.inner_text("#state"), 20,
                 "the page to say the host disconnected it")
        before = proxy.connections
        time.sleep(2)  # the page's first retry would come within a second
        assert proxy.connections <= before
        assert "disconnected" in page.inner_text("#state")
        assert "reconnecting" not in page.inner_text("#state")
    finally:
        page.close()
