"""How many websocket producers one ``stream-ser live`` server carries end to end, in real time:

    python -m bench.server_capacity [--ladder 64 128 256 384 512] [--seconds 10] [--checkpoint PATH]

``bench.run``'s capacity is the engine's alone (its streams fed in-process). Here the whole server runs as a
user runs it (``stream-ser live --source none --producers``, the bundled model, int8, in its own process),
and for each rung N real websocket clients (this process) each send a different real EMO-DB recording
as 16-bit PCM in 100 ms frames at real-time pace, while one subscriber follows every stream. So the
server's own work counts as well as the engine's: taking N x 10 audio frames a second off the sockets, the
predictions' JSON, and the fan-out, all in one process (its event loop and the recognizer thread share
Python's lock). A rung is kept when every stream got every prediction it is due, the subscriber's p99
latency (a window's last sample arriving at the server -> its prediction at the subscriber; one clock) is
under the 320 ms hop, and that latency does not grow over the run. The clients share the machine's cores
with the server; their own CPU time and how late they sent are reported, and a rung where they fell behind
is marked client-bound (then the server was not what ran out).

Writes ``bench/results/server/capacity-<cores>cores-<cpu>.json`` (after every rung). About 30 s a rung.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

from stream_ser import protocol as P

HOP_S = 0.32
FRAME_S = 0.1  # a producer's frame: what a client buffering its microphone for 100 ms sends
RATE = 16_000
STEADY_AFTER_S = 3.0  # windows ending before this are the start-up (partial windows, connection set-up)
CLIENT_LATE_S = 0.1  # the clients sending later than this behind their clock: client-bound
OUT = Path(__file__).resolve().parent / "results" / "server"
EMODB = Path(os.environ.get("STREAM_SER_EMODB", Path(__file__).resolve().parents[2] / "shared" / "data" / "emodb"))


def _pcm(n: int, seconds: float, emodb: Path = EMODB) -> list[np.ndarray]:
    """n different EMO-DB recordings as int16 PCM at 16 kHz, each tiled to ``seconds`` (real speech)."""
    files = sorted((emodb / "wav").glob("*.wav"))
    if not files:
        raise SystemExit(f"EMO-DB not found at {emodb.resolve()} (--emodb, or STREAM_SER_EMODB)")
    out = []
    for i in range(n):
        path = files[(i * 7) % len(files)]  # neighbours in the list are often one speaker's: spread them
        x, rate = sf.read(path, dtype="int16")
        if rate != RATE or x.ndim != 1:
            raise SystemExit(f"{path}: expected 16 kHz mono")
        out.append(np.tile(x, int(np.ceil(seconds * RATE / len(x))))[: int(seconds * RATE)])
    return out


def _allow_sockets(n: int) -> None:
    """Raise this process's open-file limit (which the server, its child, inherits) to ``n`` where the hard
    limit allows: every producer is a socket on each side, and soft limits are often 1024."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


def _start_server(args) -> tuple[subprocess.Popen, str]:
    # --quiet: no line per prediction on stdout (over a thousand a second here: a cost a deployment this
    # size would not pay)
    cmd = [sys.executable, "-m", "stream_ser", "live", "--source", "none", "--producers", "--device", args.device,
           "--no-dashboard", "--quiet", "--port", "0", "--max-frame-bytes", str(int(2 * FRAME_S * RATE))]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"websocket (ws://\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    for pipe in (proc.stdout, proc.stderr):  # read whatever else it says, so that no pipe fills and blocks it
        threading.Thread(target=pipe.read, daemon=True).start()
    return proc, m.group(1)


