"""``stream-ser live``: source -> recognizer (worker thread) -> websocket broadcaster + dashboard.

The recognizer runs in its own thread (torch releases the GIL), so the asyncio
loop that serves the websocket stays responsive. Predictions cross to the loop
with ``call_soon_threadsafe``; the same protocol messages go to subscribers and
to the in-process dashboard.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections import deque

from . import __version__
from . import protocol as P
from .capture import POLL_S
from .recognizer import StreamingRecognizer
from .server import Broadcaster

STATUS_EVERY_S = 1.0
LATENCY_WINDOW = 200  # predictions in the latency percentiles


class LiveApp:
    def __init__(self, model, source, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 dashboard: bool = True, log_lines: bool = False, wait_for_subscriber: bool = False,
                 queue_size: int = 256, out=None, console=None):
        self.model = model
        self.source = source
        self.recognizer = StreamingRecognizer(model)
        self.dashboard_on = dashboard
        self.log_lines = log_lines
        self.wait_for_subscriber = wait_for_subscriber
        self.out = out or sys.stdout
        self.console = console
        cfg = model.frontend_config
        self.broadcaster = Broadcaster(self._hello, host, port, token, queue_size)
        self.hello_msg = P.hello(list(model.labels), model.describe(), cfg.to_dict(), cfg.hop_s,
                                 cfg.utterance_s,
                                 server=f"stream_ser {__version__}")
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._dash = None
        self.error: BaseException | None = None

    def _hello(self) -> dict:
        return self.hello_msg

    # --- worker thread --------------------------------------------------------------
    def _work(self, loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        try:
            while not self._stop.is_set():
                got = self.source.read()
                if got is None:
                    if self.source.finished:
                        break
                    time.sleep(POLL_S)
                    continue
                samples, arrival = got
                for p in self.recognizer.push(samples, arrival):
                    loop.call_soon_threadsafe(self._on_prediction, p.to_dict())
        except BaseException as e:  # surfaced by run(); the loop must still end
            self.error = e
        finally:
            loop.call_soon_threadsafe(done.set)

    # --- loop thread ----------------------------------------------------------------
    def _on_prediction(self, pred: dict) -> None:
        self.latencies.append(pred["timings_ms"]["total"])
        msg = P.prediction(pred)
        self.broadcaster.publish(msg, pred.get("stream"))
        if self._dash is not None:
            self._dash.update(msg)
        if self.log_lines:
            t = pred["timings_ms"]
            print(f"#{pred['seq']:<5d} {pred['window_start_s']:7.2f}-{pred['window_end_s']:7.2f} s  "
                  f"{pred['label']:<10s} {100 * pred['confidence']:5.1f}%  activity {100 * pred['speech_activity']:3.0f}%"
                  f"  latency {t['total']:6.1f} ms (front-end {t['frontend']:.1f}, CNN {t['embed']:.1f}, "
                  f"head {t['head']:.1f})", file=self.out, flush=True)

    def status_message(self) -> dict:
        src = self.source.stats()
        return P.status(overruns=src.get("overruns", 0), lost_samples=src.get("lost_samples", 0),
                        dropped_total=self.broadcaster.dropped_total, subscribers=len(self.broadcaster.clients),
                        latency_ms=P.percentiles(self.latencies), source=self.source.name,
                        uptime_s=time.monotonic() - self._t0, counters=self.recognizer.counters,
                        portaudio_status=src.get("portaudio_status", {}))

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            msg = self.status_message()
            self.broadcaster.publish_status(msg)
            if self._dash is not None:
                self._dash.update(msg)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests), or Windows
                pass
        await self.broadcaster.start()
        print(f"stream_ser {__version__}: websocket {self.broadcaster.url}  model: {self.model.describe()}  "
              f"source: {self.source.name}", file=self.out, flush=True)
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
        if self.dashboard_on:
            from .dashboard import LiveDashboard
            self._dash = LiveDashboard(self.console, self.broadcaster.url).__enter__()
            self._dash.update(self.hello_msg)
        done = asyncio.Event()
        self.source.start()
        worker = threading.Thread(target=self._work, args=(loop, done), name="recognizer", daemon=True)
        worker.start()
        status_task = asyncio.create_task(self._status_loop())
        waiters = {asyncio.create_task(done.wait()), asyncio.create_task(stop.wait())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        interrupted = stop.is_set()
        self._stop.set()
        self.source.stop()
        await asyncio.get_running_loop().run_in_executor(None, worker.join, 5)
        status_task.cancel()
        final = self.status_message()
        self.broadcaster.publish_status(final)
        reason = "stopped" if interrupted else ("error" if self.error else "source ended")
        if self._dash is not None:
            self._dash.update(final)
            self._dash.update(P.end(reason))
            self._dash.__exit__(None, None, None)
        await self.broadcaster.close(reason)
        c = self.recognizer.counters
        print(f"{reason}: {c['predictions']} predictions, {c['segments_seen']} segments, "
              f"{c['segments_embedded']} embedded ({c['segments_embedded'] / max(c['segments_seen'], 1):.2f} per segment); "
              f"overruns {final['overruns']}; latency {final['latency_ms']}", file=self.out, flush=True)
        if self.error is not None:
            raise self.error
        return 0
