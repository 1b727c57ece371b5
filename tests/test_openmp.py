"""stream-ser asks OpenMP's workers to sleep between parallel regions, before torch loads, unless the
user chose a policy (why: stream_ser/openmp.py; figures: bench/under_load.py). Each case runs in a fresh
interpreter, since the policy only counts before the first torch import."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, policy: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = "import json, os{pre}\nfrom stream_ser.openmp import prefer_passive_wait\nok = prefer_passive_wait()\n" \
        "print(json.dumps({{'ok': ok, 'policy': os.environ.get('OMP_WAIT_POLICY')}}))"


def test_sets_passive_before_torch_loads():
    assert _run(PROBE.format(pre="")) == {"ok": True, "policy": "PASSIVE"}


def test_a_users_policy_wins():
    assert _run(PROBE.format(pre=""), policy="ACTIVE") == {"ok": False, "policy": "ACTIVE"}


def test_too_late_once_torch_has_loaded():
    """After torch loads, libgomp has read its policy: nothing is set and the answer says so."""
    assert _run(PROBE.format(pre="\nimport torch")) == {"ok": False, "policy": None}


def test_stream_ser_main_sets_it_first():
    code = ("import json, os, sys\nfrom stream_ser import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'torch': 'torch' in sys.modules}))")
    assert _run(code) == {"policy": "PASSIVE", "torch": False}


# --- the intra-op thread count of a live hop ---------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from stream_ser.config import FrontendConfig  # noqa: E402
from stream_ser.engine import MultiStreamEngine  # noqa: E402
from stream_ser.model import EmotionModel  # noqa: E402
from stream_ser.openmp import (PARALLEL_MIN_STREAMS, available_threads, embedding_threads,  # noqa: E402
                               intra_op_threads)
from stream_ser.recognizer import StreamingRecognizer  # noqa: E402


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_intra_op_threads_nests_and_restores(two_threads):
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1 and available_threads() == 2
        with intra_op_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_only_cnn_batches_worth_it_take_every_thread(two_threads):
    with intra_op_threads(1):
        assert embedding_threads(1, 64) == 1  # one bundled-model segment: cheaper on one thread
        assert embedding_threads(2, 112) == 1
        assert embedding_threads(1, 227) == 2  # the paper's input: worth both cores
        assert embedding_threads(13, 64) == 2  # a batch of many streams' segments
        # int8 convolutions split one image badly over threads (227 px: 3.4 ms on one, 9-13 ms on two)
        assert embedding_threads(1, 227, int8_convolutions=True) == 1
        assert embedding_threads(2, 227, int8_convolutions=True) == 2
        with intra_op_threads(2):  # an engine hop of many streams runs on all threads; one int8 segment still not
            assert embedding_threads(1, 227, int8_convolutions=True) == 1


def _record_threads(model):
    """Wrap the CNN and the head so that each call records the intra-op threads it ran on."""
    seen = {"embed": [], "head": []}
    embed, infer = model.embed, model.head.infer
    model.embed = lambda x: (seen["embed"].append(torch.get_num_threads()), embed(x))[1]
    model.head.infer = lambda p: (seen["head"].append(torch.get_num_threads()), infer(p))[1]
    return seen


def _speech(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_a_live_hop_runs_on_one_thread_but_for_a_big_cnn_batch(two_threads):
    torch.manual_seed(0)
    small = EmotionModel(FrontendConfig(image_size=64)).eval()
    seen = _record_threads(small)
    rec = StreamingRecognizer(small, vad=False)
    for i in range(0, 32000, 320):
        rec.push(_speech(2.0)[i:i + 320])
    assert seen["head"] and set(seen["head"]) == {1} and set(seen["embed"]) == {1}
    assert torch.get_num_threads() == 2  # restored after each push

    big = EmotionModel(FrontendConfig(image_size=227)).eval()
    seen = _record_threads(big)
    rec = StreamingRecognizer(big, vad=False)
    rec.push(_speech(1.0))
    assert set(seen["head"]) == {1} and set(seen["embed"]) == {2}


def test_an_engine_hop_of_many_streams_runs_on_every_thread(two_threads):
    torch.manual_seed(0)
    model = EmotionModel(FrontendConfig(image_size=64)).eval()
    seen = _record_threads(model)
    for n, expected in ((2, {1}), (PARALLEL_MIN_STREAMS, {2})):
        seen["head"].clear()
        eng = MultiStreamEngine(model)
        for k in range(n):
            eng.add_stream(f"s{k}", vad=False)
            eng.feed(f"s{k}", _speech(1.0))
        eng.step()
        assert set(seen["head"]) == expected, n


def test_speech_detection_of_one_stream_runs_on_one_thread_of_many_on_all(two_threads, monkeypatch):
    """One stream's silero-vad chunks are tiny ops (one thread); a batch of many streams' chunks is worth
    both cores (with the TorchScript model: 26 vs 43 ms a hop for 256 streams here)."""
    from stream_ser import vad
    try:  # not importorskip: importing the silero_vad package sets torch to one thread
        vad.model_path()
    except vad.VadError as e:
        pytest.skip(str(e))

    real = vad._shared_model()
    seen: list[tuple[int, int]] = []

    class Spy:  # the shared network, recording the batch and the threads of each call
        def __getattr__(self, name):
            return getattr(real, name)

        def encode(self, x):
            seen.append((len(x), torch.get_num_threads()))
            return real.encode(x)

        def step(self, features, h, c):
            seen.append((len(features), torch.get_num_threads()))
            return real.step(features, h, c)

    x = _speech(0.5)
    chunks = len(x) // vad.CHUNK_SAMPLES
    for n in (1, PARALLEL_MIN_STREAMS):
        dets = [vad.SpeechDetector() for _ in range(n)]
        for d in dets:
            d.model = Spy()
            d.queue(x)
        seen.clear()
        vad.score_queued(dets)
        # one encoder call for every chunk of every stream, then one cell step per chunk round
        assert [b for b, _ in seen] == [n * chunks] + [n] * chunks
        assert {t for _, t in seen} == ({1} if n == 1 else {2}), n
    assert torch.get_num_threads() == 2
