"""The hostile-input suite (issue 14): a real server on loopback, real websocket clients, real files.

Every case asserts the documented code or message (``docs/reliability.md``), that a
bystander subscriber's predictions go on meanwhile, and that a new client is
still served afterwards. Loops are bounded; each case takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stream_ser import protocol as P
from stream_ser.cli import main as cli_main
from stream_ser.config import FrontendConfig
from stream_ser.model import CheckpointError, EmotionModel, load_checkpoint, save_checkpoint
from stream_ser.server import Broadcaster, ProducerLimits, FlowControl
from bench.clients import stuck_client as _stuck_client

TOKEN = "s3cret"


async def _recv(ws, timeout=5.0):
    return P.decode(await asyncio.wait_for(ws.recv(), timeout), allowed=P.SERVER_TYPES)


async def _recv_until(ws, kind, timeout=5.0):
    """Messages until one of type ``kind`` (returned); statuses and predictions in between are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        m = await _recv(ws, max(0.05, deadline - time.monotonic()))
        if m["type"] == kind:
            return m


async def _closed_code(ws, timeout=5.0):
    """Read until the server closes; the close code it sent."""
    with pytest.raises(ConnectionClosed) as e:
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.wait_for(ws.recv(), max(0.05, deadline - time.monotonic()))
    return e.value.rcvd.code if e.value.rcvd else None


class Harness:
    """A producer-enabled broadcaster, a ticker publishing 20 predictions/s on stream ``local``,
    and a bystander subscriber that must keep receiving them whatever a case does."""

    def __init__(self, **kw):
        self.audio: dict[str, bytearray] = {}
        self.srv = Broadcaster(lambda: P.hello(["a", "b"], "test", {}, 0.32, 3.0, streams=["local"]), port=0,
                               on_producer=self._on_producer, on_audio=self._on_audio,
                               streams=lambda: ["local", *self.audio], **kw)
        self.seq = 0

    def _on_producer(self, client, rate):
        sid = f"p{client.id}"
        self.audio[sid] = bytearray()
        return sid

    def _on_audio(self, client, data):
        self.audio[client.producer.stream_id] += data

    async def _tick(self):
        while True:
            self.seq += 1
            self.srv.publish({"type": "prediction", "seq": self.seq, "t": time.monotonic(), "stream": "local",
                              "label": "a", "probabilities": {"a": 0.6, "b": 0.4}}, "local")
            await asyncio.sleep(0.05)

    async def __aenter__(self):
        await self.srv.start()
        self.ticker = asyncio.create_task(self._tick())
        self.bystander = await connect(self.srv.url + f"/?token={TOKEN}" if self.srv.token else self.srv.url,
                                       max_size=None)
        assert (await _recv(self.bystander))["type"] == "hello"
        self.bystander_seqs: list[int] = []
        self.reader = asyncio.create_task(self._read_bystander())
        return self

    async def _read_bystander(self):
        while True:
            m = await _recv(self.bystander, timeout=60)
            if m["type"] == "prediction" and m["seq"] > 0:
                self.bystander_seqs.append(m["seq"])

    async def healthy(self):
        """The bystander still gets fresh predictions, none lost; a new client gets a hello."""
        before = self.seq
        deadline = time.monotonic() + 5
        while not (self.bystander_seqs and self.bystander_seqs[-1] > before) and time.monotonic() < deadline:
            assert not self.reader.done(), self.reader.exception()
            await asyncio.sleep(0.02)
        assert self.bystander_seqs[-1] > before
        first = self.bystander_seqs[0]
        assert self.bystander_seqs == list(range(first, first + len(self.bystander_seqs)))
        url = self.srv.url + (f"/?token={TOKEN}" if self.srv.token else "")
        async with connect(url) as ws:
            assert (await _recv(ws))["type"] == "hello"

    async def __aexit__(self, *exc):
        self.ticker.cancel()
        self.reader.cancel()
        await self.bystander.close()
        await self.srv.close(drain_s=0.1)


def run(case, **kw):
    async def main():
        async with Harness(**kw) as h:
            await case(h)
            await h.healthy()
    asyncio.run(main())


