"""``stream-ser``: ``live`` (the recognizer), ``file PATH...`` (one result per file), ``watch URL``, ``devices``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from . import allocator
from .openmp import prefer_passive_wait

EPILOG = """examples:
  stream-ser live                                   microphone if there is one, else the bundled sample
  stream-ser live --source speech.wav --no-dashboard --fast
  stream-ser live --checkpoint model.pt --port 9000 --token s3cret
  stream-ser file a.wav b.flac --json               one emotion per file, JSON lines
  stream-ser watch ws://127.0.0.1:8765              the dashboard of a running recognizer
  stream-ser devices                                input devices PortAudio sees
"""


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0: any free port), got {v}")
    return v


def _frame_bytes(text: str) -> int:
    v = _positive(text)
    if not 2 <= v <= 1 << 20:
        raise argparse.ArgumentTypeError(f"must be 2..1048576 bytes, got {v}")
    return v


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _device(text: str) -> str:
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for on/off flags (where "default: True" only confuses)."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    """--no-vad and --precision: the same for `live` and `file`."""
    p.add_argument("--no-vad", dest="vad", action="store_false",
                   help="judge speech by an energy threshold instead of silero-vad (faster; noise then "
                        "counts as speech)")
    p.add_argument("--precision", choices=("auto", "int8", "int8x2", "fp32", "bf16", "fp16"), default="auto",
                   help="inference precision: auto = int8 on the CPU (FC6/FC7 and the head's LSTM input "
                        "projection, and the convolutions when the checkpoint holds their activation ranges, as the "
                        "bundled model does: 1-3 %% change in the embeddings, several times faster), fp32 on a GPU; "
                        "int8x2 = the same with each conv activation as two int8 levels (a quarter of the "
                        "convolutions' error, two to three times their time, still faster than fp32 for many "
                        "streams); fp32 forces full precision; bf16 and "
                        "fp16 run the CNN in half precision (for a GPU's tensor cores)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stream-ser", description="Real-time speech emotion recognition: a rolling 3 s "
                                 "prediction every 320 ms, broadcast over a websocket and shown in the terminal.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    ap.add_argument("--version", action="version", version=f"stream_ser {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lv = sub.add_parser("live", help="run the recognizer on the microphone or a file", formatter_class=_Help)
    lv.add_argument("--source", default="auto",
                    help="mic, a WAV/FLAC path, none (websocket producers only), or auto: the microphone if an input "
                         "device exists, else the bundled sample")
    lv.add_argument("--checkpoint", default=None,
                    help="model checkpoint (.pt); default: the bundled model. 'random' = untrained (pipeline tests)")
    lv.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    _add_inference_flags(lv)
    lv.add_argument("--host", default="127.0.0.1", help="websocket bind address (0.0.0.0 exposes it to the network)")
    lv.add_argument("--port", type=_port, default=8765, help="websocket port (0: any free port)")
    lv.add_argument("--token", default=None, help="require this token from subscribers (?token= or Bearer header)")
    lv.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --host without --token (anyone who can reach the port can "
                         "read the predictions and, with --producers, push audio)")
    lv.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                    help="no terminal dashboard; log one line per prediction instead")
    lv.add_argument("--quiet", action="store_true",
                    help="no dashboard and no line per prediction: only the start line, errors and the summary")
    lv.add_argument("--fast", action="store_true", help="replay a file as fast as possible instead of in real time")
    lv.add_argument("--loop", action="store_true", help="replay a file forever")
    lv.add_argument("--wait-for-subscriber", action="store_true", help="hold the source until a subscriber connects")
    lv.add_argument("--input-device", default=None, help="microphone by index or name (see `stream-ser devices`)")
    lv.add_argument("--queue-size", type=_positive, default=256,
                    help="messages queued per subscriber (per stream, for one that follows every stream) before the "
                         "oldest drop")
    lv.add_argument("--compress", action="store_true",
                    help="offer websocket compression (permessage-deflate) for slow links; off by default, as it costs "
                         "both ends CPU for every message and hardly shrinks audio")
    lv.add_argument("--producers", action="store_true",
                    help="also take audio from websocket producers (binary 16-bit PCM frames; each gets a stream id)")
    lv.add_argument("--max-frame-bytes", type=_frame_bytes, default=64_000,
                    help="largest binary audio frame a producer may send (2 .. 1048576 bytes; a producer may also "
                         "run this much audio, or 1 s if more, ahead of real time)")
    lv.add_argument("--allow-fast-producers", action="store_true",
                    help="let producers send faster than real time (e.g. to analyse files)")
    lv.add_argument("--enroll", default=None, metavar="FILE",
                    help="speaker adaptation: start the speaker statistics from this recording of the speaker "
                         "(models with speaker normalisation; otherwise they start from the corpus statistics)")
    lv.add_argument("--no-adapt", dest="adapt", action="store_false",
                    help="speaker adaptation off: keep the corpus (or --enroll) statistics fixed instead of "
                         "updating them from the speech heard")
    f = sub.add_parser("file", help="one emotion per file (the utterance-level prediction), text or JSON lines",
                       formatter_class=_Help)
    f.add_argument("paths", nargs="+", metavar="PATH", help="audio files (WAV, FLAC, ... any rate); - reads stdin")
    f.add_argument("--json", action="store_true", help="one JSON object per file per line on stdout")
    f.add_argument("--windows", action="store_true", help="also the rolling 3 s predictions (every 320 ms)")
    f.add_argument("--checkpoint", default=None, help="model checkpoint (.pt); default: the bundled model")
    f.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    _add_inference_flags(f)
    w = sub.add_parser("watch", help="show the dashboard of a running recognizer")
    w.add_argument("url", help="websocket address, e.g. ws://127.0.0.1:8765")
    w.add_argument("--token", default=None)
    w.add_argument("--stream", default=None, help="follow one stream id (multi-stream servers); default all")
    w.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until the stream ends)")
    sub.add_parser("devices", help="list audio input devices")
    return ap


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def open_model(spec: str | None, device: str, precision: str = "auto"):
    """--checkpoint: a path, 'random', or None for the bundled model."""
    import torch

    from .model import CheckpointError, EmotionModel, load_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("--device cuda asked for, but torch sees no CUDA device")
    if spec == "random":
        return EmotionModel().to(device).eval()
    if spec is None:
        from .assets import default_checkpoint
        path = default_checkpoint()
        if path is None:
            raise CheckpointError("no --checkpoint given and no bundled model in this install; train one with "
                                  "`ser-offline train --corpus emodb --data DIR --out model.pt` and pass "
                                  "--checkpoint model.pt")
        return load_checkpoint(path, device, precision)
    return load_checkpoint(spec, device, precision)


def open_source(args):
    from .audio import AudioError
    from .capture import CaptureError, FileSource, MicSource

    spec = args.source
    if spec == "none":
        if not args.producers:
            raise CaptureError("--source none needs --producers (otherwise there is no audio at all)")
        return None
    if spec == "auto":
        try:
            mic = MicSource(args.input_device)
            mic.start()  # a device that is listed but cannot record counts as no microphone
            return mic
        except CaptureError as e:
            if args.input_device is not None:  # a device the user named must exist: no silent fallback
                raise CaptureError(f"--input-device {args.input_device}: {e}") from None
            from .assets import sample_path
            sample = sample_path()
            if sample is None:
                raise CaptureError(f"{e}\n(and no bundled sample to fall back on)") from None
            print(f"{str(e).split('. ')[0]}: replaying the bundled speech sample "
                  f"{sample.name} in a loop instead (German, made with espeak-ng)", file=sys.stderr)
            return FileSource(sample, realtime=True, loop=True)
    if spec == "mic":
        return MicSource(args.input_device)
    try:
        return FileSource(Path(spec), realtime=not args.fast, loop=args.loop)
    except AudioError as e:
        raise CaptureError(str(e)) from None


def run_file_mode(args) -> int:
    """``stream-ser file``: results on stdout, logs and errors on stderr; exit 1 if any file failed."""
    import io
    import json

    from .api import EmotionRecognizer
    from .audio import AudioError
    from .model import CheckpointError

    try:
        rec = EmotionRecognizer(open_model(args.checkpoint, args.device, args.precision), vad=args.vad)
    except (CheckpointError, ValueError) as e:
        return _fail(str(e))
    print(f"model: {rec.describe()}", file=sys.stderr)
    failed = 0
    for path in args.paths:
        try:
            if path == "-":
                import soundfile as sf
                data, rate = sf.read(io.BytesIO(sys.stdin.buffer.read()), dtype="float32", always_2d=True)
                r = rec.recognize(data, sample_rate=rate, windows=args.windows)
            else:
                r = rec.recognize(path, windows=args.windows)
        except (AudioError, ValueError, RuntimeError) as e:  # soundfile raises RuntimeError subclasses on stdin
            failed += 1
            msg = str(e) if path in str(e) else f"{path}: {e}"
            if args.json:
                print(json.dumps({"path": path, "error": msg}), flush=True)
            print(f"error: {msg}", file=sys.stderr)
            continue
        d = r.to_dict()
        if not args.windows:
            d.pop("windows")
        if args.json:
            print(json.dumps({"path": path, **d}), flush=True)
        else:
            what = f"{r.label} {100 * r.confidence:.1f}%" if r.label else "no speech"
            print(f"{path}: {what}  ({r.duration_s:.2f} s, speech activity {100 * r.speech_activity:.0f}%)", flush=True)
            for w in r.windows:
                print(f"  {w.start_s:6.2f}-{w.end_s:6.2f} s  {w.label or 'no speech':<10s} "
                      f"{100 * w.confidence:5.1f}%", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    prefer_passive_wait()  # before torch loads: on a busy machine spinning OpenMP workers cost each hop ms
    allocator.keep_freed_memory()  # large temporaries of a hop reused, not faulted in anew (stream_ser.allocator)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # name the subcommand whose flag was mistyped, with its usage, not the top-level one
        sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "devices":
        from .capture import CaptureError, list_input_devices
        try:
            devs = list_input_devices()
        except CaptureError as e:
            return _fail(str(e))
        if not devs:
            print("no input devices (use --source PATH to replay a file)")
        for d in devs:
            print(f"{d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['default_samplerate']:.0f} Hz, {d['hostapi']})")
        return 0
    if args.cmd == "file":
        return run_file_mode(args)
    if args.cmd == "watch":
        from .dashboard import watch
        try:
            return asyncio.run(watch(args.url, args.token, args.stream, max_seconds=args.seconds))
        except KeyboardInterrupt:
            return 0

    from .capture import CaptureError
    from .gcpause import startup_objects_frozen
    from .live import LiveApp
    from .model import CheckpointError
    from .recognizer import warm_up
    from .server import ProducerLimits
    from .vad import VadError

    if not _is_loopback(args.host) and not args.token:
        what = "read every prediction and push audio (--producers)" if args.producers else "read every prediction"
        if not args.insecure:
            return _fail(f"--host {args.host} without --token: anyone who can reach port {args.port} could {what}. "
                         f"Add --token SECRET (clients then use ?token=SECRET), or --insecure to accept that.")
        print(f"warning: serving on {args.host} without a token (--insecure): anyone who can reach port "
              f"{args.port} can {what}", file=sys.stderr, flush=True)
    try:
        model = open_model(args.checkpoint, args.device, args.precision)
        enroll = None
        if args.enroll is not None:
            from .audio import AudioError, load_audio
            if model.frontend_config.normalization != "speaker":
                raise ValueError(f"--enroll needs a model trained with speaker normalisation; this one uses "
                                 f"{model.frontend_config.normalization!r}")
            try:
                enroll = load_audio(args.enroll, model.frontend_config.sample_rate).numpy()
            except AudioError as e:
                raise ValueError(f"--enroll: {e}") from None
        warm_up(model, vad=args.vad)  # before the microphone opens: the first hops as fast as the rest
        source = open_source(args)
        app = LiveApp(model, source, args.host, args.port, args.token, dashboard=args.dashboard and not args.quiet,
                      log_lines=not args.dashboard and not args.quiet, wait_for_subscriber=args.wait_for_subscriber,
                      queue_size=args.queue_size, producers=args.producers, compress=args.compress,
                      limits=ProducerLimits(args.max_frame_bytes, realtime_only=not args.allow_fast_producers),
                      adapt=args.adapt, enroll=enroll, vad=args.vad)
    except (CheckpointError, CaptureError, ValueError, VadError) as e:
        return _fail(str(e))
    try:
        with startup_objects_frozen():  # no 160 ms full garbage collection inside a hop (stream_ser.gcpause)
            return asyncio.run(app.run())
    except OSError as e:  # e.g. the port is taken
        return _fail(f"cannot serve on {args.host}:{args.port}: {e}")
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
