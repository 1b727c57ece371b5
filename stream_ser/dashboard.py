"""The terminal dashboard (rich): fed protocol messages, in-process or as a websocket subscriber.

``DashboardState.update(msg)`` takes ``hello`` / ``prediction`` / ``status`` /
``end`` messages (dicts from :mod:`stream_ser.protocol`); ``render(state)`` draws
it. ``stream-ser live`` feeds it directly; ``stream-ser watch URL`` feeds it from
the websocket, so both show exactly the same thing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import protocol as P

HISTORY_S = 30.0
COLORS = {"anger": "red", "angry": "red", "boredom": "grey62", "disgust": "green", "fear": "magenta",
          "happiness": "yellow", "happy": "yellow", "sadness": "blue", "sad": "blue", "neutral": "white"}
SILENCE_ACTIVITY = 0.15  # below this fraction of active frames, the window is shown as silence
# RMS of the 655 ms speech segments the bundled model was trained on (1st percentile of RAVDESS's, 99th of
# EMO-DB's; bench/level_robustness.py shows the answers move with the level): outside it, say so
TRAINED_SPEECH_LEVEL_DBFS = (-52.0, -11.0)


class DashboardState:
    def __init__(self):
        self.labels: list[str] = []
        self.model = ""
        self.url = ""
        self.hop_s = 0.32
        self.window_s = 3.0
        self.current: dict | None = None
        self.history: deque[tuple[float, str, float, bool]] = deque()  # (end_s, label, confidence, silent)
        self.status: dict = {}
        self.ended: str | None = None
        self.errors: list[str] = []
        self.n_predictions = 0
        self.stream_filter: str | None = None

    def update(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == P.HELLO:
            self.labels = list(msg.get("labels", []))
            self.model = msg.get("model", "")
            self.hop_s = msg.get("hop_s", self.hop_s)
            self.window_s = msg.get("window_s", self.window_s)
        elif kind == P.PREDICTION:
            if self.stream_filter and msg.get("stream") not in (None, self.stream_filter):
                return
            self.current = msg
            self.n_predictions += 1
            if not self.labels:
                self.labels = list(msg["probabilities"])
            silent = _silent(msg)
            self.history.append((msg["window_end_s"], msg["label"], msg["confidence"], silent))
            while self.history and self.history[0][0] < msg["window_end_s"] - HISTORY_S:
                self.history.popleft()
        elif kind == P.STATUS:
            self.status = msg
        elif kind == P.END:
            self.ended = msg.get("reason", "ended")
        elif kind == P.ERROR:
            self.errors = (self.errors + [f"{msg.get('code')}: {msg.get('message')}"])[-3:]


def _silent(msg: dict) -> bool:
    """No speech in the window: the server's ``speech`` verdict (older servers: the activity threshold)."""
    if "speech" in msg:
        return not msg["speech"] or msg.get("label") is None
    return msg.get("speech_activity", 1.0) < SILENCE_ACTIVITY


def marks(labels: list[str]) -> dict[str, str]:
    """One distinct character per label for the history line: its first letter, or the next unused
    letter of its name (sadness S, surprise U), or a digit."""
    out: dict[str, str] = {}
    for lab in labels:
        taken = set(out.values())
        out[lab] = next((ch for ch in lab.upper() if ch.isalpha() and ch not in taken),
                        next((d for d in "123456789" if d not in taken), "?"))
    return out


def adaptation_text(ad: dict | None) -> str:
    """One phrase for the ``adaptation`` field of a prediction (speaker normalisation)."""
    if ad is None:
        return "not used by this model"
    src = "enrolled + " if ad.get("enrolled") else ""
    state = "on" if ad.get("on") else "frozen"
    return f"{state}: {src}{ad.get('speech_s', 0.0):.1f} s of this speaker's speech (started from corpus statistics)"


def _bar(fraction: float, width: int, style: str) -> Text:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    return Text("█" * full, style=style) + Text("·" * (width - full), style="grey30")


