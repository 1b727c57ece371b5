"""``stream-ser live``: source -> recognizer (worker thread) -> websocket broadcaster + dashboard.

The recognizer runs in its own thread (torch releases the GIL), so the asyncio
loop that serves the websocket stays responsive. Predictions cross to the loop
with ``call_soon_threadsafe``; the same protocol messages go to subscribers and
to the in-process dashboard.
"""

from __future__ import annotations

import asyncio
import math
import queue
import signal
import sys
import threading
import time
from collections import deque

from . import __version__
from . import protocol as P
import numpy as np

from .capture import POLL_S
from .engine import MultiStreamEngine
from .recognizer import check_streamable
from .server import Broadcaster, Client, FlowControl, ProducerLimits

STATUS_EVERY_S = 1.0
LATENCY_WINDOW = 200  # predictions in the latency percentiles
LOCAL = "local"  # stream id of the microphone / file source


class ProducerStreams:
    """Websocket producers as engine streams: one stream per producer, its audio resampled to the model's
    rate (python-soxr, streaming) and fed in; removed when the producer goes. Called on the loop thread."""

    def __init__(self, engine: MultiStreamEngine, sample_rate: int, adapt: bool, vad: bool):
        self.engine = engine
        self.sample_rate = sample_rate
        self.adapt = adapt
        self.vad = vad
        self._resamplers: dict[str, object] = {}

    def add(self, client: Client, rate: int) -> str:
        sid = f"p{client.id}"
        self.engine.add_stream(sid, adapt=self.adapt, vad=self.vad)
        if rate != self.sample_rate:
            import soxr
            self._resamplers[sid] = soxr.ResampleStream(rate, self.sample_rate, 1, dtype="float32")
        return sid

    def audio(self, client: Client, data: bytes) -> None:
        sid = client.producer.stream_id
        x = np.frombuffer(data, dtype="<i2").astype(np.float32)
        x *= 1.0 / 32768.0  # in place: one array a frame, not two (ten frames a second from every producer)
        rs = self._resamplers.get(sid)
        if rs is not None:
            x = rs.resample_chunk(x)
        self.engine.feed(sid, x)

    def remove(self, client: Client) -> None:
        if client.producer is not None:
            self.engine.remove_stream(client.producer.stream_id)
            self._resamplers.pop(client.producer.stream_id, None)


