"""Websocket producers: their audio becomes a stream; limits give a clean error and leave others alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stream_ser import protocol as P
from stream_ser.model import load_checkpoint
from stream_ser.recognizer import StreamingRecognizer

from test_live_e2e import _start, checkpoint  # noqa: F401  (fixture)

FILE = "16b01Tb"


async def _recv(ws, timeout=30.0):
    return P.decode(await asyncio.wait_for(ws.recv(), timeout), allowed=P.SERVER_TYPES)


async def _produce(url, pcm: np.ndarray, rate: int, frame_s=0.1, speed=1.0):
    """Send 16-bit PCM in frames, paced at ``speed`` x real time; return the assigned stream id and any error."""
    async with connect(url) as ws:
        assert (await _recv(ws))["type"] == "hello"
        await ws.send(P.encode(P.audio_header(rate)))
        m = await _recv(ws)
        assert m["type"] == "stream" and m["rate"] == rate
        sid = m["stream"]
        await ws.send(P.encode(P.subscribe("none")))  # a producer that does not want predictions back
        n = int(frame_s * rate)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            for i in range(0, len(pcm), n):
                await ws.send(pcm[i:i + n].astype("<i2").tobytes())
                due = t0 + (i + n) / rate / speed
                await asyncio.sleep(max(0.0, due - loop.time()))
            await asyncio.sleep(0.8)  # let the last segments through before hanging up
        except ConnectionClosed:
            pass
        errors = []
        try:
            while True:
                msg = await _recv(ws, timeout=1.0)
                if msg["type"] == "error":
                    errors.append(msg)
        except (ConnectionClosed, asyncio.TimeoutError) as e:
            code = e.rcvd.code if isinstance(e, ConnectionClosed) and e.rcvd else None
        return sid, errors, code


async def _follow(url, stream, n, timeout=30.0, idle_s=None):
    """Up to ``n`` predictions; with ``idle_s``, also stop once no prediction came for that long."""
    async with connect(url) as ws:
        await _recv(ws)
        await ws.send(P.encode(P.subscribe(stream)))
        preds = []
        last = None
        while len(preds) < n:
            try:
                m = await _recv(ws, timeout)
            except asyncio.TimeoutError:
                if idle_s is not None and preds:
                    break
                raise
            if m["type"] == "prediction":
                preds.append(m)
                last = asyncio.get_running_loop().time()
            elif idle_s is not None and last is not None and asyncio.get_running_loop().time() - last > idle_s:
                break
        return preds


@pytest.fixture()
def server(checkpoint):  # noqa: F811
    # fp32: with int8 a segment's embedding depends a little on the batch it shares with other streams
    proc, url = _start(["live", "--source", "none", "--producers", "--checkpoint", str(checkpoint),
                        "--no-dashboard", "--port", "0", "--max-frame-bytes", "8000", "--precision", "fp32"])
    yield url
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_producer_stream_equals_a_lone_recognizer_and_fast_producer_is_cut_off(server, checkpoint,  # noqa: F811
                                                                                emodb_wav):
    pcm, rate = sf.read(emodb_wav(FILE), dtype="int16")

    async def main():
        good = asyncio.create_task(_produce(server, pcm, rate))
        await asyncio.sleep(0.3)
        # the good producer is p<N>; follow every stream and keep its predictions
        follower = asyncio.create_task(_follow(server, "*", 200, idle_s=3.0))
        fast = asyncio.create_task(_produce(server, np.tile(pcm, 3), rate, speed=20.0))
        big = asyncio.create_task(_produce(server, pcm, rate, frame_s=0.5))  # 16 000 bytes > 8 000
        return await good, await fast, await big, await follower

    (sid, errs, code), (fsid, ferrs, fcode), (bsid, berrs, bcode), preds = asyncio.run(main())
    assert errs == [] and code in (None, 1000)
    assert [e["code"] for e in ferrs] == ["too_fast"] and fcode == P.CLOSE_PRODUCER_LIMIT
    assert [e["code"] for e in berrs] == ["frame_too_large"] and bcode == P.CLOSE_PRODUCER_LIMIT
    mine = [p for p in preds if p["stream"] == sid]
    assert [p["seq"] for p in mine] == list(range(1, 13))  # 7 partial windows, then 5 full ones
    model = load_checkpoint(checkpoint, precision="fp32")
    lone = StreamingRecognizer(model).push(pcm)
    np.testing.assert_allclose([[p["probabilities"][lab] for lab in model.labels] for p in mine],
                               [[p.probabilities[lab] for lab in model.labels] for p in lone], atol=1e-4)


def test_producer_at_another_rate_is_resampled(server, emodb_wav):
    x, _ = sf.read(emodb_wav(FILE), dtype="float32")
    t = np.arange(int(len(x) * 8000 / 16000))
    pcm8 = (np.interp(t * 2.0, np.arange(len(x)), x) * 32767).astype(np.int16)

    async def main():
        prod = asyncio.create_task(_produce(server, pcm8, 8000))
        await asyncio.sleep(0.3)
        preds = await _follow(server, "*", 9)
        return await prod, preds

    (sid, errs, _), preds = asyncio.run(main())
    assert errs == [] and [p["stream"] for p in preds] == [sid] * 9
    full = [p for p in preds if not p["partial"]]
    assert full and all(p["speech_activity"] > 0.3 and p["speech"] for p in full)


def test_audio_is_refused_without_producers(checkpoint, emodb_wav):  # noqa: F811
    proc, url = _start(["live", "--source", str(emodb_wav(FILE)), "--checkpoint", str(checkpoint),
                        "--no-dashboard", "--port", "0", "--loop"])

    async def main():
        async with connect(url) as ws:
            await _recv(ws)
            await ws.send(b"\x00\x00" * 100)
            while True:
                m = await _recv(ws)
                if m["type"] == "error":
                    return m

    try:
        err = asyncio.run(main())
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert err["code"] == "not_allowed" and "--producers" in err["message"]
