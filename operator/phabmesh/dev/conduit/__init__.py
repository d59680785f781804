"""A Conduit test server that behaves like a real Phorge server, for tests and demos.

Its parts: ``api`` (what Phorge's API looks like), ``php`` (how PHP reads parameters),
``store`` (accounts and tokens), ``methods`` (each method, Phorge's checks in order) and
``server`` (HTTP, faults and encodings).

It is a real HTTP server (aiohttp) on 127.0.0.1, agreeing with the recordings
of a stock Phorge in ``tests/conduit/recordings``: ``conduit.ping``,
``conduit.getcapabilities``, ``user.whoami``, ``user.search``, ``user.edit``
(disable/enable) and ``user.disable``, the same checks in the same order, the
same error codes and messages, the same envelope and headers, and answers
compressed as Phorge compresses them (gzip or deflate after the client's
``Accept-Encoding``, errors too; see ``phabmesh.conduit.responses``). Tests drive it:
add users and tokens, disable an account, terminate or delete a token, take it
down (500 HTML, as when its database is gone) or make it slow. Herald webhooks
(``hooks``): ``add_hook(url, key)`` has every ``user.edit`` that changes an account delivered
to ``url`` as Phorge's ``HeraldWebhookWorker`` delivers it (``deliveries`` keeps each
answer), and ``call_hook`` calls one at once, as Phorge's "Call Webhook" test action::

    server = ConduitServer()
    server.start()                      # background thread; or `async with`
    server.add_user("ci-bot", bot=True)
    token = server.add_token("ci-bot")
    ...
    server.stop()
"""

from phabmesh.dev.conduit.server import ConduitServer
from phabmesh.dev.conduit.store import TestUser

__all__ = ["ConduitServer", "TestUser"]
