"""Start-up objects frozen out of Python's full garbage collections while `stream-ser live` serves
(why: stream_ser/gcpause.py; measured: docs/benchmarks.md)."""

from __future__ import annotations

import gc

import torch  # noqa: F401  (the heavy imports whose objects the freeze is about)

from stream_ser import cli
from stream_ser.gcpause import startup_objects_frozen
from stream_ser.live import LiveApp


def test_inside_the_block_the_startup_objects_are_out_of_the_collectors_sight_and_handed_back_after():
    assert gc.get_freeze_count() == 0
    gc.collect()  # what earlier tests left as garbage is not the start-up objects (CI: 70 000 of them)
    tracked = len(gc.get_objects())
    with startup_objects_frozen() as frozen:
        assert frozen > 0.9 * tracked and gc.get_freeze_count() > 0.9 * tracked  # torch alone leaves over 100 000
        assert len(gc.get_objects()) < 0.1 * tracked  # what a full collection would walk now
        cycle = []
        cycle.append(cycle)  # garbage made inside the block is still collected
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0 and len(gc.get_objects()) > 0.9 * tracked


def test_stream_ser_live_serves_with_them_frozen(monkeypatch, emodb_wav):
    seen = {}
    run = LiveApp.run

    async def spy(self):
        seen["frozen"] = gc.get_freeze_count()
        return await run(self)

    monkeypatch.setattr(LiveApp, "run", spy)
    code = cli.main(["live", "--source", str(emodb_wav("16b01Tb")), "--no-dashboard", "--quiet", "--fast",
                     "--port", "0"])
    assert code == 0 and seen["frozen"] > 100_000
    assert gc.get_freeze_count() == 0  # handed back when it stops