# --- authentication ------------------------------------------------------------------
@pytest.mark.parametrize("path,headers", [
    ("", None), ("/?token=", None), ("/?token=nope", None), (f"/?token={TOKEN}x", None),
    ("", {"Authorization": "Bearer nope"}), ("", {"Authorization": f"Basic {TOKEN}"}),
    ("/?token=%00", None)], ids=["none", "empty", "wrong", "prefix", "bearer", "basic", "nul"])
def test_every_wrong_token_form_is_closed_4401(path, headers):
    async def case(h):
        async with connect(h.srv.url + path, additional_headers=headers) as ws:
            assert await _closed_code(ws) == P.CLOSE_UNAUTHORIZED
        assert h.srv.refused == 1
    run(case, token=TOKEN)


# --- malformed messages ---------------------------------------------------------------
@pytest.mark.parametrize("junk", [
    "not json", "[1,2]", "null", json.dumps({"type": "launch"}), json.dumps({"type": "ping", "v": 99}),
    json.dumps({"type": "subscribe", "stream": 5}), "[" * 30_000 + "]" * 30_000,
    '{"type": "ping", "x": ' + "[" * 5000 + "]" * 5000 + "}", "\ud800".encode("utf-8", "surrogatepass").hex(),
    "x" * 66_000], ids=["text", "array", "null", "type", "version", "stream-type", "deep-array", "deep-field",
                      "hex", "oversize-text"])
def test_garbage_text_gets_bad_message_and_the_connection_goes_on(junk):
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(junk)
            m = await _recv_until(ws, "error")
            assert m["code"] == "bad_message" and m["message"] and len(m["message"]) < 300
            await ws.send(P.encode({"type": "ping"}))  # the same connection still works
            assert (await _recv_until(ws, "status"))["subscribers"] >= 2
    run(case)


def test_a_frame_over_every_limit_closes_only_that_connection_1009():
    async def case(h):
        async with connect(h.srv.url, max_size=None) as ws:
            await _recv(ws)
            await ws.send("x" * (h.srv.limits.max_frame_bytes + 10_000))
            assert await _closed_code(ws) == 1009
    run(case)


def test_unknown_stream_gets_unknown_stream_and_keeps_the_subscription():
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.subscribe("local")))
            await ws.send(P.encode(P.subscribe("p999")))
            m = await _recv_until(ws, "error")
            assert m["code"] == "unknown_stream" and "local" in m["message"]
            assert (await _recv_until(ws, "prediction"))["stream"] == "local"
    run(case)


def test_binary_audio_to_a_server_without_producers_is_not_allowed():
    async def main():
        srv = Broadcaster(lambda: P.hello(["a"], "t", {}, 0.32, 3.0), port=0)
        await srv.start()
        async with connect(srv.url) as ws:
            await _recv(ws)
            await ws.send(b"\x00\x01" * 100)
            assert (await _recv_until(ws, "error"))["code"] == "not_allowed"
            await ws.send(P.encode(P.audio_header(16000)))
            assert (await _recv_until(ws, "error"))["code"] == "not_allowed"
        await srv.close()
    asyncio.run(main())


# --- producers ----------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0, -1, "16000", 10**9, True, 16000.5, None], ids=str)
def test_a_refused_audio_header_ends_the_connection_4400_instead_of_guessing(rate):
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(json.dumps({"type": "audio", "rate": rate}))
            m = await _recv_until(ws, "error")
            assert m["code"] == "bad_audio" and "rate" in m["message"]
            try:
                await ws.send(b"\x00\x00" * 160)  # what used to start a silent 16 kHz stream
            except ConnectionClosed:
                pass
            assert await _closed_code(ws) == P.CLOSE_BAD_REQUEST
        assert h.audio == {}  # no stream was started
    run(case)


def test_odd_byte_count_is_bad_audio_and_the_producer_goes_on():
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.audio_header(16000)))
            sid = (await _recv_until(ws, "stream"))["stream"]
            await ws.send(b"\x01\x02\x03")
            assert (await _recv_until(ws, "error"))["code"] == "bad_audio"
            await ws.send(b"\x01\x02" * 800)
            await asyncio.sleep(0.2)
            assert bytes(h.audio[sid]) == b"\x01\x02" * 800
    run(case)


