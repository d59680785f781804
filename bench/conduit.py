"""The Conduit test server in a process of its own, for the benchmarks.

    python -m bench.conduit

Prints one JSON line (its URL, a control URL, the bot's two tokens), then serves until
SIGTERM or SIGINT. ``GET <control>/calls`` answers the calls counted so far by method;
``POST <control>/delay`` with ``{"seconds": s}`` makes every answer take ``s`` longer;
``POST <control>/user`` with ``{"username": u, "bytes": n}`` adds an account whose real name
is ``n`` bytes (a ``user.search`` of it answers that much).
Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import signal

from aiohttp import web

from phabmesh import serving
from phabmesh.dev.conduit import ConduitServer

BOT = "bench-bot"


async def main() -> None:
    async with ConduitServer() as conduit:
        conduit.add_user(BOT, bot=True)
        for_secret, for_direct = conduit.add_token(BOT), conduit.add_token(BOT)

        async def calls(_: web.Request) -> web.Response:
            return web.json_response(dict(conduit.calls))

        async def delay(request: web.Request) -> web.Response:
            conduit.delay = float((await request.json())["seconds"])
            return web.json_response({"delay": conduit.delay})

        async def user(request: web.Request) -> web.Response:
            asked = await request.json()
            conduit.add_user(str(asked["username"]), real_name="x" * int(asked["bytes"]))
            return web.json_response({"username": asked["username"]})

        app = web.Application()
        app.router.add_post("/user", user)
        app.router.add_get("/calls", calls)
        app.router.add_post("/delay", delay)
        runner = await serving.start_site(app, "127.0.0.1", 0)
        control = f"http://127.0.0.1:{serving.bound_port(runner)}"
        print(
            json.dumps(
                {"url": conduit.url, "control": control, "secret": for_secret, "direct": for_direct}
            ),
            flush=True,
        )
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