class LineWriter:
    """Log lines written by a thread of their own, so that a terminal or pipe that is read slowly, or not at all
    (a supervisor that never drains stdout), never holds up the event loop that serves the websockets. Up to
    ``max_lines`` wait; beyond that the newest are dropped and counted (``dropped``), and the next line written
    says how many. ``close()`` writes what waits (for up to ``timeout`` s)."""

    def __init__(self, out, max_lines: int = 10_000):
        self.out = out
        self.dropped = 0
        self._told = 0
        self._lines: queue.Queue[str | None] = queue.Queue(max_lines)
        self._thread = threading.Thread(target=self._run, name="log-lines", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (line := self._lines.get()) is not None:
            if self.dropped > self._told:  # (read here, written on the loop thread: a count, not exact)
                line = f"({self.dropped - self._told} log lines dropped: nobody read them in time)\n{line}"
                self._told = self.dropped
            try:
                print(line, file=self.out, flush=True)
            except (OSError, ValueError):  # a closed or broken stream: the lines go nowhere, the server goes on
                pass

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._lines.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


class PredictionOutput:
    """Where each prediction goes (loop thread): subscribers, the dashboard, optional log lines, the latency
    window. Non-finite outputs are never serialised: they are counted and reported as ``bad_output``."""

    def __init__(self, broadcaster: Broadcaster, out, log_lines: bool):
        self.broadcaster = broadcaster
        self.out = out
        self.lines = LineWriter(out) if log_lines else None  # a line per prediction, off the loop's thread
        self.dashboard = None
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.bad_outputs = 0

    def __call__(self, pred: dict) -> None:
        if not all(math.isfinite(v) for v in pred["probabilities"].values()):
            # a broken model (NaN weights) or input it cannot handle: never serialise NaN, say so instead
            self.bad_outputs += 1
            if self.bad_outputs in (1, 10, 100) or self.bad_outputs % 1000 == 0:
                self.broadcaster.publish(P.error("bad_output", f"window {pred['seq']} of stream "
                                                 f"{pred.get('stream', LOCAL)}: non-finite probabilities "
                                                 f"({self.bad_outputs} such windows so far)"), pred.get("stream"))
                print(f"warning: the model produced non-finite probabilities ({self.bad_outputs} windows)",
                      file=sys.stderr, flush=True)
            return
        self.latencies.append(pred["timings_ms"]["total"])
        msg = P.prediction(pred)
        self.broadcaster.publish(msg, pred.get("stream"))
        if self.dashboard is not None:
            self.dashboard.update(msg)
        if self.lines is not None:
            self.lines.write(self.line(pred))

    @staticmethod
    def line(pred: dict) -> str:
        t = pred["timings_ms"]
        return (f"#{pred['seq']:<5d} {pred['window_start_s']:7.2f}-{pred['window_end_s']:7.2f} s  "
                + (f"{pred['label']:<10s} {100 * pred['confidence']:5.1f}%" if pred["speech"] else f"{'(no speech)':<17s}")
                + f"  speech {100 * pred['speech_activity']:3.0f}%"
                f"  latency {t['total']:6.1f} ms (front-end {t['frontend']:.1f}, CNN {t['embed']:.1f}, "
                f"head {t['head']:.1f})" + (f"  speaker stats {pred['adaptation']['speech_s']:.1f} s"
                                           if pred.get("adaptation") else ""))


def _emit_each(loop: asyncio.AbstractEventLoop, emit, preds: list[dict]) -> None:
    """Hand each prediction to ``emit`` (on the loop thread); one that fails is reported as a failing callback
    would be, and the others still go."""
    for pred in preds:
        try:
            emit(pred)
        except Exception as e:  # reported to the loop's exception handler, as a failing callback's is
            loop.call_exception_handler({"message": "a prediction could not be handed on", "exception": e})


class RecognizerWorker:
    """The recognizer thread: reads the local source, steps the engine (all streams batched), hands each
    prediction to ``emit`` on the loop thread, and flushes a final window when the source ends.
    torch releases the GIL, so the loop that serves the websocket stays responsive."""

    def __init__(self, engine: MultiStreamEngine, source, recognizer):
        self.engine = engine
        self.source = source
        self.recognizer = recognizer
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop, emit, done: asyncio.Event) -> None:
        self._thread = threading.Thread(target=self._run, args=(loop, emit, done), name="recognizer", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, loop: asyncio.AbstractEventLoop, emit, done: asyncio.Event) -> None:
        def hand_on(preds):
            if preds:  # one wake-up of the loop for a hop's predictions, not one per stream
                loop.call_soon_threadsafe(_emit_each, loop, emit, [p.to_dict() for p in preds])

        try:
            while not self.stop.is_set():
                got = self.source.read() if self.source is not None else None
                if got is not None:
                    self.engine.feed(LOCAL, got[0], got[1])
                preds = self.engine.step()
                hand_on(preds)
                if got is None and not preds:
                    if self.source is not None and self.source.finished and not self.engine.pending():
                        # the end of the source: a final window for the audio after the last segment
                        n = self.recognizer.flush_samples()
                        if n:
                            self.engine.feed(LOCAL, np.zeros(n, np.float32))
                            hand_on(self.engine.step())
                        break
                    time.sleep(POLL_S)
        except BaseException as e:  # surfaced by LiveApp.run(); the loop must still end
            self.error = e
        finally:
            loop.call_soon_threadsafe(done.set)