def test_frame_limits_agree_with_the_pace_limit():
    """The default 64000-byte frame (2 s at 16 kHz) is accepted as a first frame; one byte more is not."""
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.audio_header(16000)))
            sid = (await _recv_until(ws, "stream"))["stream"]
            await ws.send(b"\x00\x00" * 32_000)
            await asyncio.sleep(0.3)
            assert len(h.audio[sid]) == 64_000 and h.srv.bad_messages_total == 0
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(b"\x00\x00" * 32_001)
            assert (await _recv_until(ws, "error"))["code"] == "frame_too_large"
            assert await _closed_code(ws) == P.CLOSE_PRODUCER_LIMIT
    run(case)


def test_large_frame_limits_are_honoured_not_preempted_by_the_websocket_library():
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.audio_header(16000)))
            sid = (await _recv_until(ws, "stream"))["stream"]
            await ws.send(b"\x00\x00" * 100_000)  # 200 kB: over the library's default 64 KiB, under ours
            await asyncio.sleep(0.3)
            assert len(h.audio[sid]) == 200_000
    run(case, limits=ProducerLimits(max_frame_bytes=400_000))


def test_a_producer_faster_than_real_time_is_cut_off_4429():
    async def case(h):
        async with connect(h.srv.url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.audio_header(16000)))
            await _recv_until(ws, "stream")
            try:
                for _ in range(20):  # 0.5 s frames, as fast as the socket takes them
                    await ws.send(b"\x00\x00" * 8000)
            except ConnectionClosed:
                pass
            m = await _recv_until(ws, "error")
            assert m["code"] == "too_fast" and "real time" in m["message"]
            assert await _closed_code(ws) == P.CLOSE_PRODUCER_LIMIT
    run(case)


def test_twenty_producers_each_get_exactly_their_own_audio():
    async def produce(url, k):
        async with connect(url) as ws:
            await _recv(ws)
            await ws.send(P.encode(P.audio_header(16000)))
            sid = (await _recv_until(ws, "stream"))["stream"]
            await ws.send(P.encode(P.subscribe(P.NO_STREAMS)))
            frame = np.full(1600, k, dtype="<i2").tobytes()  # 0.1 s of the value k
            for i in range(8):
                await ws.send(frame)
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)
            return sid, frame * 8

    async def case(h):
        got = await asyncio.gather(*(produce(h.srv.url, k) for k in range(1, 21)))
        assert len({sid for sid, _ in got}) == 20
        for sid, sent in got:
            assert bytes(h.audio[sid]) == sent
    run(case)


def test_a_producer_killed_mid_stream_leaves_the_server_serving(tmp_path):
    script = tmp_path / "producer.py"
    script.write_text(
        "import asyncio, sys\n"
        "from websockets.asyncio.client import connect\n"
        "async def main():\n"
        "    async with connect(sys.argv[1]) as ws:\n"
        "        await ws.recv()\n"
        "        await ws.send('{\"type\": \"audio\", \"rate\": 16000}')\n"
        "        await ws.recv()\n"
        "        print('streaming', flush=True)\n"
        "        while True:\n"
        "            await ws.send(b'\\x01\\x00' * 1600)\n"
        "            await asyncio.sleep(0.1)\n"
        "asyncio.run(main())\n")

    async def case(h):
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), h.srv.url,
                                                    stdout=subprocess.PIPE)
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"streaming"
        await asyncio.sleep(0.5)
        proc.kill()  # SIGKILL: no close frame
        await proc.wait()
        deadline = time.monotonic() + 5
        while len(h.srv.clients) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(h.srv.clients) == 1  # only the bystander: the dead producer was noticed and removed
        assert len(next(iter(h.audio.values()))) > 0
    run(case)


