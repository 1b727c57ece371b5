"""The websocket broadcaster: transport only (no torch here; see ``tests/test_server.py``).

Each connection is a subscriber with a bounded queue and its own sender task. A
slow subscriber loses its *oldest* queued messages (counted, and reported to it
in its ``status`` messages) instead of slowing the recognizer or the others.

What a slow subscriber can have in flight is bounded too, not only the queue:
the sender pings the client after every :data:`ACK_EVERY` messages and never has
more than :data:`ACK_WINDOW` pings unanswered. A websocket client answers a ping
only once it has read the frames before it, so at most ``ACK_EVERY * ACK_WINDOW``
messages sit in socket buffers; queued messages older than ``max_lag_s`` are
dropped (counted); a client that leaves a ping unanswered for ``slow_close_s`` is
closed with :data:`~stream_ser.protocol.CLOSE_SLOW_CONSUMER`. See
``docs/reliability.md`` for the figures.

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
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import protocol as P

log = logging.getLogger("stream_ser.server")

ACK_EVERY = 4  # messages sent between two flow-control pings
ACK_WINDOW = 2  # unanswered flow-control pings before the sender waits
MAX_LAG_S = 5.0  # a queued prediction older than this is dropped (counted) instead of sent
SLOW_CLOSE_S = 5.0  # a flow-control ping unanswered this long closes the subscriber (4408)
SEND_BUFFER_BYTES = 64 * 1024  # kernel send buffer per connection (SO_SNDBUF)
MAX_TEXT_BYTES = 1 << 16  # largest text message a client may send


@dataclass(frozen=True)
class FlowControl:
    """How much a subscriber may lag before messages are dropped or it is closed (``docs/reliability.md``)."""

    queue_size: int = 256  # queued messages per subscriber; beyond it the oldest is dropped
    ack_every: int = ACK_EVERY
    ack_window: int = ACK_WINDOW
    max_lag_s: float = MAX_LAG_S
    slow_close_s: float = SLOW_CLOSE_S
    send_buffer_bytes: int | None = SEND_BUFFER_BYTES

    def __post_init__(self):
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {self.queue_size}")
        if self.ack_every < 1 or self.ack_window < 1:
            raise ValueError("ack_every and ack_window must be at least 1")


class Client:
    """One connection: a bounded drop-oldest queue drained by its own sender task."""

    _ids = itertools.count(1)

    def __init__(self, ws: ServerConnection, queue_size: int):
        self.id = next(self._ids)
        self.ws = ws
        self.queue: deque[tuple[float, str | dict]] = deque()  # (monotonic time queued, message)
        self.queue_size = queue_size
        self.wake = asyncio.Event()
        self.dropped = 0
        self.pending = 0  # queued or being sent (an error must reach the client before a close)
        self.sent = 0
        self.max_lag_s = 0.0  # the oldest a prediction was when this client's sender handed it on
        self.bad_messages = 0
        self.stream_filter = P.ALL_STREAMS  # set through Broadcaster.follow, which keeps its index of followers
        self.producer: ProducerState | None = None

    def offer(self, item: str | dict, limit: int | None = None) -> None:
        """Queue an encoded message (or a status dict, personalised at send time); beyond ``limit`` queued
        messages (default ``queue_size``) the oldest is dropped."""
        if len(self.queue) >= (limit or self.queue_size):
            self.queue.popleft()
            self.dropped += 1
        else:
            self.pending += 1
        self.queue.append((time.monotonic(), item))
        self.wake.set()


class ProducerLimits:
    """Per-producer limits (documented in ``docs/reliability.md``).

    ``max_frame_bytes``: the largest binary frame (16-bit samples, so half as many
    samples). ``realtime_only``: the audio received may run ahead of the wall clock
    since the first frame by at most ``burst_s`` seconds, or by one largest frame,
    whichever is longer, so any frame the size limit allows is also allowed by
    the pace limit. Rates outside ``min_rate..max_rate`` Hz are refused.
    """

    MAX_FRAME_BYTES_LIMIT = 1 << 20  # the most --max-frame-bytes may be set to (about 33 s at 16 kHz)

    def __init__(self, max_frame_bytes: int = 64_000, realtime_only: bool = True, burst_s: float = 1.0,
                 min_rate: int = 8_000, max_rate: int = 96_000):
        if not 2 <= max_frame_bytes <= self.MAX_FRAME_BYTES_LIMIT:
            raise ValueError(f"max_frame_bytes must be 2..{self.MAX_FRAME_BYTES_LIMIT}, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.realtime_only = realtime_only
        self.burst_s = burst_s
        self.min_rate = min_rate
        self.max_rate = max_rate

    def allowed_lead_s(self, rate: int) -> float:
        """How far ahead of real time a producer at ``rate`` Hz may be."""
        return max(self.burst_s, self.max_frame_bytes / 2 / rate)


class ProducerState:
    def __init__(self, stream_id: str, rate: int):
        self.stream_id = stream_id
        self.rate = rate
        self.samples = 0
        self.t0: float | None = None
        self.frames = 0


class Sender:
    """Drains one subscriber's queue: stale predictions dropped, status personalised, sends paced by pongs,
    a subscriber that stops acknowledging closed with 4408. ``hub`` keeps the server-wide counters."""

    def __init__(self, c: Client, flow: FlowControl, hub: "Broadcaster"):
        self.c = c
        self.flow = flow
        self.hub = hub

    async def run(self) -> None:
        c, flow = self.c, self.flow
        pongs: deque[Awaitable[float]] = deque()
        since_ping = 0
        try:
            while True:
                await c.wake.wait()
                c.wake.clear()
                while c.queue:
                    while len(pongs) >= flow.ack_window:  # the client is behind: wait for it (queue keeps filling)
                        try:
                            async with asyncio.timeout(flow.slow_close_s):
                                await pongs.popleft()
                        except TimeoutError:
                            return await self.close_slow()
                    t, item = c.queue.popleft()
                    age = time.monotonic() - t
                    if isinstance(item, dict):  # status: tell this subscriber what it lost
                        item = P.encode({**item, "dropped": c.dropped, "subscribers": len(self.hub.clients),
                                         "dropped_total": self.hub.dropped_total})
                    elif age > flow.max_lag_s:
                        c.dropped += 1
                        self.hub.dropped_total += 1
                        c.pending -= 1
                        continue
                    else:
                        c.max_lag_s = max(c.max_lag_s, age)
                    # send() writes the whole frame, then waits while the socket buffers are full; the deadline
                    # is a timer in this task (asyncio.wait_for ran each send as a task of its own: at 448
                    # producers, a tenth of the event loop's time went to those tasks)
                    try:
                        async with asyncio.timeout(flow.slow_close_s):
                            await c.ws.send(item)
                    except TimeoutError:
                        return await self.close_slow()
                    c.pending -= 1
                    c.sent += 1
                    since_ping += 1
                    if since_ping >= flow.ack_every:
                        since_ping = 0
                        pongs.append(await c.ws.ping())
        except ConnectionClosed:
            pass

    async def close_slow(self) -> None:
        c = self.c
        self.hub.slow_closed += 1
        log.warning("subscriber %s closed: no acknowledgement for %.0f s (%d messages dropped)",
                    c.id, self.flow.slow_close_s, c.dropped)
        try:  # the close frame may not get through a full socket: then the TCP connection is aborted
            await asyncio.wait_for(c.ws.close(P.CLOSE_SLOW_CONSUMER, f"slow_consumer: nothing acknowledged for "
                                              f"{self.flow.slow_close_s:.0f} s; {c.dropped} dropped"), 3.0)
        except asyncio.TimeoutError:
            pass
        c.ws.transport.abort()


class ProducerGate:
    """Admits producers and their audio: the ``audio`` header's rate, frame sizes, the real-time pace.
    ``on_producer(client, rate) -> stream id`` and ``on_audio(client, pcm16 bytes)`` are the app's callbacks.
    ``bad(client, code, text)`` replies with an error; ``limit(client, code, text)`` also closes (4429)."""

    def __init__(self, limits: ProducerLimits, on_producer: Callable[[Client, int], str] | None,
                 on_audio: Callable[[Client, bytes], Any] | None, bad: Callable[[Client, str, str], None],
                 limit: Callable[[Client, str, str], Awaitable[None]]):
        self.limits = limits
        self.on_producer = on_producer
        self.on_audio = on_audio
        self.bad = bad
        self.limit = limit

    def start(self, c: Client, rate) -> str | None:
        """The new stream's id, or None (an error was sent) when the header is refused."""
        lim = self.limits
        if self.on_producer is None:
            self.bad(c, "not_allowed", "this server does not take audio from clients (start it with --producers)")
            return None
        if isinstance(rate, bool) or not isinstance(rate, int) or not lim.min_rate <= rate <= lim.max_rate:
            self.bad(c, "bad_audio", f"rate must be an integer in {lim.min_rate}..{lim.max_rate} Hz, "
                                     f"got {str(rate)[:40]!r}")
            return None
        sid = self.on_producer(c, rate)
        c.producer = ProducerState(sid, rate)
        c.offer(P.encode(P.stream_assigned(sid, rate)))
        return sid

    async def audio(self, c: Client, data: bytes, now: float) -> None:
        if c.producer is None and self.start(c, 16000) is None:
            return
        st, lim = c.producer, self.limits
        if len(data) > lim.max_frame_bytes:
            return await self.limit(c, "frame_too_large",
                                    f"{len(data)} bytes in one frame; at most {lim.max_frame_bytes}")
        if len(data) % 2:
            return self.bad(c, "bad_audio", "16-bit PCM frames must have an even number of bytes")
        if st.t0 is None:
            st.t0 = now
        st.samples += len(data) // 2
        st.frames += 1
        if lim.realtime_only and st.samples / st.rate > (now - st.t0) + lim.allowed_lead_s(st.rate):
            return await self.limit(c, "too_fast", f"{st.samples / st.rate:.2f} s of audio in {now - st.t0:.2f} s; "
                                                   "producers must not run ahead of real time")
        self.on_audio(c, data)


