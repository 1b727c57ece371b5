"""The websocket protocol: every message type and field name, in one place.

JSON text messages, each ``{"type": ..., "v": PROTOCOL_VERSION, ...}``.

Server -> client:

- ``hello``: on connect. ``labels``, ``model`` (description), ``frontend`` (config
  dict), ``hop_s``, ``window_s``, ``streams`` (ids), ``server`` (version),
  ``adaptation`` (null, or ``{on, enrolled, speech_s}`` of the local stream when the
  model normalises per speaker).
- ``prediction``: one rolling prediction; the fields of
  :class:`stream_ser.recognizer.Prediction` (``seq``, ``window_start_s``,
  ``window_end_s``, ``probabilities``, ``label``, ``confidence``, ``attention``,
  ``speech_activity``, ``level_dbfs``, ``timings_ms``, ``stream``, ``adaptation``:
  null, or ``{on, speech_s, enrolled}`` for a speaker-normalised model; ``speech``:
  false when the window holds too little speech, and then ``label`` is null;
  ``partial``: true for the first windows of a stream, before 3 s were heard,
  padded as training pads a short utterance; the end of a source adds a final
  window for its last samples).
- ``status``: about once a second. ``overruns``, ``lost_samples``, ``dropped``
  (messages this subscriber lost), ``dropped_total``, ``subscribers``,
  ``latency_ms`` ({p50, p95, p99} of total per-hop latency), ``source``, ``uptime_s``;
  from ``stream-ser live`` also ``bad_outputs`` (windows withheld for non-finite
  probabilities) and ``slow_closed`` (subscribers closed 4408).
- ``error``: ``code`` (see ``ERROR_CODES``) and ``message``.
- ``end``: the source ended (``reason``); the server closes afterwards.
- ``stream``: a producer's own stream id (``stream``) after it started sending audio.

Client -> server:

- ``subscribe``: ``stream`` = an id, ``"*"`` (all, the default) or ``"none"``; an
  id that is not a current stream gets an ``unknown_stream`` error and the
  subscription stays as it was.
- ``audio``: a producer declares ``rate`` (Hz) before its binary frames of 16-bit
  little-endian mono PCM.
- ``ping``: answered with a ``status``.

This module has no third-party imports, so the server can stay free of torch.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1

HELLO = "hello"
PREDICTION = "prediction"
STATUS = "status"
ERROR = "error"
END = "end"
STREAM = "stream"
SERVER_TYPES = (HELLO, PREDICTION, STATUS, ERROR, END, STREAM)

SUBSCRIBE = "subscribe"
AUDIO = "audio"
PING = "ping"
CLIENT_TYPES = (SUBSCRIBE, AUDIO, PING)

ALL_STREAMS = "*"
NO_STREAMS = "none"  # subscribe to nothing (a producer that only sends audio)

# error codes (in ``error`` messages) and websocket close codes (4000-4999 are ours)
ERROR_CODES = {
    "bad_message": "the message is not valid JSON of a known type",
    "too_fast": "a producer sent audio faster than real time",
    "frame_too_large": "a binary audio frame is larger than allowed",
    "bad_audio": "the audio could not be used",
    "not_allowed": "this server does not take audio from clients",
    "unknown_stream": "no such stream",
    "bad_output": "the model produced non-finite values for a window; nothing was sent for it",
}
CLOSE_BAD_REQUEST = 4400  # an audio header that was refused: the connection ends rather than guess
CLOSE_UNAUTHORIZED = 4401
CLOSE_SLOW_CONSUMER = 4408  # a subscriber that left flow-control pings unanswered (see server.py)
CLOSE_PRODUCER_LIMIT = 4429
CLOSE_GOING_AWAY = 1001


class ProtocolError(ValueError):
    """A message that is not valid for this protocol."""


def encode(msg: dict[str, Any]) -> str:
    if msg.get("type") not in SERVER_TYPES + CLIENT_TYPES:
        raise ProtocolError(f"unknown message type {msg.get('type')!r}")
    return json.dumps({**msg, "v": PROTOCOL_VERSION}, separators=(",", ":"), allow_nan=False)


def decode(text: str | bytes, allowed: tuple[str, ...] = SERVER_TYPES + CLIENT_TYPES) -> dict[str, Any]:
    """Parse and check one message; raise :class:`ProtocolError` with the reason."""
    try:
        msg = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON ({str(e)[:100]})") from None
    except RecursionError:  # absurdly deep nesting: the parser gives up, so do we
        raise ProtocolError("JSON nested too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    if msg.get("type") not in allowed:
        raise ProtocolError(f"unknown message type {msg.get('type')!r} (expected one of {', '.join(allowed)})")
    v = msg.get("v", PROTOCOL_VERSION)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v!r} not supported (this side speaks {PROTOCOL_VERSION})")
    return msg


def hello(labels: list[str], model: str, frontend: dict, hop_s: float, window_s: float,
          streams: list[str] | None = None, server: str = "", adaptation: dict | None = None) -> dict:
    return {"type": HELLO, "labels": list(labels), "model": model, "frontend": frontend, "hop_s": hop_s,
            "window_s": window_s, "streams": list(streams or []), "server": server, "adaptation": adaptation}


def prediction(pred: dict) -> dict:
    """``pred`` is ``Prediction.to_dict()``."""
    return {"type": PREDICTION, **pred}


def status(overruns: int = 0, lost_samples: int = 0, dropped_total: int = 0, subscribers: int = 0,
           latency_ms: dict | None = None, source: str = "", uptime_s: float = 0.0, **extra) -> dict:
    return {"type": STATUS, "overruns": overruns, "lost_samples": lost_samples, "dropped": 0,
            "dropped_total": dropped_total, "subscribers": subscribers, "latency_ms": latency_ms or {},
            "source": source, "uptime_s": round(uptime_s, 3), **extra}


def error(code: str, message: str) -> dict:
    if code not in ERROR_CODES:
        raise ProtocolError(f"unknown error code {code!r}")
    return {"type": ERROR, "code": code, "message": message}


def end(reason: str) -> dict:
    return {"type": END, "reason": reason}


def stream_assigned(stream_id: str, rate: int) -> dict:
    return {"type": STREAM, "stream": stream_id, "rate": rate}


def subscribe(stream: str = ALL_STREAMS) -> dict:
    return {"type": SUBSCRIBE, "stream": stream}


def audio_header(rate: int) -> dict:
    return {"type": AUDIO, "rate": int(rate)}


def percentiles(values, ps=(50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., ...} of a sequence (nearest-rank on the sorted values); {} if empty."""
    xs = sorted(values)
    if not xs:
        return {}
    out = {}
    for p in ps:
        k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
        out[f"p{p}"] = round(float(xs[k]), 3)
    return out
