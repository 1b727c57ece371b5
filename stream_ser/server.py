"""The websocket broadcaster: transport only (no torch here; see ``tests/test_server.py``).

Each connection is a subscriber with a bounded queue and its own sender task. A
slow subscriber loses its *oldest* queued messages (counted, and reported to it
in its ``status`` messages) instead of slowing the recognizer or the others.
Binds 127.0.0.1 by default; optional token (``?token=`` or ``Authorization:
Bearer``); incoming messages are size-limited; garbage gets an ``error`` reply
and never crashes the server. Connections that send binary audio are producers,
handled by the ``audio`` callbacks the engine passes in (see ``stream_ser.engine``).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections import deque
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import protocol as P

log = logging.getLogger("stream_ser.server")


class Client:
    """One connection: a bounded drop-oldest queue drained by its own sender task."""

    _ids = itertools.count(1)

    def __init__(self, ws: ServerConnection, queue_size: int):
        self.id = next(self._ids)
        self.ws = ws
        self.queue: deque[str | dict] = deque()
        self.queue_size = queue_size
        self.wake = asyncio.Event()
        self.dropped = 0
        self.sent = 0
        self.bad_messages = 0
        self.stream_filter = P.ALL_STREAMS
        self.producer_stream: str | None = None

    def offer(self, item: str | dict) -> None:
        """Queue an encoded message (or a status dict, personalised at send time)."""
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(item)
        self.wake.set()

    def wants(self, stream: str | None) -> bool:
        return stream is None or self.stream_filter == P.ALL_STREAMS or self.stream_filter == stream


AudioHandler = Callable[[Client, bytes], Awaitable[None] | None]


class Broadcaster:
    """``await start()``, ``publish(msg, stream)``, ``publish_status(dict)``, ``await close()``.

    ``hello()`` builds the hello message for each new subscriber. ``on_audio_header``,
    ``on_audio`` and ``on_disconnect`` (all optional) make it accept producers.
    """

    def __init__(self, hello: Callable[[], dict], host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, queue_size: int = 256, max_message_bytes: int = 1 << 16,
                 on_audio_header: Callable[[Client, dict], Any] | None = None,
                 on_audio: AudioHandler | None = None, on_disconnect: Callable[[Client], Any] | None = None):
        self.hello = hello
        self.host = host
        self.port = port
        self.token = token
        self.queue_size = queue_size
        self.max_message_bytes = max_message_bytes
        self.on_audio_header = on_audio_header
        self.on_audio = on_audio
        self.on_disconnect = on_disconnect
        self.clients: set[Client] = set()
        self.first_subscriber = asyncio.Event()
        self.dropped_total = 0
        self.bad_messages_total = 0
        self.refused = 0
        self._server = None

    async def start(self) -> None:
        self._server = await serve(self._handle, self.host, self.port, max_size=self.max_message_bytes,
                                   ping_interval=20, ping_timeout=20, close_timeout=2)
        self.port = self._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    # --- sending ------------------------------------------------------------------
    def publish(self, msg: dict, stream: str | None = None) -> None:
        """Encode once, queue for every subscriber that follows ``stream`` (call on the loop's thread)."""
        text = P.encode(msg)
        for c in self.clients:
            if c.wants(stream):
                before = c.dropped
                c.offer(text)
                self.dropped_total += c.dropped - before

    def publish_status(self, status: dict) -> None:
        for c in self.clients:
            before = c.dropped
            c.offer(dict(status))
            self.dropped_total += c.dropped - before

    def send_to(self, client: Client, msg: dict) -> None:
        client.offer(P.encode(msg))

    async def _sender(self, c: Client) -> None:
        try:
            while True:
                await c.wake.wait()
                c.wake.clear()
                while c.queue:
                    item = c.queue.popleft()
                    if isinstance(item, dict):  # status: tell this subscriber what it lost
                        item = P.encode({**item, "dropped": c.dropped, "subscribers": len(self.clients),
                                         "dropped_total": self.dropped_total})
                    await c.ws.send(item)
                    c.sent += 1
        except ConnectionClosed:
            pass

    # --- receiving ----------------------------------------------------------------
    def _authorized(self, ws: ServerConnection) -> bool:
        if not self.token:
            return True
        req = ws.request
        given = parse_qs(urlsplit(req.path).query).get("token", [""])[0]
        auth = req.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _handle(self, ws: ServerConnection) -> None:
        if not self._authorized(ws):
            self.refused += 1
            await ws.close(P.CLOSE_UNAUTHORIZED, "unauthorized: missing or wrong token")
            return
        c = Client(ws, self.queue_size)
        self.clients.add(c)
        c.offer(P.encode(self.hello()))
        self.first_subscriber.set()
        sender = asyncio.create_task(self._sender(c))
        try:
            async for message in ws:
                await self._on_message(c, message)
        except ConnectionClosed:
            pass
        except Exception:  # never let one client take the server down
            log.exception("client %s handler failed", c.id)
        finally:
            self.clients.discard(c)
            sender.cancel()
            if self.on_disconnect:
                self.on_disconnect(c)

    def _bad(self, c: Client, code: str, text: str) -> None:
        c.bad_messages += 1
        self.bad_messages_total += 1
        c.offer(P.encode(P.error(code, text)))

    async def _on_message(self, c: Client, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if self.on_audio is None:
                return self._bad(c, "not_allowed", "this server does not take audio from clients")
            if c.producer_stream is None and self.on_audio_header is not None:
                self.on_audio_header(c, P.audio_header(16000))
            result = self.on_audio(c, message)
            if asyncio.iscoroutine(result):
                await result
            return
        try:
            msg = P.decode(message, allowed=P.CLIENT_TYPES)
        except P.ProtocolError as e:
            return self._bad(c, "bad_message", str(e))
        kind = msg["type"]
        if kind == P.SUBSCRIBE:
            stream = msg.get("stream", P.ALL_STREAMS)
            if not isinstance(stream, str):
                return self._bad(c, "bad_message", "subscribe.stream must be a string")
            c.stream_filter = stream
        elif kind == P.PING:
            c.offer(P.status(subscribers=len(self.clients), dropped_total=self.dropped_total))
        elif kind == P.AUDIO:
            if self.on_audio_header is None:
                return self._bad(c, "not_allowed", "this server does not take audio from clients")
            self.on_audio_header(c, msg)

    # --- shutdown -----------------------------------------------------------------
    async def close(self, reason: str | None = None, drain_s: float = 1.0) -> None:
        """Optionally tell everyone why (an ``end`` message), let queues drain briefly, close all (1001)."""
        if reason is not None:
            self.publish(P.end(reason))
        deadline = asyncio.get_running_loop().time() + drain_s
        while any(c.queue for c in self.clients) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None

    def stats(self) -> dict:
        return {"subscribers": len(self.clients), "dropped_total": self.dropped_total,
                "bad_messages": self.bad_messages_total, "refused": self.refused}
