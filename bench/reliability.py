"""Server reliability figures for ``docs/reliability.md``: ``python -m bench.reliability``.

A real :class:`~stream_ser.server.Broadcaster` on loopback with real websocket
clients, publishing predictions at the live rate (one every 320 ms per stream)
plus a status every second, as ``stream-ser live`` does:

1. ``subscribers``: N subscribers at once; share of messages each received and the
   p99 gap between two predictions at a subscriber;
2. ``slow``: one subscriber reading a message every ``interval`` s beside a normal
   one: the oldest message it read (lag), what it was told it lost, whether and
   when it was closed (4408), and whether the normal one lost anything;
3. ``stuck``: a client that completes the handshake and never reads again: when
   it is closed, and what the server buffered for it meanwhile;
4. ``producers``: N producers sending 0.1 s frames at real-time pace: every
   stream's bytes arrive complete and unmixed.

Writes ``bench/results/server/reliability.json``. Takes about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stream_ser import protocol as P
from stream_ser.server import Broadcaster

HOP_S = 0.32
OUT = Path(__file__).resolve().parent / "results" / "server" / "reliability.json"  # not beside bench.run's files


def _server(**kw) -> Broadcaster:
    return Broadcaster(lambda: P.hello(["a", "b"], "bench", {}, HOP_S, 3.0), port=0, **kw)


async def _publisher(srv: Broadcaster, stop: asyncio.Event, streams: int = 1):
    seq = 0
    next_status = time.monotonic() + 1.0
    while not stop.is_set():
        seq += 1
        for k in range(streams):
            srv.publish({"type": "prediction", "seq": seq, "t": time.monotonic(), "stream": f"s{k}",
                         "label": "anger", "confidence": 0.7, "probabilities": {"anger": 0.7, "sadness": 0.3},
                         "attention": [0.125] * 8, "timings_ms": {"total": 25.0}}, f"s{k}")
        if time.monotonic() >= next_status:
            srv.publish_status(P.status(subscribers=len(srv.clients)))
            next_status += 1.0
        await asyncio.sleep(HOP_S)


async def subscribers(n: int, seconds: float) -> dict:
    srv = _server()
    await srv.start()
    clients = [await connect(srv.url) for _ in range(n)]
    stop = asyncio.Event()
    got = [[] for _ in range(n)]

    async def read(i, ws):
        try:
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "prediction":
                    got[i].append((m["seq"], time.monotonic()))
        except (ConnectionClosed, asyncio.CancelledError):
            pass

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(clients)]
    pub = asyncio.create_task(_publisher(srv, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await pub
    await asyncio.sleep(1.0)
    for r in readers:
        r.cancel()
    published = max(max((s for s, _ in g), default=0) for g in got)
    gaps = [b - a for g in got for (_, a), (_, b) in zip(g, g[1:])]
    complete = sum(len(g) == published for g in got)
    for ws in clients:
        await ws.close()
    await srv.close(drain_s=0.1)
    return {"subscribers": n, "seconds": seconds, "published": published, "complete_subscribers": complete,
            "gap_ms": P.percentiles([1000 * g for g in gaps]), "dropped_total": srv.dropped_total}


async def slow(interval_s: float, seconds: float) -> dict:
    srv = _server()
    await srv.start()
    stop = asyncio.Event()
    slow_ws = await connect(srv.url)
    slow_client = next(iter(srv.clients))
    fast_ws = await connect(srv.url)
    fast_seqs = []

    async def read_fast():
        try:
            while True:
                m = json.loads(await fast_ws.recv())
                if m["type"] == "prediction":
                    fast_seqs.append(m["seq"])
        except (ConnectionClosed, asyncio.CancelledError):
            pass

    reader = asyncio.create_task(read_fast())
    pub = asyncio.create_task(_publisher(srv, stop))
    lags, told, closed_at, code, reason = [], 0, None, None, None
    t0 = time.monotonic()
    server_closed = []

    async def watch():
        while not srv.slow_closed:
            await asyncio.sleep(0.02)
        server_closed.append(time.monotonic() - t0)

    watcher = asyncio.create_task(watch())
    try:
        while time.monotonic() - t0 < seconds:
            m = json.loads(await slow_ws.recv())
            if m["type"] == "prediction":
                lags.append(time.monotonic() - m["t"])
            elif m["type"] == "status":
                told = max(told, m["dropped"])
            await asyncio.sleep(interval_s)
        while True:  # read on at full speed: what it is told at the end (a status, or the close)
            m = json.loads(await asyncio.wait_for(slow_ws.recv(), 15))
            if m["type"] == "status":
                told = max(told, m["dropped"])
                break
    except (ConnectionClosed, asyncio.TimeoutError) as e:
        closed_at = time.monotonic() - t0
        if isinstance(e, ConnectionClosed):
            code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)
    stop.set()
    await pub
    reader.cancel()
    watcher.cancel()
    res = {"read_interval_s": interval_s, "seconds": seconds, "read": len(lags),
           "lag_s": {"max": round(max(lags), 3) if lags else None,
                     **(P.percentiles(lags) if lags else {})},
           "told_dropped": told, "client_saw_close_after_s": None if closed_at is None else round(closed_at, 2),
           "close_code": code, "close_reason": reason, "normal_subscriber_lost": (max(fast_seqs) - min(fast_seqs) + 1 - len(fast_seqs))
           if fast_seqs else None, "server_slow_closed": srv.slow_closed,
           "server_closed_it_after_s": round(server_closed[0], 2) if server_closed else None}
    res["server_dropped_for_it"] = slow_client.dropped
    res["server_max_queue_age_s"] = round(slow_client.max_lag_s, 3)
    for ws in (slow_ws, fast_ws):
        await ws.close()
    await srv.close(drain_s=0.1)
    return res


async def stuck(seconds: float) -> dict:
    from bench.clients import stuck_client as _stuck_client  # the raw-socket client the tests use too
    srv = _server()
    await srv.start()
    stop = asyncio.Event()
    sock = await asyncio.to_thread(_stuck_client, srv.port)
    pub = asyncio.create_task(_publisher(srv, stop, streams=20))  # 20 streams: 62.5 predictions/s
    t0 = time.monotonic()
    closed = None
    while time.monotonic() - t0 < seconds:
        if srv.slow_closed:
            closed = time.monotonic() - t0
            break
        await asyncio.sleep(0.05)
    stop.set()
    await pub
    sock.close()
    await srv.close(drain_s=0.1)
    return {"closed_after_s": None if closed is None else round(closed, 2), "publish_rate_per_s": 20 / HOP_S,
            "slow_close_s": srv.flow.slow_close_s}


async def producers(n: int, seconds: float) -> dict:
    received: dict[str, bytearray] = {}

    def on_producer(client, rate):
        received[f"p{client.id}"] = bytearray()
        return f"p{client.id}"

    srv = _server(on_producer=on_producer, on_audio=lambda c, d: received[c.producer.stream_id].extend(d))
    await srv.start()

    async def produce(k):
        async with connect(srv.url) as ws:
            await ws.recv()
            await ws.send(P.encode(P.audio_header(16000)))
            sid = json.loads(await ws.recv())["stream"]
            await ws.send(P.encode(P.subscribe(P.NO_STREAMS)))
            frame = np.full(1600, k, dtype="<i2").tobytes()
            t0 = time.monotonic()
            for i in range(int(seconds / 0.1)):
                await ws.send(frame)
                await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.1 - time.monotonic()))
            await asyncio.sleep(0.3)
            return sid, frame * int(seconds / 0.1)

    got = await asyncio.gather(*(produce(k) for k in range(1, n + 1)))
    ok = sum(bytes(received[sid]) == sent for sid, sent in got)
    await srv.close(drain_s=0.1)
    return {"producers": n, "seconds": seconds, "streams_complete_and_unmixed": ok}


async def main_async(args) -> dict:
    res = {"machine": f"{platform.machine()}, {platform.processor() or '?'}; python {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d"), "command": "python -m bench.reliability"}
    res["subscribers"] = await subscribers(args.subscribers, args.seconds)
    print("subscribers", res["subscribers"], flush=True)
    res["slow"] = []
    for interval in (0.1, 0.5, 1.0, 3.0):
        r = await slow(interval, args.seconds * 2)
        print("slow", r, flush=True)
        res["slow"].append(r)
    res["stuck"] = await stuck(30.0)
    print("stuck", res["stuck"], flush=True)
    res["producers"] = await producers(args.producers, 5.0)
    print("producers", res["producers"], flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--producers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the subscriber run (slow runs: twice)")
    args = ap.parse_args(argv)
    res = asyncio.run(main_async(args))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
