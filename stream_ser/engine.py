"""Many live streams, one model: batched embedding and batched heads.

Each stream keeps its own state (a :class:`~stream_ser.recognizer.StreamingRecognizer`:
front-end frames, segment cache, head window). ``feed()`` only queues samples
(safe from any thread); ``step()`` (one thread) runs the front-end of every
stream with new audio, puts *all* new segments of all streams through the
embedder as one batch, then runs the heads of all streams whose window moved as
one batch (on the CPU, a step of many streams as two such batches side by side:
see :class:`MultiStreamEngine`). A stream's predictions equal a lone recognizer's
for the same audio (tested). When one stream brings several new segments in a step, its windows are
predicted in order, one round per segment. A long-running server should step it
inside :func:`stream_ser.gcpause.startup_objects_frozen`, as ``stream-ser live``
does, or Python's full garbage collections (about 160 ms) land inside hops.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .model import EmotionModel
from .openmp import available_threads, hop_threads, intra_op_threads
from .recognizer import (PaddingCache, Prediction, StreamingRecognizer, compute_frames, embed_and_project,
                         make_segments, padding_segments)
from .vad import score_queued


SHARDS_MAX = 2  # engine shards on the CPU (measured on 2 cores only: see MultiStreamEngine)
# fewer streams fed in a step than this: one batch of all in the caller's thread (measured, bundled model,
# median hop: 160 streams 57 ms as one batch, 62 as two shards; 192 streams 72 against 68)
SHARD_MIN_STREAMS = 192


def default_shards(model: EmotionModel) -> int:
    """Shards for an engine of ``model``: one on a GPU (one queue of kernels); on the CPU one per intra-op
    thread this process may use, at most :data:`SHARDS_MAX`."""
    if model.device.type != "cpu":
        return 1
    return max(1, min(SHARDS_MAX, torch.get_num_threads()))


class MultiStreamEngine:
    """``add_stream(id)``, ``feed(id, samples)``, ``step() -> list[Prediction]``, ``remove_stream(id)``.

    On the CPU the streams are split between ``shards`` (default :func:`default_shards`, two on two cores).
    When a step feeds :data:`SHARD_MIN_STREAMS` streams or more, each shard steps its own streams, batched
    as above, in a thread of its own on its share of the intra-op threads (one each on two cores). A hop's
    work is many operations too small to use two threads well, and torch releases Python's lock while they
    run, so two shards side by side on one thread each do more than one batch on two. Measured on the
    2-core AMD EPYC, int8, fed as fast as possible (untrained models, per-segment normalisation, medians of
    8 hops, one batch -> two shards): 64 px at 512 streams 187 -> 157 ms a hop; 112 px at 448 streams
    244 -> 240; 227 px at 224 streams 284 -> 277 (that last one only with every thread on the main malloc
    heap: see ``stream_ser.allocator``). On the real-time clock (``bench.run``'s capacity rung, alternately)
    the bundled model kept 640 streams in real time three times in three with two shards, never without. A stream stays in its shard (the one with fewest streams when it came), is
    batched only with that shard's streams, and its answers are still a lone stream's (tested). Steps of
    fewer streams (one: the microphone) run as one batch in the caller's thread."""

    def __init__(self, model: EmotionModel, max_batch: int = 512, shards: int | None = None):
        self.model = model.eval()
        self.max_batch = max_batch
        self.shards = default_shards(model) if shards is None else shards
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")
        # one padding cache per shard (for all its streams: they share the model); shards never share one
        self.padding_caches = [PaddingCache() for _ in range(self.shards)]
        self.streams: dict[str, StreamingRecognizer] = {}
        self._shard_of: dict[str, int] = {}
        self._inbox: dict[str, deque] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # the shards' threads, started with the first shared step
        self.embed_batches: deque[int] = deque(maxlen=10_000)  # segments per embedder call
        self.head_batches: deque[int] = deque(maxlen=10_000)  # windows per head call

    def add_stream(self, stream_id: str, adapt: bool = True, vad: bool = True) -> StreamingRecognizer:
        """A new stream with its own state (its own speech detector, and its own speaker statistics
        for ``speaker`` models), in the shard with the fewest streams."""
        with self._lock:
            if stream_id in self.streams:
                raise ValueError(f"stream {stream_id!r} exists")
            sizes = [0] * self.shards
            for k in self._shard_of.values():
                sizes[k] += 1
            shard = sizes.index(min(sizes))
            rec = StreamingRecognizer(self.model, stream=stream_id, adapt=adapt, vad=vad,
                                      padding_cache=self.padding_caches[shard])
            self.streams[stream_id] = rec
            self._shard_of[stream_id] = shard
            self._inbox[stream_id] = deque()
            return rec

    def remove_stream(self, stream_id: str) -> None:
        with self._lock:
            self.streams.pop(stream_id, None)
            self._shard_of.pop(stream_id, None)
            self._inbox.pop(stream_id, None)

    def feed(self, stream_id: str, samples: np.ndarray, arrival: float | None = None) -> None:
        """Queue samples for a stream (any thread; the work happens in :meth:`step`)."""
        inbox = self._inbox.get(stream_id)
        if inbox is None:
            raise KeyError(f"no stream {stream_id!r}")
        inbox.append((samples, time.perf_counter() if arrival is None else arrival))

    def pending(self) -> bool:
        return any(self._inbox.values())

    def step(self) -> list[Prediction]:
        """Process everything queued; return the predictions, shard by shard, each ordered by round then
        stream. A hop of a few streams runs on one intra-op thread but for CNN batches worth more, one of
        many on all of them (``stream_ser.openmp``); shards with audio side by side each run on their
        share of them."""
        with self._lock:
            by_shard: list[list] = [[] for _ in range(self.shards)]
            for sid, rec in self.streams.items():
                by_shard[self._shard_of[sid]].append((sid, rec, self._inbox[sid]))
        fed = [sum(1 for _, _, inbox in items if inbox) for items in by_shard]
        busy = [k for k, n in enumerate(fed) if n]
        if len(busy) <= 1 or sum(fed) < SHARD_MIN_STREAMS:  # one batch of all, in this thread
            with intra_op_threads(hop_threads(sum(fed))):
                return self._step([it for items in by_shard for it in items], self.padding_caches[0])
        if self._pool is None:  # each thread on its share of the intra-op threads, for good
            share = max(1, available_threads() // self.shards)
            self._pool = ThreadPoolExecutor(self.shards, "engine-shard", torch.set_num_threads, (share,))
        done = [self._pool.submit(self._step, by_shard[k], self.padding_caches[k]) for k in busy]
        return [p for f in done for p in f.result()]

    def close(self) -> None:
        """Stop the shards' threads, if they started (idle, they cost nothing but a thread each; Python
        stops them at exit too)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # (a step still running finishes; nothing waits for it here)
            self._pool = None

    def _step(self, items, padding_cache: PaddingCache) -> list[Prediction]:
        fed = []
        for _, rec, inbox in items:
            if inbox:  # (feed() may append meanwhile: what it adds waits for the next step)
                fed.append(rec)
                rec.segmenter.take_many([inbox.popleft() for _ in range(len(inbox))])
        # the front-end for every stream fed at once, not stream by stream (per-stream calls of a few
        # small tensor operations each are what bounds the streams one engine carries, on a GPU most):
        # the log-Mel frames in one call; speech detection in one batch per 32 ms chunk round; the
        # segments' deltas and normalisation in one call each
        segmenters = [rec.segmenter for rec in fed]
        compute_frames(segmenters)
        score_queued([sg.vad for sg in segmenters if sg.vad is not None])
        new: list[tuple[StreamingRecognizer, list]] = [
            (rec, segs) for rec, segs in zip(fed, make_segments(segmenters)) if segs]
        if not new:
            return []
        flat = [s for _, segs in new for s in segs]
        projections, embed_ms = [], 0.0
        for i in range(0, len(flat), self.max_batch):
            chunk = flat[i:i + self.max_batch]
            t0 = time.perf_counter()
            proj = embed_and_project(self.model, [s.features for s in chunk])
            embed_ms += 1e3 * (time.perf_counter() - t0)
            projections += list(proj)
            self.embed_batches.append(len(chunk))
        for rec, segs in new:
            rec.embedder_calls += 1
            rec.segments_embedded += len(segs)
        # hand each stream its projections, then predict round by round
        k = 0
        queued = []
        for rec, segs in new:
            queued.append((rec, [(s, projections[k + j]) for j, s in enumerate(segs)]))
            k += len(segs)
        preds: list[Prediction] = []
        for r in range(max(len(q) for _, q in queued)):
            ready = []
            for rec, q in queued:
                if r < len(q) and rec.add_segment(q[r][0], q[r][1], embed_ms):
                    ready.append(rec)
            for i in range(0, len(ready), self.max_batch):
                batch = ready[i:i + self.max_batch]
                t0 = time.perf_counter()
                partial = [rec for rec in batch if not rec.window_is_full]
                pads = {}
                if partial:  # the padding segments of all partial windows in one embedder call
                    proj = padding_cache.projections(self.model, padding_segments(partial))
                    pads = {id(rec): p for rec, p in zip(partial, proj)}
                with torch.no_grad():  # every window's 8 projections in one stack, not one per stream
                    rows = [p for rec in batch for p in rec.window_projection_list(pads.get(id(rec)))]
                    logits, alpha = self.model.head.infer(torch.stack(rows).view(len(batch), -1, *rows[0].shape))
                    probs = self.model.probabilities(logits).cpu().numpy()
                alpha = alpha.cpu().numpy()
                head_ms = 1e3 * (time.perf_counter() - t0)
                self.head_batches.append(len(batch))
                preds += [rec.make_prediction(p, a, head_ms) for rec, p, a in zip(batch, probs.tolist(), alpha.tolist())]
        return preds