class Broadcaster:
    """``await start()``, ``publish(msg, stream)``, ``publish_status(dict)``, ``await close()``.

    Accepts connections and dispatches what they send; each subscriber is drained by
    its own :class:`Sender` under ``flow`` (:class:`FlowControl`), and audio goes through
    a :class:`ProducerGate`. ``hello()`` builds the hello message for each new
    subscriber. With ``on_producer`` (returns the new stream id for a client and its
    rate) and ``on_audio`` (gets the checked 16-bit PCM bytes) it accepts producers;
    ``limits`` are enforced, and a producer that breaks them gets an ``error`` and is
    closed (4429) without disturbing anyone else. ``streams()`` (optional) lists the
    stream ids a subscriber may follow (another id gets an ``unknown_stream`` error); their number sets
    how many messages a subscriber to every stream may queue (see :meth:`publish`). ``compress``: offer
    permessage-deflate (for slow links; it costs CPU on both ends for every message).
    """

    def __init__(self, hello: Callable[[], dict], host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, flow: FlowControl | None = None,
                 max_message_bytes: int = MAX_TEXT_BYTES,
                 on_producer: Callable[[Client, int], str] | None = None,
                 on_audio: Callable[[Client, bytes], Any] | None = None,
                 on_disconnect: Callable[[Client], Any] | None = None, limits: ProducerLimits | None = None,
                 streams: Callable[[], Collection[str]] | None = None, compress: bool = False):
        self.hello = hello
        # permessage-deflate off unless asked for: clients offer it by default, and then every producer's
        # audio frame was compressed by the client and inflated here (PCM hardly shrinks) and every
        # prediction deflated once per subscriber; at 320 producers on 2 cores that was half a core of
        # the clients' and a third of the server loop's time (bench.server_capacity)
        self.compress = compress
        self.host = host
        self.port = port
        self.token = token
        self.flow = flow or FlowControl()
        self.max_message_bytes = max_message_bytes
        self.producers = ProducerGate(limits or ProducerLimits(), on_producer, on_audio, self._bad, self._limit)
        self.on_disconnect = on_disconnect
        self.streams = streams
        self.clients: set[Client] = set()
        # the clients by what they follow ("*", "none" or one stream id): a prediction goes to the followers of
        # "*" and of its stream, without a look at every other client (with one producer a stream, looking at
        # every client for every prediction was streams x clients checks a hop)
        self._followers: dict[str, set[Client]] = {}
        self.first_subscriber = asyncio.Event()
        self.dropped_total = 0
        self.bad_messages_total = 0
        self.refused = 0
        self.slow_closed = 0
        self._server = None

    @property
    def limits(self) -> ProducerLimits:
        return self.producers.limits

    async def start(self) -> None:
        # the websocket library's own frame limit must not answer before ours (1009, no error message)
        max_size = max(self.max_message_bytes, self.limits.max_frame_bytes) + 1024
        self._server = await serve(self._handle, self.host, self.port, max_size=max_size,
                                   ping_interval=20, ping_timeout=20, close_timeout=2, open_timeout=10,
                                   compression="deflate" if self.compress else None)
        self.port = self._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    # --- sending ------------------------------------------------------------------
    def publish(self, msg: dict, stream: str | None = None) -> None:
        """Encode once, queue for every subscriber that follows ``stream`` (call on the loop's thread). A
        subscriber to every stream may queue ``queue_size`` messages per stream (``streams()``, when given):
        each hop brings one prediction per stream at once, and with more streams than ``queue_size`` a
        fixed bound dropped part of every hop however fast it read."""
        text = P.encode(msg)
        everything = self._everything_limit()
        if stream is None:
            targets = self.clients
        else:
            targets = (*self._followers.get(P.ALL_STREAMS, ()), *self._followers.get(stream, ()))
        for c in targets:
            self._offer(c, text, everything)

    def publish_status(self, status: dict) -> None:
        everything = self._everything_limit()  # (with the plain bound, a status pushed a prediction out)
        for c in self.clients:
            self._offer(c, dict(status), everything)

    def _offer(self, c: Client, item: str | dict, everything: int | None) -> None:
        """Queue ``item`` for ``c`` under its bound (``everything`` for a subscriber to every stream), counting
        what it drops."""
        before = c.dropped
        c.offer(item, everything if c.stream_filter == P.ALL_STREAMS else None)
        self.dropped_total += c.dropped - before

    def follow(self, c: Client, stream: str | None) -> None:
        """``c`` follows ``stream`` from now on (an id, ``"*"`` or ``"none"``); ``None``: it left."""
        was = self._followers.get(c.stream_filter)
        if was is not None:
            was.discard(c)
            if not was:  # its last follower left: no empty set kept for every stream ever followed
                del self._followers[c.stream_filter]
        if stream is not None:
            c.stream_filter = stream
            self._followers.setdefault(stream, set()).add(c)

    def _everything_limit(self) -> int | None:
        """The queue bound of a subscriber to every stream: ``queue_size`` per stream (None: the plain bound)."""
        return self.flow.queue_size * max(1, len(self.streams())) if self.streams is not None else None

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
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and self.flow.send_buffer_bytes:
            try:  # keep what the kernel holds for a slow client small; the queue decides what is dropped
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.flow.send_buffer_bytes)
            except OSError:
                pass
        c = Client(ws, self.flow.queue_size)
        self.clients.add(c)
        self.follow(c, P.ALL_STREAMS)
        c.offer(P.encode(self.hello()))
        self.first_subscriber.set()
        sender = asyncio.create_task(Sender(c, self.flow, self).run())
        try:
            async for message in ws:
                await self._on_message(c, message)
                if sender.done():  # closed as a slow consumer
                    break
        except ConnectionClosed:
            pass
        except Exception:  # never let one client take the server down
            log.exception("client %s handler failed", c.id)
        finally:
            self.clients.discard(c)
            self.follow(c, None)
            sender.cancel()
            if self.on_disconnect:
                self.on_disconnect(c)

    def _bad(self, c: Client, code: str, text: str) -> None:
        c.bad_messages += 1
        self.bad_messages_total += 1
        c.offer(P.encode(P.error(code, text)))

    async def _on_message(self, c: Client, message: str | bytes) -> None:
        if isinstance(message, bytes):
            return await self.producers.audio(c, message, asyncio.get_running_loop().time())
        if len(message) > self.max_message_bytes:
            return self._bad(c, "bad_message", f"text message of {len(message)} characters; "
                                               f"at most {self.max_message_bytes}")
        try:
            msg = P.decode(message, allowed=P.CLIENT_TYPES)
        except P.ProtocolError as e:
            return self._bad(c, "bad_message", str(e))
        kind = msg["type"]
        if kind == P.SUBSCRIBE:
            stream = msg.get("stream", P.ALL_STREAMS)
            if not isinstance(stream, str):
                return self._bad(c, "bad_message", "subscribe.stream must be a string")
            if stream not in (P.ALL_STREAMS, P.NO_STREAMS) and self.streams is not None:
                known = sorted(self.streams())
                if stream not in known:
                    return self._bad(c, "unknown_stream", f"no stream {stream[:80]!r}; streams now: "
                                                          f"{', '.join(known) or 'none'} (or '*' for all)")
            self.follow(c, stream)
        elif kind == P.PING:
            c.offer(P.status(subscribers=len(self.clients), dropped_total=self.dropped_total))
        elif kind == P.AUDIO:
            if c.producer is not None:
                return self._bad(c, "bad_audio", f"already producing stream {c.producer.stream_id}")
            if self.producers.start(c, msg.get("rate", 16000)) is None:
                # the client meant to send audio; going on would start a stream it did not ask for
                await self._close_after_error(c, P.CLOSE_BAD_REQUEST, "bad_audio: audio header refused")

    async def _close_after_error(self, c: Client, code: int, reason: str) -> None:
        """Let the queued ``error`` reach the client (up to 1 s), then close with ``code``."""
        await asyncio.sleep(0)
        deadline = asyncio.get_running_loop().time() + 1.0
        while c.pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await c.ws.close(code, reason[:120])

    async def _limit(self, c: Client, code: str, text: str) -> None:
        self._bad(c, code, text)
        await self._close_after_error(c, P.CLOSE_PRODUCER_LIMIT, f"{code}: {text}")

    # --- shutdown -----------------------------------------------------------------
    async def close(self, reason: str | None = None, drain_s: float = 1.0) -> None:
        """Optionally tell everyone why (an ``end`` message), let queues drain briefly, close all (1001)."""
        if reason is not None:
            self.publish(P.end(reason))
        deadline = asyncio.get_running_loop().time() + drain_s
        while any(c.pending for c in self.clients) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
