"""The multi-stream engine: batched predictions equal lone-recognizer predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_ser.audio import load_audio
from stream_ser.config import FrontendConfig
from stream_ser import engine as engine_module
from stream_ser.engine import MultiStreamEngine
from stream_ser.model import EmotionModel
from stream_ser.recognizer import StreamingRecognizer

FILES = ["16b01Tb", "03a01Fa", "11b03Lc"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return EmotionModel().eval()


@pytest.fixture(scope="module")
def speaker_model():
    """Speaker normalisation: each stream adapts its own running statistics as segments complete."""
    torch.manual_seed(7)
    return EmotionModel(FrontendConfig(normalization="speaker", image_size=64)).eval()


@pytest.mark.parametrize("kind,shards,side_by_side", [("segment", 1, False), ("speaker", 1, False),
                                                      ("segment", 2, True), ("speaker", 2, True),
                                                      ("speaker", 2, False)])
def test_batched_streams_equal_single_streams(model, speaker_model, emodb_wav, kind, shards, side_by_side,
                                              monkeypatch):
    """The engine runs every stage for all its streams at once (log-Mel frames, speech detection,
    deltas, statistics and normalisation, CNN, head); with two shards, as two such batches side by side in
    threads of their own (from SHARD_MIN_STREAMS streams a step, here lowered to 1), or under it as one
    batch again: the answers are each lone stream's."""
    if side_by_side:
        monkeypatch.setattr(engine_module, "SHARD_MIN_STREAMS", 1)
    model = speaker_model if kind == "speaker" else model
    audio = {f: load_audio(emodb_wav(f)).numpy() for f in FILES}
    lones = {f: StreamingRecognizer(model) for f in FILES}
    lone = {f: lones[f].push(audio[f]) for f in FILES}
    threads = torch.get_num_threads()
    eng = MultiStreamEngine(model, shards=shards)
    for f in FILES:
        eng.add_stream(f)
    rng = np.random.default_rng(3)
    pos = {f: 0 for f in FILES}
    got = {f: [] for f in FILES}
    while any(pos[f] < len(audio[f]) for f in FILES):
        for f in FILES:  # each stream in its own random chunk sizes, several chunks per step sometimes
            for _ in range(int(rng.integers(1, 3))):
                n = int(rng.integers(100, 12000))
                if pos[f] < len(audio[f]):
                    eng.feed(f, audio[f][pos[f]:pos[f] + n])
                    pos[f] += n
        for p in eng.step():
            got[p.stream].append(p)
    for f in FILES:
        assert len(got[f]) == len(lone[f])
        assert [p.seq for p in got[f]] == [p.seq for p in lone[f]]
        a = np.array([[p.probabilities[lab] for lab in model.labels] for p in got[f]])
        b = np.array([[p.probabilities[lab] for lab in model.labels] for p in lone[f]])
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert eng.streams[f].segments_embedded == eng.streams[f].segments_seen  # once each
        if kind == "speaker":  # the same speech taught each stream's statistics, and only its own
            assert [p.adaptation for p in got[f]] == [p.adaptation for p in lone[f]]
            ours, theirs = eng.streams[f].adaptation.current(), lones[f].adaptation.current()
            assert ours.speech_s > 0
            torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-4, rtol=0)
    assert max(eng.embed_batches) > 1 and max(eng.head_batches) > 1  # it did batch across streams
    assert (eng._pool is not None) == side_by_side  # two shards with audio: they stepped side by side
    assert torch.get_num_threads() == threads  # the shards' threads left the caller's alone
    eng.close()


def test_streams_go_to_the_shard_with_fewest(model):
    eng = MultiStreamEngine(model, shards=2)
    for k in range(5):
        eng.add_stream(f"s{k}")
    assert [eng._shard_of[f"s{k}"] for k in range(5)] == [0, 1, 0, 1, 0]
    eng.remove_stream("s1")
    eng.remove_stream("s3")
    eng.add_stream("t")
    assert eng._shard_of["t"] == 1 and eng.streams["t"].padding_cache is eng.padding_caches[1]
    assert set(eng.streams) == {"s0", "s2", "s4", "t"}
    with pytest.raises(ValueError):
        MultiStreamEngine(model, shards=0)


def test_streams_come_and_go(model):
    eng = MultiStreamEngine(model)
    eng.add_stream("a")
    with pytest.raises(ValueError):
        eng.add_stream("a")
    eng.feed("a", np.zeros(50000, np.float32))
    eng.remove_stream("a")
    assert eng.step() == []
    with pytest.raises(KeyError):
        eng.feed("a", np.zeros(10, np.float32))


