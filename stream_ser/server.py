"""The websocket broadcaster: transport only (no torch here; see ``tests/test_server.py``).

Each connection is a subscriber with a bounded queue and its own sender task. A
slow subscriber loses its *oldest* queued messages (counted, and reported to it
in its ``status`` messages) instead of slowing the recognizer or the others.
Binds 127.0.0.1 by default; optional token (``?token=`` or ``Authorization:
Bearer``); incoming messages are size-limited; garbage gets an ``error`` reply
and never crashes the server. Connections that send binary audio are producers,
handled by callbacks from the live app (see ``stream_ser.live``).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections import deque
from typing import Any, Callable
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
        self.producer: ProducerState | None = None

    def offer(self, item: str | dict) -> None:
        """Queue an encoded message (or a status dict, personalised at send time)."""
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(item)
        self.wake.set()

    def wants(self, stream: str | None) -> bool:
        return stream is None or self.stream_filter == P.ALL_STREAMS or self.stream_filter == stream


class ProducerLimits:
    """Per-producer limits: frame size, and no faster than real time (with a burst allowance) unless allowed."""

    def __init__(self, max_frame_bytes: int = 64_000, realtime_only: bool = True, burst_s: float = 1.0,
                 min_rate: int = 8_000, max_rate: int = 96_000):
        self.max_frame_bytes = max_frame_bytes
        self.realtime_only = realtime_only
        self.burst_s = burst_s
        self.min_rate = min_rate
        self.max_rate = max_rate


class ProducerState:
    def __init__(self, stream_id: str, rate: int):
        self.stream_id = stream_id
        self.rate = rate
        self.samples = 0
        self.t0: float | None = None
        self.frames = 0


class Broadcaster:
    """``await start()``, ``publish(msg, stream)``, ``publish_status(dict)``, ``await close()``.

    ``hello()`` builds the hello message for each new subscriber. With ``on_producer``
    (returns the new stream id for a client and its rate) and ``on_audio`` (gets the
    checked 16-bit PCM bytes) it accepts producers; ``limits`` are enforced here, and a
    producer that breaks them gets an ``error`` and is closed (4429) without
    disturbing anyone else.
    """

    def __init__(self, hello: Callable[[], dict], host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, queue_size: int = 256, max_message_bytes: int = 1 << 16,
                 on_producer: Callable[[Client, int], str] | None = None,
                 on_audio: Callable[[Client, bytes], Any] | None = None,
                 on_disconnect: Callable[[Client], Any] | None = None, limits: ProducerLimits | None = None):
        self.hello = hello
        self.host = host
        self.port = port
        self.token = token
        self.queue_size = queue_size
        self.max_message_bytes = max_message_bytes
        self.on_producer = on_producer
        self.on_audio = on_audio
        self.limits = limits or ProducerLimits()
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
            return await self._on_audio(c, message)
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
            rate = msg.get("rate", 16000)
            if c.producer is not None:
                return self._bad(c, "bad_audio", f"already producing stream {c.producer.stream_id}")
            self._start_producer(c, rate)

    def _start_producer(self, c: Client, rate) -> bool:
        lim = self.limits
        if self.on_producer is None:
            self._bad(c, "not_allowed", "this server does not take audio from clients (start it with --producers)")
            return False
        if not isinstance(rate, int) or not lim.min_rate <= rate <= lim.max_rate:
            self._bad(c, "bad_audio", f"rate must be an integer in {lim.min_rate}..{lim.max_rate} Hz, got {rate!r}")
            return False
        sid = self.on_producer(c, rate)
        c.producer = ProducerState(sid, rate)
        c.offer(P.encode(P.stream_assigned(sid, rate)))
        return True

    async def _limit(self, c: Client, code: str, text: str) -> None:
        self._bad(c, code, text)
        await asyncio.sleep(0)  # let the sender queue the error first
        deadline = asyncio.get_running_loop().time() + 1.0
        while c.queue and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await c.ws.close(P.CLOSE_PRODUCER_LIMIT, f"{code}: {text}"[:120])

    async def _on_audio(self, c: Client, data: bytes) -> None:
        if c.producer is None and not self._start_producer(c, 16000):
            return
        st, lim = c.producer, self.limits
        if len(data) > lim.max_frame_bytes:
            return await self._limit(c, "frame_too_large",
                                     f"{len(data)} bytes in one frame; at most {lim.max_frame_bytes}")
        if len(data) % 2:
            return self._bad(c, "bad_audio", "16-bit PCM frames must have an even number of bytes")
        now = asyncio.get_running_loop().time()
        if st.t0 is None:
            st.t0 = now
        st.samples += len(data) // 2
        st.frames += 1
        if lim.realtime_only and st.samples / st.rate > (now - st.t0) + lim.burst_s:
            return await self._limit(c, "too_fast", f"{st.samples / st.rate:.2f} s of audio in {now - st.t0:.2f} s; "
                                                    "producers must not run ahead of real time")
        self.on_audio(c, data)

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