def render(state: DashboardState, width: int = 100) -> Group:
    cur = state.current
    parts = []
    head = Text()
    head.append("stream_ser ", style="bold")
    head.append(state.model or "(waiting for hello)", style="cyan")
    if state.url:
        head.append(f"   {state.url}", style="grey62")
    parts.append(head)

    if cur is None:
        parts.append(Panel(Text("waiting for the first prediction (after 0.66 s of audio)…", style="grey62"),
                           title="emotion"))
    else:
        silent = _silent(cur)
        color = COLORS.get(cur["label"], "white")
        big = Text()
        if silent:
            top = max(cur["probabilities"], key=cur["probabilities"].get) if cur["probabilities"] else "?"
            big.append("NO SPEECH  ", style="bold grey62")
            big.append(f"(no emotion given; the model alone would say {top} "
                       f"{100 * cur['confidence']:.0f}%)", style="grey50")
        else:
            big.append(cur["label"].upper(), style=f"bold {color}")
            big.append(f"  {100 * cur['confidence']:.1f}%", style="bold")
        big.append(f"    window {cur['window_start_s']:.2f}–{cur['window_end_s']:.2f} s   #{cur['seq']}",
                   style="grey62")
        if cur.get("partial"):
            big.append("   partial: under 3 s heard, the rest of the window is padding", style="yellow")
        bars = Table.grid(padding=(0, 1))
        bars.add_column(justify="right", width=10)
        bars.add_column()
        bars.add_column(justify="right", width=6)
        for lab in state.labels:
            p = cur["probabilities"].get(lab, 0.0)
            bars.add_row(lab, _bar(p, 40, COLORS.get(lab, "white")), f"{100 * p:.1f}%")
        parts.append(Panel(Group(big, bars), title="emotion (last 3 s)"))

        hist = Text()
        mk = marks(state.labels)
        for _, lab, conf, sil in state.history:
            hist.append("·" if sil or lab is None else mk.get(lab, "?"),
                        style=("grey42" if sil or lab is None else COLORS.get(lab, "white")))
        legend = Text("  ".join(f"{mk[lab]}={lab}" for lab in state.labels) + "  ·=no speech", style="grey50")
        parts.append(Panel(Group(hist, legend), title=f"history (last {HISTORY_S:.0f} s, one mark per "
                                                        f"{state.hop_s * 1000:.0f} ms)"))

        level = cur.get("level_dbfs", -120.0)
        act = cur.get("speech_activity", 0.0)
        meters = Table.grid(padding=(0, 1))
        meters.add_column(justify="right", width=16)
        meters.add_column()
        meters.add_column()
        meters.add_row("input level", _bar((level + 80) / 80, 30, "green"), f"{level:.1f} dBFS")
        lo, hi = TRAINED_SPEECH_LEVEL_DBFS
        if not silent and not lo <= level <= hi:
            meters.add_row("", Text(f"{'quieter' if level < lo else 'louder'} than the speech the bundled model was "
                                    f"trained on ({lo:.0f} to {hi:.0f} dBFS): its answers move with the level; "
                                    f"{'raise' if level < lo else 'lower'} the input gain", style="yellow"), "")
        meters.add_row("speech activity", _bar(act, 30, "cyan"), f"{100 * act:.0f}%")
        ad = cur.get("adaptation")
        if ad is not None:
            meters.add_row("speaker adapt.", Text(adaptation_text(ad), style="magenta" if ad.get("on") else "grey50"), "")
        t = cur.get("timings_ms", {})
        meters.add_row("this hop", Text(f"front-end {t.get('frontend', 0):.1f} ms · CNN {t.get('embed', 0):.1f} ms · "
                                        f"head {t.get('head', 0):.1f} ms · total {t.get('total', 0):.1f} ms"), "")
        parts.append(meters)

    st = state.status
    lat = st.get("latency_ms", {})
    line = Text(f"latency p50 {lat.get('p50', 0):.1f} / p95 {lat.get('p95', 0):.1f} / p99 {lat.get('p99', 0):.1f} ms"
                f"   overruns {st.get('overruns', 0)} ({st.get('lost_samples', 0)} samples)"
                f"   dropped {st.get('dropped', 0)}   subscribers {st.get('subscribers', 0)}"
                f"   source {st.get('source', '?')}", style="grey70")
    parts.append(line)
    pa = st.get("portaudio_status") or {}
    if any(pa.values()):
        parts.append(Text(f"PortAudio: {pa.get('input_overflow', 0)} input overflows, {pa.get('input_underflow', 0)} "
                          f"underflows, {pa.get('other', 0)} other", style="yellow"))
    for e in state.errors:
        parts.append(Text(f"error {e}", style="red"))
    if state.ended:
        parts.append(Text(f"stream ended: {state.ended}", style="bold yellow"))
    return Group(*parts)


class LiveDashboard:
    """In-process dashboard: ``with LiveDashboard(console) as d: d.update(msg)``."""

    def __init__(self, console: Console | None = None, url: str = "", refresh_per_second: float = 8):
        self.state = DashboardState()
        self.state.url = url
        self.console = console or Console()
        self._live = Live(render(self.state), console=self.console, refresh_per_second=refresh_per_second,
                          transient=False)

    def __enter__(self):
        self._live.__enter__()
        return self

    def __exit__(self, *exc):
        self._live.update(render(self.state))
        return self._live.__exit__(*exc)

    def update(self, msg: dict) -> None:
        self.state.update(msg)
        self._live.update(render(self.state))


async def watch(url: str, token: str | None = None, stream: str | None = None, console: Console | None = None,
                max_seconds: float | None = None) -> int:
    """Subscribe to a server and show its dashboard until the stream ends (0) or the server goes (1)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidURI, InvalidHandshake

    if "://" not in url:  # `watch localhost:8765` means the websocket there
        url = f"ws://{url}"
    headers = {"Authorization": f"Bearer {token}"} if token else None
    console = console or Console()
    deadline = time.monotonic() + max_seconds if max_seconds else None
    try:
        async with connect(url, additional_headers=headers, open_timeout=5) as ws:
            if stream:
                await ws.send(P.encode(P.subscribe(stream)))
            with LiveDashboard(console, url) as dash:
                dash.state.stream_filter = stream
                try:
                    while True:
                        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                        text = await asyncio.wait_for(ws.recv(), timeout)
                        try:
                            msg = P.decode(text, allowed=P.SERVER_TYPES)
                        except P.ProtocolError as e:
                            dash.update(P.error("bad_message", f"server sent: {e}"))
                            continue
                        dash.update(msg)
                        if msg["type"] == P.END:
                            return 0
                except asyncio.TimeoutError:
                    return 0
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                    if code == P.CLOSE_UNAUTHORIZED:
                        console.print("[red]refused: missing or wrong token (--token)[/red]")
                        return 2
                    console.print(f"[yellow]connection closed ({code}: {e.rcvd.reason if e.rcvd else ''})[/yellow]")
                    return 0 if code in (1000, 1001) else 1
    except (OSError, InvalidURI, InvalidHandshake, asyncio.TimeoutError) as e:
        console.print(f"[red]cannot connect to {url}: {e}[/red]\nIs `stream-ser live` running there? "
                      "It prints its websocket address when it starts.")
        return 1
