"""The broadcaster with real websocket clients over loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stream_ser import protocol as P
from stream_ser.server import Broadcaster, FlowControl

from bench.clients import stuck_client as _stuck_client

LABELS = ["a", "b", "c"]


def _pred(seq):
    return P.prediction({"seq": seq, "window_start_s": 0.32 * seq, "window_end_s": 0.32 * seq + 2.9,
                         "probabilities": {"a": 0.5, "b": 0.3, "c": 0.2}, "label": "a", "confidence": 0.5,
                         "attention": [0.125] * 8, "speech_activity": 1.0, "level_dbfs": -20.0,
                         "timings_ms": {"total": 1.0}, "stream": None})


def _server(**kw):
    return Broadcaster(lambda: P.hello(LABELS, "test model", {}, 0.32, 3.0), port=0, **kw)


async def _recv(ws, timeout=5.0):
    return P.decode(await asyncio.wait_for(ws.recv(), timeout), allowed=P.SERVER_TYPES)


def test_server_module_does_not_import_torch():
    code = "import sys, stream_ser.server, stream_ser.protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hello_then_predictions_in_order():
    async def main():
        srv = _server()
        await srv.start()
        async with connect(srv.url) as ws:
            hello = await _recv(ws)
            assert hello["type"] == "hello" and hello["labels"] == LABELS and hello["v"] == P.PROTOCOL_VERSION
            for i in range(1, 21):
                srv.publish(_pred(i))
            seqs = []
            for _ in range(20):
                m = await _recv(ws)
                assert m["type"] == "prediction"
                assert abs(sum(m["probabilities"].values()) - 1) < 1e-6 and m["label"] in LABELS
                seqs.append(m["seq"])
            assert seqs == list(range(1, 21))
        await srv.close()
    asyncio.run(main())


def test_hundred_subscribers_all_receive_everything():
    async def main():
        srv = _server()
        await srv.start()
        clients = [await connect(srv.url) for _ in range(100)]
        for ws in clients:
            assert (await _recv(ws))["type"] == "hello"
        assert len(srv.clients) == 100
        for i in range(1, 11):
            srv.publish(_pred(i))

        async def collect(ws):
            return [(await _recv(ws))["seq"] for _ in range(10)]

        got = await asyncio.gather(*(collect(ws) for ws in clients))
        assert all(g == list(range(1, 11)) for g in got)
        for ws in clients:
            await ws.close()
        await srv.close()
    asyncio.run(main())


def test_subscriber_that_never_reads_does_not_delay_another():
    async def main():
        srv = _server(flow=FlowControl(queue_size=16))
        await srv.start()
        stuck = await asyncio.to_thread(_stuck_client, srv.port)  # handshakes, then never reads its socket
        good = await connect(srv.url)
        assert (await _recv(good))["type"] == "hello"
        big = "x" * 100_000  # padding so the stuck client's socket fills quickly
        loop = asyncio.get_running_loop()
        delays = []
        for i in range(1, 301):
            msg = _pred(i)
            msg["pad"] = big
            t0 = loop.time()
            srv.publish(msg)
            m = await _recv(good, timeout=2.0)
            delays.append(loop.time() - t0)
            assert m["seq"] == i
        assert max(delays) < 0.5
        stuck_client = min(srv.clients, key=lambda c: c.id)  # connected first
        assert stuck_client.sent < 300
        assert stuck_client.dropped > 0  # it lost its oldest messages instead of holding anyone up
        srv.publish_status(P.status())
        # the good client's status says it dropped nothing
        st = await _recv(good)
        assert st["type"] == "status" and st["dropped"] == 0 and st["dropped_total"] >= stuck_client.dropped
        await good.close()
        stuck.close()
        await srv.close()
    asyncio.run(main())


def test_wrong_or_missing_token_is_refused_with_a_close_code():
    async def main():
        srv = _server(token="s3cret")
        await srv.start()
        for url, headers in [(srv.url, None), (srv.url + "/?token=nope", None),
                             (srv.url, {"Authorization": "Bearer nope"})]:
            async with connect(url, additional_headers=headers) as ws:
                with pytest.raises(ConnectionClosed) as e:
                    await _recv(ws)
                assert e.value.rcvd.code == P.CLOSE_UNAUTHORIZED
        async with connect(srv.url + "/?token=s3cret") as ws:
            assert (await _recv(ws))["type"] == "hello"
        async with connect(srv.url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert (await _recv(ws))["type"] == "hello"
        assert srv.refused == 3
        await srv.close()
    asyncio.run(main())


def test_garbage_from_a_client_gets_an_error_and_the_server_goes_on():
    async def main():
        srv = _server(max_message_bytes=1024)
        await srv.start()
        async with connect(srv.url) as ws, connect(srv.url) as other:
            await _recv(ws)
            await _recv(other)
            for junk in ["not json", "[1,2]", json.dumps({"type": "launch"}), json.dumps({"type": "ping", "v": 99}),
                         json.dumps({"type": "subscribe", "stream": 5}), b"\x00\x01binary"]:
                await ws.send(junk)
                m = await _recv(ws)
                assert m["type"] == "error" and m["code"] in P.ERROR_CODES and m["message"]
            await ws.send("x" * 5000)  # over the text limit: an error, the connection goes on
            m = await _recv(ws)
            assert m["code"] == "bad_message" and "at most 1024" in m["message"]
            await ws.send("x" * 70_000)  # over any frame the server takes: that connection is closed (1009) ...
            with pytest.raises(ConnectionClosed) as e:
                await _recv(ws)
            assert e.value.rcvd.code == 1009
            srv.publish(_pred(1))  # ... and the other one is still served
            assert (await _recv(other))["seq"] == 1
        assert srv.bad_messages_total == 7
        await srv.close()
    asyncio.run(main())


def test_subscribe_to_one_stream():
    async def main():
        srv = _server()
        await srv.start()
        async with connect(srv.url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.subscribe("s2")))
            await asyncio.sleep(0.1)
            for i, s in enumerate(["s1", "s2", "s1", "s2"], start=1):
                m = _pred(i)
                m["stream"] = s
                srv.publish(m, stream=s)
            assert [(await _recv(ws))["seq"] for _ in range(2)] == [2, 4]
        await srv.close()
    asyncio.run(main())


def test_each_prediction_reaches_exactly_the_followers_of_its_stream_and_of_every_stream():
    """The server keeps its clients indexed by what they follow (a prediction is not checked against every
    client): a client that changes its subscription moves, one that follows nothing gets no prediction but
    still what goes to everyone, and a client that leaves is in no index."""
    async def main():
        srv = _server()
        await srv.start()
        every, s1, mover, nothing = [await connect(srv.url) for _ in range(4)]
        for ws in (every, s1, mover, nothing):
            await _recv(ws)
        await s1.send(P.encode(P.subscribe("s1")))
        await mover.send(P.encode(P.subscribe("s1")))
        await nothing.send(P.encode(P.subscribe(P.NO_STREAMS)))
        await mover.send(P.encode(P.subscribe("s2")))  # from s1 to s2
        await asyncio.sleep(0.2)
        for i, s in enumerate(["s1", "s2", "s3", "s2"], start=1):
            m = _pred(i)
            m["stream"] = s
            srv.publish(m, stream=s)
        srv.publish(P.end("x"))  # to everyone (no stream)

        async def seqs(ws):
            got = []
            while (m := await _recv(ws))["type"] != "end":
                got.append(m["seq"])
            return got
        assert await seqs(every) == [1, 2, 3, 4]
        assert await seqs(s1) == [1]
        assert await seqs(mover) == [2, 4]
        assert await seqs(nothing) == []
        for ws in (every, s1, mover, nothing):
            await ws.close()
        for _ in range(100):
            if not srv.clients:
                break
            await asyncio.sleep(0.02)
        assert not srv.clients and srv._followers == {}  # nobody left behind in an index
        await srv.close()
    asyncio.run(main())


def test_close_sends_end_and_closes_cleanly():
    async def main():
        srv = _server()
        await srv.start()
        async with connect(srv.url) as ws:
            await _recv(ws)
            await srv.close("source ended")
            m = await _recv(ws)
            assert m == {"type": "end", "reason": "source ended", "v": P.PROTOCOL_VERSION}
            with pytest.raises(ConnectionClosed) as e:
                await _recv(ws)
            assert e.value.rcvd.code == P.CLOSE_GOING_AWAY
    asyncio.run(main())


def test_a_hop_of_more_streams_than_the_queue_reaches_an_all_streams_subscriber_whole():
    """Each hop publishes one prediction per stream at once. A subscriber to every stream may queue
    ``queue_size`` messages per stream, so a hop of 40 streams through a queue of 16 arrives whole (a fixed
    bound dropped 24 of every such hop however fast the subscriber read); a subscriber to one stream keeps
    the plain bound, and drops the oldest beyond it."""
    streams = [f"p{k}" for k in range(40)]

    async def main():
        srv = _server(flow=FlowControl(queue_size=16), streams=lambda: streams)
        await srv.start()
        everything, one = await connect(srv.url), await connect(srv.url)
        for ws in (everything, one):
            assert (await _recv(ws))["type"] == "hello"
        await one.send(P.encode(P.subscribe("p3")))
        await asyncio.sleep(0.2)  # the subscription is in
        for hop in range(2):
            for sid in streams:  # one hop: every stream's prediction, published back to back
                msg = _pred(hop + 1)
                msg["stream"] = sid
                srv.publish(msg, sid)
                if sid == "p20":  # a status in the middle of a hop pushes no prediction out either
                    srv.publish_status(P.status())
            for _ in range(20):  # p3's subscriber: 20 more predictions than its queue holds
                msg = _pred(100 + _)
                msg["stream"] = "p3"
                srv.publish(msg, "p3")
        got = [await _recv(everything) for _ in range(2 * (len(streams) + 20 + 1))]
        preds = [m for m in got if m["type"] == "prediction"]
        assert [m["stream"] for m in preds[:len(streams)]] == streams  # the whole first hop, in order
        statuses = [m for m in got if m["type"] == "status"]
        assert len(preds) == 2 * (len(streams) + 20) and len(statuses) == 2
        assert [m["dropped"] for m in statuses] == [0, 0]
        mine = []
        try:
            while True:
                mine.append(await _recv(one, timeout=1.0))
        except asyncio.TimeoutError:
            pass
        mine = [m for m in mine if m["type"] == "prediction"]
        assert len(mine) <= 16 and mine[-1]["seq"] == 119  # its queue kept the newest (statuses took 2 places)
        for ws in (everything, one):
            await ws.close()
        await srv.close()
        return srv.dropped_total

    assert asyncio.run(main()) == 2 * (1 + 20 + 1) - 16  # only the one-stream subscriber lost any


@pytest.mark.parametrize("compress", [False, True])
def test_websocket_compression_only_when_asked_for(compress):
    """Clients offer permessage-deflate by default; the server takes it only with ``compress``
    (``--compress``): otherwise every producer's audio frame would be deflated by the client and inflated by
    the server, and every prediction deflated for every subscriber. Messages arrive either way."""
    async def main():
        srv = _server(compress=compress)
        await srv.start()
        async with connect(srv.url) as ws:  # offers permessage-deflate, as websockets clients do by default
            assert (await _recv(ws))["type"] == "hello"
            srv.publish(_pred(1))
            assert (await _recv(ws))["seq"] == 1
            names = [type(e).__name__ for e in ws.protocol.extensions]
        await srv.close()
        return names

    assert asyncio.run(main()) == (["PerMessageDeflate"] if compress else [])
