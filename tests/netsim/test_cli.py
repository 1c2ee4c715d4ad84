"""The `tether netsim` command line, scenario files and topology files."""

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tether.netsim import Topology, nsutil
from tether.netsim.cli import build_parser, main
from tether.netsim.scenario import Scenario

REPO = Path(__file__).resolve().parents[2]
needs_netsim = pytest.mark.skipif(
    nsutil.unavailable_reason() is not None, reason=str(nsutil.unavailable_reason())
)


def test_help_documents_every_flag() -> None:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = subs.choices["run"].format_help()
    for flag in (
        "--topology",
        "--delay",
        "--jitter",
        "--loss",
        "--burst-loss",
        "--reorder",
        "--duplicate",
        "--rate",
        "--seed",
        "--scenario",
        "--pcap",
        "--host",
        "--link",
        "--direction",
        "--bg",
        "--timeout",
    ):
        assert flag in text, flag
    assert "cleanup" in build_parser().format_help()


def test_scenario_parse_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "s.toml"
    good.write_text(
        textwrap.dedent("""
        seed = 7
        [[at]]
        t = 5
        move = {host = "a", link = "lte"}
        [[at]]
        t = "1s"
        blackout = {link = "a", seconds = 3}
        set = {link = "a.wifi", delay = "100ms", loss = "20%"}
    """)
    )
    sc = Scenario.load(good)
    assert sc.seed == 7
    assert [(a.t, a.kind) for a in sc.actions] == [(1.0, "blackout"), (1.0, "set"), (5.0, "move")]
    sc.check(Topology({"a": ["wifi", "lte"]}))
    with pytest.raises(ValueError, match="unknown host"):
        sc.check(Topology({"b": ["eth0"]}))
    for bad, msg in [
        ('[[at]]\nt = 1\nteleport = {host = "a"}', "unknown action"),
        ('[[at]]\nt = 1\nmove = {host = "a"}', "missing"),
        ('[[at]]\nt = 1\nset = {link = "a", delay = "soon"}', "not a duration"),
        ('[[at]]\nmove = {host = "a", link = "b"}', "needs t"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Scenario.parse(__import__("tomllib").loads(bad))


def test_topology_file(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(
        '[hosts]\nphone = ["wifi", "lte"]\nserver = ["eth0"]\n'
        '[links."phone.wifi"]\ndelay = "20ms"\n'
    )
    topo = Topology.load(f)
    assert topo.hosts == {"phone": ["wifi", "lte"], "server": ["eth0"]}
    f.write_text('[hosts]\nphone = ["wifi"]\n[links."phone.lte"]\ndelay = "20ms"\n')
    with pytest.raises(ValueError, match="unknown link"):
        Topology.load(f)


@needs_netsim
def test_run_exit_status_seed_and_counters(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--seed", "9", "--delay", "5ms", "--", "sh", "-c", "exit 3"]) == 3
    err = capfd.readouterr().err
    assert "seed 9" in err and "a.eth0" in err and "rx_packets" in err


@needs_netsim
def test_run_scenario_moves_host_and_suspends(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    topo = tmp_path / "topo.toml"
    topo.write_text('[hosts]\na = ["wifi", "lte"]\nb = ["eth0"]\n')
    scen = tmp_path / "scen.toml"
    scen.write_text(
        textwrap.dedent("""
        [[at]]
        t = 0.2
        move = {host = "a", link = "lte"}
        set = {link = "b", delay = "10ms"}
        [[at]]
        t = 0.3
        suspend = {seconds = 0.2}
    """)
    )
    rc = main(
        [
            "run",
            "--topology",
            str(topo),
            "--scenario",
            str(scen),
            "--pcap",
            str(tmp_path / "pcap"),
            "--timeout",
            "20",
            "--",
            "sh",
            "-c",
            "sleep 1; ip -4 -o addr show dev lte",
        ]
    )
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "198.18.1.2/24" in out  # a's lte subnet is the second link
    assert "move host=a frm=wifi to=lte" in err
    assert "suspend pid=" in err and "resume pid=" in err
    assert sorted(p.name for p in (tmp_path / "pcap").iterdir()) == [
        "a.lte.pcap",
        "a.wifi.pcap",
        "b.eth0.pcap",
    ]


@needs_netsim
def test_run_rejects_bad_input(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--loss", "150%", "--", "true"]) == 2
    assert "probability" in capfd.readouterr().err
    assert main(["run", "--host", "nope", "--", "true"]) == 2


@needs_netsim
def test_shell_runs_shell_in_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHELL", "/bin/false")
    assert main(["shell", "-q", "b"]) == 1
    monkeypatch.setenv("SHELL", "/bin/true")
    assert main(["shell", "-q", "--delay", "1ms"]) == 0


def test_fixture_skips_without_root(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        'import os\nos.geteuid = lambda: 1000\npytest_plugins = ["tether.netsim.pytest_plugin"]\n'
    )
    (tmp_path / "test_x.py").write_text("def test_x(netsim):\n    raise AssertionError\n")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout and "needs root" in r.stdout


def test_skip_reason_names_missing_tun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nsutil.os, "geteuid", lambda: 0)
    real = os.path.exists
    monkeypatch.setattr(nsutil.os.path, "exists", lambda p: p != "/dev/net/tun" and real(p))
    assert "/dev/net/tun" in str(nsutil.unavailable_reason())