class LiveApp:
    """The running recognizer: wires a source and websocket producers (:class:`ProducerStreams`) into one
    :class:`MultiStreamEngine` (their segments and heads are batched together), runs it in a
    :class:`RecognizerWorker`, and sends what it predicts through :class:`PredictionOutput`.
    ``source`` may be None when only websocket producers send audio."""

    def __init__(self, model, source, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 dashboard: bool = True, log_lines: bool = False, wait_for_subscriber: bool = False,
                 queue_size: int = 256, producers: bool = False, limits: ProducerLimits | None = None,
                 out=None, console=None, adapt: bool = True, enroll=None, vad: bool = True, compress: bool = False):
        check_streamable(model)
        self.model = model
        self.source = source
        self.engine = MultiStreamEngine(model)
        self.recognizer = self.engine.add_stream(LOCAL, adapt=adapt, vad=vad) if source is not None else None
        if enroll is not None and self.recognizer is not None:
            self.recognizer.enroll(enroll)
        self.dashboard_on = dashboard
        self.wait_for_subscriber = wait_for_subscriber
        self.out = out or sys.stdout
        self.console = console
        cfg = model.frontend_config
        self.producers = ProducerStreams(self.engine, cfg.sample_rate, adapt, vad)
        self.broadcaster = Broadcaster(self._hello, host, port, token, FlowControl(queue_size=queue_size),
                                       on_producer=self.producers.add if producers else None,
                                       on_audio=self.producers.audio, on_disconnect=self.producers.remove,
                                       limits=limits, streams=self.engine.streams.keys, compress=compress)
        self.output = PredictionOutput(self.broadcaster, self.out, log_lines)
        self.worker = RecognizerWorker(self.engine, source, self.recognizer)
        ad = self.recognizer.segmenter.adaptation_info() if self.recognizer is not None else None
        if ad is None and cfg.normalization == "speaker":
            ad = {"on": adapt, "enrolled": False, "speech_s": 0.0}
        self.hello_msg = P.hello(list(model.labels), model.describe(), cfg.to_dict(), cfg.hop_s, cfg.utterance_s,
                                 streams=[LOCAL] if source is not None else [], server=f"stream_ser {__version__}",
                                 adaptation=ad)
        self._t0 = time.monotonic()

    @property
    def error(self) -> BaseException | None:
        return self.worker.error

    def _hello(self) -> dict:
        return self.hello_msg

    def status_message(self) -> dict:
        src = self.source.stats() if self.source is not None else {}
        return P.status(overruns=src.get("overruns", 0), lost_samples=src.get("lost_samples", 0),
                        dropped_total=self.broadcaster.dropped_total, subscribers=len(self.broadcaster.clients),
                        latency_ms=P.percentiles(self.output.latencies),
                        source=self.source.name if self.source is not None else "websocket producers",
                        uptime_s=time.monotonic() - self._t0, streams=len(self.engine.streams),
                        counters=self.recognizer.counters if self.recognizer else {},
                        portaudio_status=src.get("portaudio_status", {}), bad_outputs=self.output.bad_outputs,
                        slow_closed=self.broadcaster.slow_closed)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            msg = self.status_message()
            self.broadcaster.publish_status(msg)
            if self.output.dashboard is not None:
                self.output.dashboard.update(msg)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests), or Windows
                pass
        await self.broadcaster.start()
        src = self.source.name if self.source is not None else "none (websocket producers only)"
        print(f"stream_ser {__version__}: websocket {self.broadcaster.url}  model: {self.model.describe()}  "
              f"source: {src}", file=self.out, flush=True)
        if self.wait_for_subscriber:
            print("waiting for the first subscriber …", file=self.out, flush=True)
            waiter = asyncio.create_task(self.broadcaster.first_subscriber.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                await self.broadcaster.close("stopped")
                return 0
        dash = None
        if self.dashboard_on:
            from .dashboard import LiveDashboard
            dash = self.output.dashboard = LiveDashboard(self.console, self.broadcaster.url).__enter__()
            dash.update(self.hello_msg)
        done = asyncio.Event()
        if self.source is not None:
            self.source.start()
        self.worker.start(loop, self.output, done)
        status_task = asyncio.create_task(self._status_loop())
        waiters = {asyncio.create_task(done.wait()), asyncio.create_task(stop.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        interrupted = stop.is_set()
        self.worker.stop.set()
        if self.source is not None:
            self.source.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.join, 5)
        self.engine.close()
        status_task.cancel()
        final = self.status_message()
        self.broadcaster.publish_status(final)
        reason = "stopped" if interrupted else ("error" if self.error else "source ended")
        if dash is not None:
            dash.update(final)
            dash.update(P.end(reason))
            dash.__exit__(None, None, None)
        await self.broadcaster.close(reason)
        c = final["counters"] or {"predictions": 0, "segments_seen": 0, "segments_embedded": 0}
        summary = (f"{reason}: {c['predictions']} predictions, {c['segments_seen']} segments, "
                   f"{c['segments_embedded']} embedded ({c['segments_embedded'] / max(c['segments_seen'], 1):.2f} "
                   f"per segment); overruns {final['overruns']}; latency {final['latency_ms']}")
        if self.output.lines is not None:  # after the log lines, through their writer (which may be stuck)
            self.output.lines.write(summary)
            await asyncio.get_running_loop().run_in_executor(None, self.output.lines.close)
        else:
            print(summary, file=self.out, flush=True)
        if self.error is not None:
            raise self.error
        return 0
