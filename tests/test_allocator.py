"""Large freed blocks kept in the process (why and what it buys: stream_ser/allocator.py). Each check runs
in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# of twenty 64 MiB tensors made and dropped after three to warm up, how many took their pages from the
# kernel (16 384 page faults of 4 KiB each): all of them by default; with freed memory kept, only those
# for which the heap still grew (a few of the first: small blocks may take part of the freed space)
# (``thread``: in a thread other than the main one, as the live recognizer and an engine's shards run)
PROBE = """
import json, resource, sys, threading, torch
from stream_ser.allocator import keep_freed_memory
{call}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def probe(out):
    for _ in range(3):
        torch.ones(16 << 20).sum()
    fresh = 0
    for _ in range(20):
        f0 = faults()
        torch.ones(16 << 20).sum()
        fresh += faults() - f0 > 10_000
    out.append(fresh)
got = []
if {thread}:
    t = threading.Thread(target=probe, args=(got,))
    t.start()
    t.join()
else:
    probe(got)
print(json.dumps({{"set": ok, "fresh": got[0]}}))
"""


def _probe(call: str, env: dict | None = None, thread: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(call=call, thread=thread)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages always on: a fresh 64 MiB block faults "
                    "32 times, not 16 384, so page faults do not tell fresh blocks from reused ones")
def test_kept_blocks_are_reused_without_page_faults():
    default = _probe("ok = None")
    kept = _probe("ok = keep_freed_memory()")
    assert kept["set"] is True
    assert default["fresh"] == 20  # each tensor's pages from the kernel again (unmapped when freed)
    assert kept["fresh"] <= 10  # seen here: 0 to 5; then the same heap memory again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages always on (see above)")
def test_blocks_are_kept_for_other_threads_too():
    """A thread's own malloc arena cannot hold a 64 MiB block whatever the thresholds, so every thread is
    put on the main heap: a thread's large tensors are reused too (the live recognizer and an engine's
    shards allocate in threads); an arena count the environment chose stands."""
    kept = _probe("ok = keep_freed_memory()", thread=True)
    assert kept["set"] is True and kept["fresh"] <= 10
    theirs = _probe("ok = keep_freed_memory()", {"MALLOC_ARENA_MAX": "8"}, thread=True)
    assert theirs["set"] is True and theirs["fresh"] == 20  # the thread's own arena: fresh pages every time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages always on (see above)")
def test_a_choice_made_in_the_environment_stands():
    r = _probe("ok = keep_freed_memory()", {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert r["set"] is False
    assert r["fresh"] == 20  # the environment's small threshold is the one in force


def test_the_console_scripts_set_it(monkeypatch):
    import stream_ser.allocator as allocator
    from offline import cli as offline_cli
    from stream_ser import cli

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda *a: calls.append(True) or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    with pytest.raises(SystemExit):
        offline_cli.main(["--help"])
    assert len(calls) == 2
