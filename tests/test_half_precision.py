"""The CNN in bf16 / fp16 (``precision="bf16"|"fp16"``, for a GPU's tensor cores): the
front-end, the head and the probabilities stay float32, and what it changes stays small. Measured here on
the CPU's kernels; the `cuda` test checks the GPU's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_ser.assets import default_checkpoint
from stream_ser.audio import load_audio
from stream_ser.model import load_checkpoint
from stream_ser.recognizer import StreamingRecognizer


@pytest.fixture(scope="module")
def path():
    p = default_checkpoint()
    if p is None:
        pytest.skip("no bundled model in this install")
    return p


@pytest.fixture(scope="module")
def waves(emodb_dir):
    return [load_audio(p) for p in sorted((emodb_dir / "wav").glob("*.wav"))[::45]]  # 12, every speaker


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_cnn_agrees_with_fp32_on_real_speech(path, waves, precision, dtype):
    half, full = load_checkpoint(path, "cpu", precision=precision), load_checkpoint(path, "cpu", precision="fp32")
    assert half.embed_dtype == dtype and precision in half.describe() and full.embed_dtype is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert half.embed(x).dtype == torch.float32  # the head gets float32 features
    ph, pf = half.predict(waves), full.predict(waves)
    assert ph.dtype == torch.float32
    assert (ph.argmax(-1) == pf.argmax(-1)).all()
    assert float((ph - pf).abs().max()) < 0.03
    assert float((ph - pf).abs().max()) > 0  # it did run in half precision


def test_half_precision_stream_equals_its_offline(path, emodb_wav):
    """Streaming still equals offline for the half-precision CNN: each segment is embedded once, alone,
    live, and in a batch of 8 offline; the two differ by the half-precision kernels' batch rounding only."""
    model = load_checkpoint(path, "cpu", precision="bf16")
    audio = load_audio(emodb_wav("16b01Tb")).numpy()
    cfg = model.frontend_config
    n = cfg.segments_for_frames(cfg.frames_for(len(audio))) - cfg.segments_per_utterance + 1
    rec = StreamingRecognizer(model, adapt=False)  # the corpus statistics, as offline without a speaker's
    assert rec.adaptation is None or rec.adaptation.frozen
    preds = []
    for i in range(0, len(audio), 1000):
        preds += rec.push(audio[i:i + 1000])
    got = np.array([[p.probabilities[lab] for lab in model.labels] for p in preds if not p.partial])
    assert len(got) == n
    waves = [torch.from_numpy(audio[cfg.shift_samples * k: cfg.shift_samples * k + cfg.utterance_samples])
             for k in range(n)]
    offline = model.predict(waves).numpy()
    np.testing.assert_allclose(got, offline, atol=0.01, rtol=0)


@pytest.mark.cuda
def test_fp16_on_cuda_agrees_with_fp32_on_cpu(path, waves):
    gpu, cpu = load_checkpoint(path, "cuda", precision="fp16"), load_checkpoint(path, "cpu", precision="fp32")
    pg, pc = gpu.predict(waves).cpu(), cpu.predict(waves)
    assert (pg.argmax(-1) == pc.argmax(-1)).all()
    assert float((pg - pc).abs().max()) < 0.03


def test_offline_evaluation_embeds_in_the_models_precision(path, emodb_dir):
    """The offline evaluation embeds through its own batched path (offline.train.embed_split); a model
    loaded for bf16 must be measured in bf16 there too, or an agreement run compares fp32 with fp32."""
    from offline.train import SplitData, embed_split
    waves = [load_audio(p) for p in sorted((emodb_dir / "wav").glob("*.wav"))[:2]]
    full, half = load_checkpoint(path, "cpu", precision="fp32"), load_checkpoint(path, "cpu", precision="bf16")
    split = SplitData(["a", "b"], full.frontend.utterance_segments(waves), torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        ef = embed_split(full, split, torch.device("cpu"), amp=False)
        eh = embed_split(half, split, torch.device("cpu"), amp=False)
        direct = half.embed(split.segments)
    assert eh.dtype == torch.float32 and ef.shape == eh.shape
    assert float((eh - ef).abs().max()) > 0  # bf16 did run
    torch.testing.assert_close(eh, direct, atol=1e-2, rtol=1e-2)  # the same path as the live one, to batch rounding