def _thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds so far of process ``pid``'s main thread (the server's event loop) and of its other threads
    (the recognizer thread and torch's workers), from /proc; zeros where /proc cannot tell."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    main = rest = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            s = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            if int(task.name) == pid:
                main += s
            else:
                rest += s
    except OSError:
        pass
    return main, rest


async def _rung(url: str, pcm: list[np.ndarray], seconds: float, server_pid: int | None = None) -> dict:
    """N producers at real-time pace and one subscriber to every stream; what the subscriber got, and when."""
    got: list[tuple[str, float, float]] = []  # (stream, window end s, latency ms)
    geometry: dict[str, int] = {}  # segment and shift in samples, from the server's hello
    ready = asyncio.Event()
    done = asyncio.Event()

    async def subscriber():
        async with connect(url, max_size=None) as ws:
            hello = P.decode(await ws.recv(), allowed=P.SERVER_TYPES)
            fe = hello["frontend"]  # the server's model's segments: how many predictions each stream is due
            geometry["segment"] = (fe["segment_frames"] - 1) * fe["hop_length"] + fe["win_length"]
            geometry["shift"] = fe["segment_shift"] * fe["hop_length"]
            await ws.send(P.encode(P.subscribe(P.ALL_STREAMS)))
            ready.set()
            while not done.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except asyncio.TimeoutError:
                    continue
                now = time.time()
                m = P.decode(raw, allowed=P.SERVER_TYPES)
                if m["type"] == "prediction":
                    got.append((m["stream"], m["window_end_s"], 1e3 * (now - m["t_arrival"])))

    sub = asyncio.create_task(subscriber())
    await asyncio.wait_for(ready.wait(), 30)
    socks, sids = [], []
    for x in pcm:  # connect every producer first, then start their clocks together
        ws = await connect(url, max_size=None)
        P.decode(await ws.recv(), allowed=P.SERVER_TYPES)
        await ws.send(P.encode(P.audio_header(RATE)))
        m = P.decode(await ws.recv(), allowed=P.SERVER_TYPES)
        if m["type"] != "stream":
            raise SystemExit(f"a producer was refused: {m}")
        await ws.send(P.encode(P.subscribe(P.NO_STREAMS)))
        socks.append(ws)
        sids.append(m["stream"])
    n = int(FRAME_S * RATE)
    frames = len(pcm[0]) // n
    loop = asyncio.get_running_loop()
    cpu0, t0 = time.process_time(), loop.time()
    srv0 = _thread_cpu_s(server_pid) if server_pid else (0.0, 0.0)
    late = 0.0
    for f in range(frames):  # one clock for all producers: frame f of every stream is due at t0 + f * 100 ms
        due = t0 + f * FRAME_S
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        late = max(late, loop.time() - due)
        for ws, x in zip(socks, pcm):
            await ws.send(x[f * n:(f + 1) * n].tobytes())
    wall = max(loop.time() - t0, 1e-9)
    client_cpu = (time.process_time() - cpu0) / wall
    srv1 = _thread_cpu_s(server_pid) if server_pid else (0.0, 0.0)
    server_loop_cpu, server_other_cpu = (srv1[0] - srv0[0]) / wall, (srv1[1] - srv0[1]) / wall
    due_end = seconds  # predictions due: every segment that ends within the audio sent
    await asyncio.sleep(3.0)  # the last windows' predictions on their way
    done.set()
    await sub
    for ws in socks:
        await ws.close()
    per_segment = 1 + (int(due_end * RATE) - geometry["segment"]) // geometry["shift"]
    ours = [g for g in got if g[0] in set(sids) and g[1] <= due_end + 1e-6]
    steady = [g[2] for g in ours if g[1] >= STEADY_AFTER_S]
    counts = {}
    for s, _, _ in ours:
        counts[s] = counts.get(s, 0) + 1
    complete = len(counts) == len(sids) and all(counts.get(s, 0) >= per_segment for s in sids)
    half = len(steady) // 2
    growing = bool(half and np.median(steady[half:]) > np.median(steady[:half]) + 50.0)
    # (None: no prediction of a steady window arrived at all)
    p50, p99, worst = (round(float(v), 1) for v in np.percentile(steady, [50, 99, 100])) if steady else (None,) * 3
    return {"producers": len(pcm), "predictions_due": per_segment * len(pcm), "predictions_received": len(ours),
            "complete": complete, "latency_ms": {"p50": p50, "p99": p99, "max": worst},
            "latency_growing": growing, "client_late_ms": round(1e3 * late, 1),
            "client_cpu_share": round(client_cpu, 2),
            # what the server used while the producers sent, in cores: its event loop (the websockets, the
            # predictions' JSON and fan-out) and its other threads (the recognizer and torch's workers)
            "server_loop_cpu_share": round(server_loop_cpu, 2), "server_other_cpu_share": round(server_other_cpu, 2),
            "client_bound": late > CLIENT_LATE_S,
            "realtime": bool(complete and p99 is not None and p99 < 1e3 * HOP_S and not growing
                             and late <= CLIENT_LATE_S)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.server_capacity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ladder", type=int, nargs="+", default=[64, 128, 256, 384, 512],
                    help="producer counts, in order; stops at the first rung not kept")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio each producer sends")
    ap.add_argument("--checkpoint", default=None, help="the server's model (default: the bundled one)")
    ap.add_argument("--device", default="auto", help="the server's --device (default auto: a GPU where there is one)")
    ap.add_argument("--out", type=Path, default=None, help="the JSON to write")
    ap.add_argument("--emodb", type=Path, default=EMODB, help="the EMO-DB folder (with wav/)")
    args = ap.parse_args(argv)
    _allow_sockets(2 * max(args.ladder) + 256)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
    out = args.out or OUT / f"capacity-{os.cpu_count()}cores-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"what": "websocket producers one `stream-ser live --source none --producers` server carries in "
                      "real time, end to end", "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
              "cores": os.cpu_count(), "checkpoint": args.checkpoint or "bundled", "device": args.device,
              "seconds": args.seconds, "frame_s": FRAME_S, "capacity": 0, "ladder": [],
              "command": "python -m bench.server_capacity " + " ".join(argv if argv is not None else sys.argv[1:])}
    for n in args.ladder:
        proc, url = _start_server(args)
        try:
            r = asyncio.run(_rung(url, _pcm(n, args.seconds, args.emodb), args.seconds, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["ladder"].append(r)
        result["capacity"] = max([x["producers"] for x in result["ladder"] if x["realtime"]], default=0)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every rung: a run cut short keeps its rungs
        print(f"  {n:5d} producers: {r['predictions_received']}/{r['predictions_due']} predictions, latency p50 "
              f"{r['latency_ms']['p50']} p99 {r['latency_ms']['p99']} ms, clients late {r['client_late_ms']} ms, "
              f"cores used: clients {r['client_cpu_share']:.2f}, server loop {r['server_loop_cpu_share']:.2f}, "
              f"server other threads {r['server_other_cpu_share']:.2f}: {'kept' if r['realtime'] else 'not kept'}"
              + (" (client-bound)" if r["client_bound"] else ""), flush=True)
        if not r["realtime"]:
            break
    print(f"capacity {result['capacity']} producers; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
