"""Ring buffer semantics and the file source (pacing, fast mode, loop)."""

from __future__ import annotations

import time

import numpy as np
import soundfile as sf

from stream_ser.capture import FileSource, RingBuffer


def test_ring_wraps_and_keeps_order():
    r = RingBuffer(10)
    out = []
    for i in range(0, 100, 7):
        r.write(np.arange(i, i + 7, dtype=np.float32))
        out.append(r.read())
    assert np.array_equal(np.concatenate(out), np.arange(0, 105, dtype=np.float32))
    assert r.overruns == 0 and r.lost_samples == 0


def test_ring_counts_overruns_and_resumes_at_oldest_intact():
    r = RingBuffer(8)
    r.write(np.arange(0, 5, dtype=np.float32))
    r.write(np.arange(5, 20, dtype=np.float32))  # laps the reader
    got = r.read()
    assert np.array_equal(got, np.arange(12, 20, dtype=np.float32))
    assert r.overruns == 1 and r.lost_samples == 12
    r.write(np.arange(20, 23, dtype=np.float32))
    assert np.array_equal(r.read(max_samples=2), [20, 21]) and np.array_equal(r.read(), [22])


def test_ring_write_larger_than_capacity():
    r = RingBuffer(4)
    r.write(np.arange(10, dtype=np.float32))
    assert np.array_equal(r.read(), [6, 7, 8, 9])
    assert r.lost_samples == 6


def _wav(tmp_path, seconds=1.0):
    x = (0.1 * np.sin(np.arange(int(seconds * 16000)) * 0.05)).astype(np.float32)
    p = tmp_path / "x.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    return p, x


def _drain(src, timeout=10.0):
    chunks, t0 = [], time.perf_counter()
    while not src.finished and time.perf_counter() - t0 < timeout:
        got = src.read()
        if got is None:
            time.sleep(0.002)
            continue
        chunks.append(got[0])
    return np.concatenate(chunks), time.perf_counter() - t0


def test_file_source_realtime_pace(tmp_path):
    p, x = _wav(tmp_path, 0.6)
    src = FileSource(p, realtime=True)
    src.start()
    got, secs = _drain(src)
    src.stop()
    assert np.array_equal(got, x)
    assert 0.55 <= secs < 1.5  # 0.6 s of audio takes about 0.6 s


def test_file_source_fast_never_overruns(tmp_path):
    p, x = _wav(tmp_path, 5.0)
    src = FileSource(p, realtime=False, ring_seconds=0.5)  # ring much smaller than the file
    src.start()
    got, secs = _drain(src)
    src.stop()
    assert np.array_equal(got, x) and src.stats()["overruns"] == 0
    assert secs < 3


def test_file_source_loop(tmp_path):
    p, x = _wav(tmp_path, 0.2)
    src = FileSource(p, realtime=False, loop=True)
    src.start()
    got = []
    while sum(map(len, got)) < 3 * len(x):
        r = src.read()
        if r is not None:
            got.append(r[0])
    src.stop()
    y = np.concatenate(got)[: 3 * len(x)]
    assert np.array_equal(y, np.tile(x, 3)) and not src.finished


def test_missing_portaudio_is_a_clear_error(monkeypatch):
    import sys

    import pytest

    from stream_ser.capture import CaptureError, MicSource

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # as if the library could not be loaded
    with pytest.raises(CaptureError, match="libportaudio2"):
        MicSource(None)