# --- sockets that do not behave --------------------------------------------------------
def test_idle_and_half_open_sockets_do_not_block_anyone():
    async def case(h):
        idle = []
        for _ in range(100):  # TCP connections that never send a handshake
            s = socket.socket()
            s.connect(("127.0.0.1", h.srv.port))
            idle.append(s)
        stuck = [await asyncio.to_thread(_stuck_client, h.srv.port) for _ in range(5)]  # handshake, never read
        await h.healthy()
        for s in idle + stuck:
            s.close()
    run(case)


def test_a_slow_subscriber_has_bounded_lag_is_told_what_it_lost_and_others_get_everything():
    """One message read every 0.1 s while 20/s are published: what it reads is never older than the
    bound (max_lag_s plus what the acknowledgement window lets into the socket), and it is told its drops."""
    async def case(h):
        async with connect(h.srv.url) as slow, connect(h.srv.url) as fast:
            await _recv(slow)
            await _recv(fast)
            seen_fast = []
            lags = []
            dropped = 0

            async def read_fast():
                while True:
                    m = await _recv(fast)
                    if m["type"] == "prediction":
                        seen_fast.append(m["seq"])

            reader = asyncio.create_task(read_fast())
            t_end = time.monotonic() + 6.0
            while time.monotonic() < t_end:
                m = await _recv(slow)
                if m["type"] == "prediction":
                    lags.append(time.monotonic() - m["t"])
                elif m["type"] == "status":
                    dropped = max(dropped, m["dropped"])
                await asyncio.sleep(0.1)
            reader.cancel()
            h.srv.publish_status(P.status())
            while True:  # its next status says what it lost
                m = await _recv(slow)
                if m["type"] == "status":
                    dropped = max(dropped, m["dropped"])
                    break
            bound = h.srv.flow.max_lag_s + h.srv.flow.ack_every * h.srv.flow.ack_window * 0.1 + 1.0
            assert max(lags) < bound, (max(lags), bound)
            assert dropped > 0
            assert seen_fast == list(range(seen_fast[0], seen_fast[0] + len(seen_fast)))  # nothing lost
            assert len(seen_fast) > 90
    run(case, flow=FlowControl(max_lag_s=1.0))


def test_a_subscriber_that_stops_reading_is_closed_4408_past_the_limit():
    async def case(h):
        stuck = await asyncio.to_thread(_stuck_client, h.srv.port)
        for i in range(200):  # big messages so its buffers fill in a moment
            h.srv.publish({"type": "prediction", "seq": -i, "pad": "x" * 20_000}, "local")
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + h.srv.flow.slow_close_s + 5
        while h.srv.slow_closed == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert h.srv.slow_closed == 1
        while len(h.srv.clients) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(h.srv.clients) == 1
        stuck.close()
    run(case, flow=FlowControl(slow_close_s=1.0))


# --- the command line and checkpoints ---------------------------------------------------
@pytest.mark.parametrize("args,expect", [
    (["--queue-size", "0"], "at least 1"), (["--port", "70000"], "0-65535"),
    (["--max-frame-bytes", "0"], "at least 1"), (["--max-frame-bytes", "2000000"], "2..1048576"),
    (["--device", "tpu"], "device must be"), (["--host", "0.0.0.0"], "without --token"),
    (["--host", "0.0.0.0", "--producers"], "push audio"), (["--checkpoint", "/etc/passwd"], "not a readable")],
    ids=["queue0", "port", "frame0", "frame-huge", "device", "host", "host-producers", "checkpoint"])
