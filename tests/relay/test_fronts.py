"""The relay's SSH front processes at start: a front that cannot serve stops the
relay's start with a clear error instead of a relay that answers no one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tether.relay.config import RelayConfig
from tether.relay.fronts import FrontPool
from tether.testing.procs import descendants


async def _never(*args: Any) -> None:
    raise AssertionError("nothing connects in this test")


def _pool(keys: Path) -> FrontPool:
    config = RelayConfig(keys_dir=keys, bind="127.0.0.1", port=0)
    return FrontPool(config, 2, _never, _never, _never, lambda token: None)


async def test_fronts_that_cannot_load_the_host_keys_stop_the_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "ssh_host_ed25519_key").write_text("not a key\n")
    pool = _pool(keys)
    with pytest.raises(RuntimeError, match="did not start"):
        await pool.start()
    import os

    assert not [p for p in descendants(os.getpid()) if "tether.relay.front" in p.cmdline]


async def test_fronts_serve_and_end_with_the_pool(tmp_path: Path) -> None:
    import asyncio
    import os
    import socket

    pool = _pool(tmp_path / "keys")
    from tether.transport import ssh

    ssh.load_or_create_host_keys(tmp_path / "keys")  # the relay makes them first
    port = await pool.start()
    try:
        assert len([f for f in pool.fronts if f.alive]) == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"SSH-2.0-")
        assert sum(len(f.conns) for f in pool.fronts) == 1
        writer.close()
        for _ in range(500):  # the front tells the relay when it is gone
            if not any(f.conns for f in pool.fronts):
                break
            await asyncio.sleep(0.01)
        assert not any(f.conns for f in pool.fronts)
        assert pool.admission.count == 0
    finally:
        await pool.close()
    assert not [p for p in descendants(os.getpid()) if "tether.relay.front" in p.cmdline]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