@pytest.mark.cuda
def test_engine_on_cuda_equals_cpu(speaker_model, emodb_wav):
    """The batched front-end (log-Mel frames, speech masks, statistics, normalisation) and the CNN on the
    GPU give the CPU's answers and statistics, with live speaker adaptation on."""
    audio = {f: load_audio(emodb_wav(f)).numpy() for f in FILES}
    gpu_model = EmotionModel(speaker_model.frontend_config).eval()
    gpu_model.load_state_dict(speaker_model.state_dict())
    engines = {"cpu": MultiStreamEngine(speaker_model), "cuda": MultiStreamEngine(gpu_model.to("cuda"))}
    got = {}
    for name, eng in engines.items():
        for f in FILES:
            eng.add_stream(f)
        preds = []
        for start in range(0, max(len(a) for a in audio.values()), 5120):  # 320 ms chunks, all streams per step
            for f in FILES:
                if start < len(audio[f]):
                    eng.feed(f, audio[f][start:start + 5120])
            preds += eng.step()
        got[name] = preds
    assert [(p.stream, p.seq) for p in got["cuda"]] == [(p.stream, p.seq) for p in got["cpu"]]
    labels = speaker_model.labels
    a = np.array([[p.probabilities[lab] for lab in labels] for p in got["cuda"]])
    b = np.array([[p.probabilities[lab] for lab in labels] for p in got["cpu"]])
    np.testing.assert_allclose(a, b, atol=2e-3)
    for f in FILES:
        ours, theirs = engines["cuda"].streams[f].adaptation.current(), engines["cpu"].streams[f].adaptation.current()
        assert ours.speech_s == pytest.approx(theirs.speech_s)
        torch.testing.assert_close(ours.mean.cpu(), theirs.mean, atol=1e-3, rtol=0)


def test_blocks_taken_together_keep_each_ones_arrival(speaker_model, emodb_wav):
    """An engine's stream takes all the blocks queued since its last step at once (``take_many``): the
    segments are those of the blocks taken one by one, and each still carries the arrival time of the block
    that brought its last sample (the latency a prediction reports is measured from it)."""
    from stream_ser.recognizer import compute_frames, make_segments
    from stream_ser.vad import score_queued
    x = load_audio(emodb_wav("03a01Fa")).numpy()[:40_000]
    block = 1600  # 100 ms, as websocket producers send
    blocks = [(x[i:i + block], 1000.0 + i // block) for i in range(0, len(x), block)]
    together, one_by_one = StreamingRecognizer(speaker_model).segmenter, StreamingRecognizer(speaker_model).segmenter
    got = []
    for a in range(0, len(blocks), 7):  # seven blocks a step
        together.take_many(blocks[a:a + 7])
        compute_frames([together])
        score_queued([together.vad])
        got += make_segments([together])[0]
    want = []
    for samples, arrival in blocks:
        one_by_one.take(samples, arrival)
        compute_frames([one_by_one])
        score_queued([one_by_one.vad])
        want += make_segments([one_by_one])[0]
    cfg = speaker_model.frontend_config
    assert len(got) == len(want) == cfg.segments_for_frames(cfg.frames_for(len(x))) > 3
    for g, w in zip(got, want):
        last = g.index * cfg.shift_samples + cfg.segment_samples  # the segment's last sample (exclusive)
        assert g.arrival == w.arrival == 1000.0 + (last - 1) // block
        torch.testing.assert_close(g.features, w.features, atol=1e-5, rtol=0)
        assert g.activity == w.activity


@pytest.mark.parametrize("kind,partial_windows,device", [
    ("bundled", False, "cpu"), ("bundled", True, "cpu"), ("segment", False, "cpu"),
    pytest.param("bundled", False, "cuda", marks=pytest.mark.cuda),
    pytest.param("bundled", True, "cuda", marks=pytest.mark.cuda)])
def test_a_hop_dispatches_as_many_tensor_operations_for_many_streams_as_for_few(model, emodb_dir, kind,
                                                                                partial_windows, device):
    """Where the model runs on a GPU every tensor operation is a kernel launch (several microseconds each),
    so a hop whose operations grew with its streams would be bound by them long before its batches were
    (on the H100 of docs/benchmarks.md, before the engine batched its front-end, a hop cost 0.7 ms a
    stream). Counted with a dispatch mode, the same hop (full windows, or fresh streams' partial ones) of 2
    and of 6 streams dispatches the same operations: the bundled model (int8, speaker adaptation, speech
    detection), and an untrained one (per-segment normalisation, float32); on a GPU too where there is one.
    Views, which launch nothing, may grow (a stream's rows of a batch)."""
    from bench.profile_engine import count_tensor_ops, fed_engine
    from stream_ser.assets import default_checkpoint
    from stream_ser.model import load_checkpoint

    net = load_checkpoint(default_checkpoint(), device) if kind == "bundled" else model
    files = sorted((emodb_dir / "wav").glob("*.wav"))[:6]
    audio = [load_audio(f).numpy() for f in files]
    counted = {}
    for n in (2, 6):
        _, hop, warm_hops, _ = fed_engine(net, n, audio, partial_windows, shards=1, hops=1)
        for h in range(warm_hops):
            hop(h)
        ops, _, preds = count_tensor_ops(lambda: hop(warm_hops))
        assert len(preds) == n  # each stream's window moved: the hop did the whole work for all of them
        counted[n] = ops
    assert sum(counted[2].values()) > 100  # the whole hop was counted (front-end, detector, CNN, head)
    assert counted[6] == counted[2], {k: (counted[2][k], counted[6][k]) for k in counted[2] | counted[6]
                                      if counted[2][k] != counted[6][k]}
