"""Audio capture: a lock-free ring buffer, the microphone (PortAudio via sounddevice) and file replay.

The audio callback only copies into a preallocated :class:`RingBuffer` (no
locks, no allocation beyond the view PortAudio hands us); everything else —
resampling, the front-end, the model — happens on the reader's side. Overruns
(the reader fell a whole buffer behind) are counted and reported, never hidden.

Every source has the same reader interface: ``start()``, ``read() -> (samples at
16 kHz, arrival time) or None``, ``finished``, ``stats()``, ``stop()``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from .audio import TARGET_RATE_HZ, load_audio

POLL_S = 0.002  # reader poll interval: waiting on an Event would take a lock in the callback


class CaptureError(RuntimeError):
    """The audio input cannot be used; the message says how to fix it."""


class RingBuffer:
    """Single-writer / single-reader float32 ring buffer.

    ``written`` and ``read_pos`` are monotonic sample counts, each owned by one
    side (a Python int assignment is atomic). When the writer laps the reader, the
    reader notices, counts the lost samples as an overrun and skips to the oldest
    sample still intact.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, np.float32)
        self.written = 0  # writer-owned
        self.last_write_time = 0.0  # writer-owned: perf_counter() after the latest write
        self.read_pos = 0  # reader-owned
        self.overruns = 0  # reader-owned: times the reader found data overwritten
        self.lost_samples = 0

    # writer side: called from the audio callback
    def write(self, x: np.ndarray) -> None:
        n = x.shape[0]
        if n > self.capacity:
            x = x[n - self.capacity:]
            self.written += n - self.capacity
            n = self.capacity
        start = self.written % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start:start + first] = x[:first]
        if first < n:
            self._buf[: n - first] = x[first:]
        self.written += n
        self.last_write_time = time.perf_counter()

    def free(self) -> int:
        return self.capacity - (self.written - self.read_pos)

    # reader side
    def available(self) -> int:
        return self.written - self.read_pos

    def read(self, max_samples: int | None = None) -> np.ndarray:
        """Copy out what is there (at most ``max_samples``); an empty array if nothing is."""
        w = self.written
        if w - self.read_pos > self.capacity:
            self._lose(w - self.capacity - self.read_pos)
        n = w - self.read_pos
        if max_samples is not None:
            n = min(n, max_samples)
        if n <= 0:
            return np.zeros(0, np.float32)
        start = self.read_pos % self.capacity
        first = min(n, self.capacity - start)
        out = np.empty(n, np.float32)
        out[:first] = self._buf[start:start + first]
        if first < n:
            out[first:] = self._buf[: n - first]
        # the writer may have lapped us while we copied: drop what may be torn
        torn = self.written - self.capacity - self.read_pos
        if torn > 0:
            self._lose(min(torn, n))
            out = out[min(torn, n):]
        self.read_pos += out.shape[0]
        return out

    def _lose(self, n: int) -> None:
        self.overruns += 1
        self.lost_samples += n
        self.read_pos += n


class _ResamplingReader:
    """Reads a ring at the device rate and hands out 16 kHz (a streaming soxr resampler, not per chunk)."""

    def __init__(self, ring: RingBuffer, in_rate: int):
        self.ring = ring
        self.in_rate = int(in_rate)
        self._rs = None
        if self.in_rate != TARGET_RATE_HZ:
            import soxr
            self._rs = soxr.ResampleStream(self.in_rate, TARGET_RATE_HZ, 1, dtype="float32", quality="HQ")

    def read(self) -> tuple[np.ndarray, float] | None:
        if self.ring.available() == 0:
            return None
        arrival = self.ring.last_write_time
        x = self.ring.read()
        if self._rs is not None:
            x = self._rs.resample_chunk(x)
        return x, arrival


def _sounddevice():
    try:
        import sounddevice as sd
    except (OSError, ImportError) as e:  # the C library (or the package) is missing
        raise CaptureError(f"PortAudio library not found ({e}). Install it: sudo apt-get install libportaudio2 "
                           "(macOS: brew install portaudio), or replay a file with --source PATH.") from None
    return sd


def list_input_devices() -> list[dict]:
    sd = _sounddevice()
    out = []
    for i, d in enumerate(sd.query_devices()):
        if d["max_input_channels"] > 0:
            out.append({"index": i, "name": d["name"], "channels": d["max_input_channels"],
                        "default_samplerate": d["default_samplerate"],
                        "hostapi": sd.query_hostapis(d["hostapi"])["name"]})
    return out