def test_bad_live_values_are_one_line_and_exit_2(args, expect, capsys):
    try:
        code = cli_main(["live", "--source", "none", "--no-dashboard", *args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err, err


def _tiny_checkpoint(path, **frontend):
    torch.manual_seed(0)
    return save_checkpoint(EmotionModel(FrontendConfig(image_size=64, **frontend)), path)


def test_a_model_that_cannot_stream_is_refused_before_serving(tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "utt.pt", normalization="utterance")
    code = cli_main(["live", "--source", "none", "--producers", "--no-dashboard", "--checkpoint", str(ck)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot stream" in err and "Traceback" not in err


def test_nan_weights_are_refused_at_load(tmp_path):
    model = EmotionModel(FrontendConfig(image_size=64))
    with torch.no_grad():
        next(model.head.parameters()).fill_(float("nan"))
    ck = save_checkpoint(model, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        load_checkpoint(ck)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"format": "stream_ser", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_non_finite_model_output_is_reported_never_serialised(tmp_path):
    """A model that turns NaN after loading (the guard behind the load check): subscribers get
    ``bad_output`` errors, no prediction carries NaN, and the app ends normally."""
    from stream_ser.capture import FileSource
    from stream_ser.live import LiveApp

    wav = tmp_path / "tone.wav"
    import soundfile as sf
    t = np.arange(16000 * 4) / 16000
    sf.write(wav, 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    model = EmotionModel(FrontendConfig(image_size=64)).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.fill_(float("nan"))

    async def main():
        app = LiveApp(model, FileSource(str(wav), realtime=False), port=0, dashboard=False,
                      wait_for_subscriber=True, out=open(os.devnull, "w"))
        task = asyncio.create_task(app.run())
        while app.broadcaster._server is None:
            await asyncio.sleep(0.01)
        msgs = []
        async with connect(app.broadcaster.url) as ws:
            try:
                while True:
                    m = await _recv(ws, timeout=30)
                    msgs.append(m)
                    if m["type"] == "end":
                        break
            except ConnectionClosed:
                pass
        assert await task == 0
        return msgs

    msgs = asyncio.run(main())
    assert not [m for m in msgs if m["type"] == "prediction"]
    errors = [m for m in msgs if m["type"] == "error"]
    assert errors and all(m["code"] == "bad_output" for m in errors)


def _bad_files(d: Path) -> dict[str, Path]:
    import soundfile as sf
    t = np.arange(16000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    files = {}
    files["empty"] = d / "empty.wav"
    sf.write(files["empty"], np.zeros(0), 16000)
    files["nan"] = d / "nan.wav"
    x = tone.copy()
    x[100] = np.nan
    sf.write(files["nan"], x, 16000, subtype="FLOAT")
    files["huge"] = d / "huge.wav"
    sf.write(files["huge"], tone * 1e30, 16000, subtype="DOUBLE")
    files["garbage"] = d / "garbage.wav"
    files["garbage"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(500))
    files["text"] = d / "notes.wav"
    files["text"].write_text("not audio at all\n")
    return files


@pytest.mark.parametrize("kind", ["empty", "nan", "huge", "garbage", "text"])
def test_bad_audio_files_are_one_line_errors_live_and_in_file_mode(kind, tmp_path, capsys, emodb_wav):
    path = _bad_files(tmp_path)[kind]
    code = cli_main(["live", "--source", str(path), "--no-dashboard", "--fast", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "Traceback" not in err, err
    # file mode reports the bad file and goes on with the good one (real speech)
    good = emodb_wav("16b01Tb")
    code = cli_main(["file", str(path), str(good), "--json"])
    cap = capsys.readouterr()
    lines = [json.loads(x) for x in cap.out.splitlines()]
    assert code == 1 and len(lines) == 2 and "error" in lines[0] and lines[1]["label"] is not None


def test_cli_glitches_fixed(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0 and "stream_ser" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["live", "--no-dashbord"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "stream-ser live: error: unrecognized arguments: --no-dashbord" in err
    with pytest.raises(SystemExit):
        cli_main(["live", "--help"])
    out = capsys.readouterr().out
    assert "--quiet" in out and "(default: True)" not in out and "(default: False)" not in out


def test_odd_rate_files_are_resampled_by_soxr(tmp_path):
    import soundfile as sf
    from stream_ser.audio import load_audio
    path = tmp_path / "odd.wav"
    sf.write(path, 0.1 * np.sin(2 * np.pi * 440 * np.arange(24414 * 2) / 24414), 24414)
    x = load_audio(path).numpy()
    assert abs(len(x) - 32000) <= 1
    spectrum = np.abs(np.fft.rfft(x[4000:-4000]))
    assert abs(np.argmax(spectrum) * 16000 / len(x[4000:-4000]) - 440) < 2  # the tone kept its pitch
