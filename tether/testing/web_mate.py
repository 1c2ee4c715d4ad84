"""A browser mate's wire, on a terminal: ``python -m tether.testing.web_mate LINK``.

Speaks the web front's WebSocket protocol (``tether.transport.web``) as the page's
script does and bridges it to its own terminal: what the relay sends is written
to stdout, what is typed on stdin is sent, the terminal's size is the mate's. A
benchmark runs it on a pty it reads directly (``PtyProc``), as it runs ``ssh``,
to time a web mate's echo beside an ssh mate's; a browser's own rendering is
not part of it (the browser tests cover the page).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import termios
import tty

import aiohttp


async def main(link: str) -> int:
    base, _, token = link.partition("/t/")
    cols, rows = os.get_terminal_size(0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(base.replace("http", "ws", 1) + "/ws")
        await ws.send_str(json.dumps({"token": token, "cols": cols, "rows": rows}))
        keys: asyncio.Queue[bytes] = asyncio.Queue()
        loop.add_reader(0, lambda: keys.put_nowait(os.read(0, 4096)))

        async def typing() -> None:
            while data := await keys.get():
                await ws.send_bytes(data)

        sender = asyncio.ensure_future(typing())
        status = 1
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    os.write(1, msg.data)
                elif msg.type is aiohttp.WSMsgType.TEXT:
                    if json.loads(msg.data).get("type") == "hello":
                        status = 0
            return status if ws.close_code in (1000, None) else 1
        finally:
            sender.cancel()


if __name__ == "__main__":
    saved = termios.tcgetattr(0) if os.isatty(0) else None
    if saved is not None:
        tty.setraw(0)
    try:
        sys.exit(asyncio.run(main(sys.argv[1])))
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSANOW, saved)