def resolve_device(spec: str | int | None):
    """``None`` (default input), an index, or a case-insensitive substring of a device name."""
    sd = _sounddevice()
    try:
        if spec is None or spec == "":
            info = sd.query_devices(kind="input")
        elif isinstance(spec, int) or str(spec).isdigit():
            info = sd.query_devices(int(spec))
        else:
            matches = [d for d in list_input_devices() if str(spec).lower() in d["name"].lower()]
            if not matches:
                raise CaptureError(f"no input device matches {spec!r}; see `stream-ser devices`")
            info = sd.query_devices(matches[0]["index"])
    except (sd.PortAudioError, ValueError) as e:
        raise CaptureError(f"no usable input device ({e}). Connect a microphone, pick one with --input-device "
                           "(see `stream-ser devices`), or replay a file with --source PATH.") from None
    if info["max_input_channels"] < 1:
        raise CaptureError(f"device {info['name']!r} has no input channels; see `stream-ser devices`")
    return info


class MicSource:
    """Microphone input through PortAudio. Opens at 16 kHz where the device can, else at its native rate."""

    def __init__(self, device: str | int | None = None, ring_seconds: float = 10.0, blocksize: int = 0):
        self.device_info = resolve_device(device)
        self.ring_seconds = ring_seconds
        self.blocksize = blocksize
        self.status_flags = {"input_overflow": 0, "input_underflow": 0, "other": 0}
        self.callbacks = 0
        self._stream = None
        self.rate = TARGET_RATE_HZ
        self.finished = False

    @property
    def name(self) -> str:
        return f"microphone: {self.device_info['name']}"

    def _callback(self, indata, frames, time_info, status) -> None:
        # Real-time thread: copy and count, nothing else.
        if status:
            if status.input_overflow:
                self.status_flags["input_overflow"] += 1
            elif status.input_underflow:
                self.status_flags["input_underflow"] += 1
            else:
                self.status_flags["other"] += 1
        self.callbacks += 1
        self.ring.write(indata[:, 0])

    def start(self) -> None:
        if self._stream is not None:
            return
        sd = _sounddevice()
        dev = self.device_info["index"]
        for rate in (TARGET_RATE_HZ, int(self.device_info["default_samplerate"])):
            try:
                sd.check_input_settings(device=dev, channels=1, dtype="float32", samplerate=rate)
            except Exception:
                continue
            self.rate = rate
            break
        else:
            raise CaptureError(f"device {self.device_info['name']!r} accepts neither 16 kHz nor its default rate")
        self.ring = RingBuffer(int(self.ring_seconds * self.rate))
        self._reader = _ResamplingReader(self.ring, self.rate)
        try:
            self._stream = sd.InputStream(device=dev, channels=1, dtype="float32", samplerate=self.rate,
                                          blocksize=self.blocksize, callback=self._callback)
            self._stream.start()
        except sd.PortAudioError as e:
            raise CaptureError(f"cannot open {self.device_info['name']!r}: {e}") from None

    def read(self):
        return self._reader.read()

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
        self.finished = True

    def stats(self) -> dict:
        return {"overruns": self.ring.overruns, "lost_samples": self.ring.lost_samples,
                "portaudio_status": dict(self.status_flags), "rate_hz": self.rate}


class FileSource:
    """Replays a file through a ring buffer: real-time pace (default) or as fast as the reader takes it.

    A writer thread plays the audio callback's part, in blocks of ``block_ms``; in
    fast mode it waits for room instead of overrunning. ``loop`` replays forever.
    """

    def __init__(self, path: str | Path, realtime: bool = True, loop: bool = False, block_ms: float = 20.0,
                 ring_seconds: float = 10.0):
        self.path = Path(path)
        self.samples = load_audio(self.path).numpy()
        self.realtime = realtime
        self.loop = loop
        self.block = max(1, int(block_ms * TARGET_RATE_HZ / 1000))
        self.ring = RingBuffer(int(ring_seconds * TARGET_RATE_HZ))
        self._reader = _ResamplingReader(self.ring, TARGET_RATE_HZ)
        self.rate = TARGET_RATE_HZ
        self._stop = threading.Event()
        self._done_writing = False
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"file: {self.path.name} ({len(self.samples) / TARGET_RATE_HZ:.1f} s{', loop' if self.loop else ''})"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="file-source", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        sent = 0
        while not self._stop.is_set():
            for i in range(0, len(self.samples), self.block):
                if self._stop.is_set():
                    break
                block = self.samples[i:i + self.block]
                if self.realtime:
                    due = t0 + (sent + len(block)) / TARGET_RATE_HZ  # a block "arrives" once it has been spoken
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                else:
                    while self.ring.free() < len(block) and not self._stop.is_set():
                        time.sleep(POLL_S)
                self.ring.write(block)
                sent += len(block)
            if not self.loop:
                break
        self._done_writing = True

    @property
    def finished(self) -> bool:
        return self._done_writing and self.ring.available() == 0

    def read(self):
        return self._reader.read()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def stats(self) -> dict:
        return {"overruns": self.ring.overruns, "lost_samples": self.ring.lost_samples}
