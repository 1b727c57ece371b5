"""int8 CPU inference (the default on the CPU): faster, and what it changes stays small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stream_ser.assets import default_checkpoint
from stream_ser.audio import load_audio
from stream_ser.model import load_checkpoint
from stream_ser.recognizer import StreamingRecognizer

@pytest.fixture(scope="module")
def models():
    path = default_checkpoint()
    if path is None:
        pytest.skip("no bundled model in this install")
    return load_checkpoint(path, "cpu"), load_checkpoint(path, "cpu", precision="fp32")


def test_cpu_loads_int8_by_default_and_fp32_on_request(models):
    q, f = models
    assert "int8" in q.describe() and "int8" not in f.describe()
    assert not any(type(m) is nn.Linear for m in q.embedder.fc.modules())  # FC6/FC7 replaced
    assert sum(type(m) is nn.Linear for m in f.embedder.fc.modules()) == 2
    # the bundled model carries its activation ranges, so its convolutions run in int8 too
    assert q.embedder.int8_convolutions and "int8 convolutions" in q.describe()
    assert not any(type(m) is nn.Conv2d for m in q.embedder.features.modules())
    assert not f.embedder.int8_convolutions
    with pytest.raises(ValueError, match="precision"):
        load_checkpoint(default_checkpoint(), "cpu", precision="int4")


def test_without_activation_ranges_the_convolutions_run_channels_last(models):
    """A checkpoint without ``meta["conv_int8"]`` (made before it, or not calibrated) keeps float32
    convolutions, channels-last, for the same features as the NCHW layout."""
    import copy

    from stream_ser.model import CONV_INT8_KEY, quantize_for_cpu
    _, f = models
    plain = copy.deepcopy(f)
    plain.meta = {k: v for k, v in plain.meta.items() if k != CONV_INT8_KEY}
    q = quantize_for_cpu(plain)
    assert not q.embedder.int8_convolutions and "channels-last" in q.describe()
    conv = q.embedder.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    nchw = copy.deepcopy(q)
    nchw.embedder.features.to(memory_format=torch.contiguous_format)
    x = torch.randn(3, q.frontend_config.channels, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(q.embedder.features(q.frontend.images(x).contiguous(
            memory_format=torch.channels_last)), nchw.embedder.features(q.frontend.images(x)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(q.embed(x), nchw.embed(x), atol=1e-3, rtol=1e-3)


def test_int8_agrees_with_fp32_on_real_speech(models, emodb_dir):
    q, f = models
    waves = [load_audio(p) for p in sorted((emodb_dir / "wav").glob("*.wav"))[::45]]  # 12, every speaker
    pq, pf = q.predict(waves), f.predict(waves)
    assert (pq.argmax(-1) == pf.argmax(-1)).all()
    assert float((pq - pf).abs().max()) < 0.03


def test_int8_stream_stays_close_to_int8_offline(emodb_wav):
    """Dynamic quantisation scales activations per batch, so a segment embedded alone (streaming)
    differs slightly from the same segment in a batch (offline); in fp32 the two are equal to 1e-4
    (tests/test_recognizer.py)."""
    import copy

    from stream_ser.model import EmotionModel, quantize_for_cpu
    torch.manual_seed(1234)
    fp32 = EmotionModel().eval()
    q = quantize_for_cpu(copy.deepcopy(fp32))
    audio = load_audio(emodb_wav("16b01Tb")).numpy()
    cfg = q.frontend_config
    n = cfg.segments_for_frames(cfg.frames_for(len(audio))) - cfg.segments_per_utterance + 1
    waves = [torch.from_numpy(audio[cfg.shift_samples * k: cfg.shift_samples * k + cfg.utterance_samples])
             for k in range(n)]
    for model in (q, fp32):
        offline = model.predict(waves).numpy()
        rec = StreamingRecognizer(model)
        preds = []
        for i in range(0, len(audio), 1000):
            preds += rec.push(audio[i:i + 1000])
        got = np.array([[p.probabilities[lab] for lab in model.labels] for p in preds if not p.partial])
        assert got.shape == offline.shape
        np.testing.assert_allclose(got, offline, atol=0.01 if model is q else 1e-4, rtol=0)


@pytest.mark.parametrize("size,inputs", [(64, 256), (112, 1024), (227, None)])
def test_folding_the_pool_into_fc6_keeps_the_embeddings(size, inputs):
    """Below 227 px the conv stack ends at 1x1 (64 px) or 2x2 (112 px) and the 6x6 pool only copies cells:
    FC6 folded over the copies gives the same features from 36x / 9x fewer inputs; at 227 px nothing folds."""
    import copy

    from stream_ser.config import FrontendConfig
    from stream_ser.model import EmotionModel, fold_pool_into_fc6, quantize_for_cpu
    torch.manual_seed(size)
    m = EmotionModel(FrontendConfig(image_size=size)).eval()
    f = copy.deepcopy(m)
    assert fold_pool_into_fc6(f) == (inputs is not None)
    assert f.embedder.fc[1].in_features == (inputs or 9216)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(f.embed(x), m.embed(x), atol=1e-6, rtol=1e-5)
        q = quantize_for_cpu(copy.deepcopy(m))  # the CPU fast path folds too, then quantises
        assert ("pool folded" in q.meta["inference"]) == (inputs is not None)
        assert float((q.embed(x) - m.embed(x)).abs().max()) < 0.02 * float(m.embed(x).abs().max())


def test_calibrated_int8_convolutions_are_batch_independent_close_and_survive_the_checkpoint(emodb_wav, tmp_path):
    """Static quantisation fixes each activation's range beforehand (from real speech through the live path), so
    a segment's conv features do not depend on the batch it rides in (dynamic quantisation's do); they stay close
    to float32's; the ranges travel in the checkpoint (``weights_only``) and must fit the network."""
    import copy

    from offline.corpora import Utterance
    from offline.int8_ranges import live_images
    from stream_ser.config import FrontendConfig
    from stream_ser.model import (CONV_INT8_KEY, EmotionModel, calibrate_conv_int8, quantize_convolutions,
                                  save_checkpoint)
    torch.manual_seed(0)
    fp32 = EmotionModel(FrontendConfig(image_size=112, normalization="speaker")).eval()
    utts = [Utterance(emodb_wav(stem), "anger", stem[:2], stem[:2], stem) for stem in ("03a01Wa", "08a01Ab", "16b01Tb")]
    images, counts = live_images(fp32, utts)
    assert counts == {"files": 3, "bad_files": 0, "speakers": 3} and images.shape[1:] == (3, 112, 112)
    cal = calibrate_conv_int8(fp32, images)
    assert set(cal["points"]) == {"quant", "features.0", "features.3", "features.6", "features.8", "features.10"}
    q = copy.deepcopy(fp32)
    q.meta = {CONV_INT8_KEY: cal}
    assert quantize_convolutions(q) and q.embedder.int8_convolutions
    x = images[:6]
    with torch.no_grad():
        batched = q.embedder.features(x)
        alone = torch.cat([q.embedder.features(x[i:i + 1]) for i in range(len(x))])
        ref = fp32.embedder.features(x)
    torch.testing.assert_close(batched, alone, rtol=0, atol=0)  # the same integers, whatever the batch
    assert float((batched - ref).norm() / ref.norm()) < 0.05
    # through a checkpoint: load_checkpoint's default CPU path picks the ranges up
    path = save_checkpoint(_with_meta(fp32, {CONV_INT8_KEY: cal}), tmp_path / "m.pt")
    loaded = load_checkpoint(path, "cpu")
    assert loaded.embedder.int8_convolutions
    with torch.no_grad():
        torch.testing.assert_close(loaded.embedder.features(x), batched, rtol=0, atol=0)
    # ranges of another network are refused, not silently misapplied
    wrong = _with_meta(fp32, {CONV_INT8_KEY: {**cal, "points": {"quant": cal["points"]["quant"]}}})
    with pytest.raises(ValueError, match="does not fit"):
        quantize_convolutions(wrong)


def test_two_level_int8_convolutions_are_batch_independent_and_several_times_closer_to_fp32(emodb_wav, tmp_path):
    """``int8x2``: each conv activation as two uint8 levels (the calibrated step, then the remainder in 255ths
    of it) on oneDNN's int8 kernels. Fixed steps, so a segment's features do not depend on its batch; what is
    left is the weights' int8 rounding, several times less than one level's error on real speech; a
    checkpoint with ranges loads it with ``precision="int8x2"``; without ranges it stays float32."""
    import copy

    from offline.corpora import Utterance
    from offline.int8_ranges import live_images
    from stream_ser.config import FrontendConfig
    from stream_ser.model import (CONV_INT8_KEY, EmotionModel, calibrate_conv_int8, quantize_convolutions,
                                  save_checkpoint, two_level_convolutions_available)
    if not two_level_convolutions_available():
        pytest.skip("this torch build has no oneDNN quantised convolution")
    torch.manual_seed(0)
    fp32 = EmotionModel(FrontendConfig(image_size=112, normalization="speaker")).eval()
    utts = [Utterance(emodb_wav(stem), "anger", stem[:2], stem[:2], stem) for stem in ("03a01Wa", "08a01Ab", "16b01Tb")]
    images, _ = live_images(fp32, utts)
    cal = calibrate_conv_int8(fp32, images[::2])
    one, two = _with_meta(fp32, {CONV_INT8_KEY: cal}), _with_meta(fp32, {CONV_INT8_KEY: cal})
    assert quantize_convolutions(one, levels=1) and quantize_convolutions(two, levels=2)
    assert two.embedder.int8_convolutions and not any(type(m) is nn.Conv2d for m in two.embedder.modules())
    x = images[1::2][:6]  # (segments the ranges were not measured on)
    with torch.no_grad():
        ref = fp32.embedder.features(x)
        batched = two.embedder.features(x)
        alone = torch.cat([two.embedder.features(x[i:i + 1]) for i in range(len(x))])
        err1 = float((one.embedder.features(x) - ref).norm() / ref.norm())
    err2 = float((batched - ref).norm() / ref.norm())
    torch.testing.assert_close(batched, alone, rtol=0, atol=0)
    assert err2 < 0.015 and err2 < err1 / 2, (err1, err2)
    with torch.no_grad():  # (a copy rebuilds oneDNN's packed weights, which cannot be copied)
        torch.testing.assert_close(copy.deepcopy(two).embedder.features(x), batched, rtol=0, atol=0)
    path = save_checkpoint(_with_meta(fp32, {CONV_INT8_KEY: cal}), tmp_path / "m.pt")
    loaded = load_checkpoint(path, "cpu", precision="int8x2")
    assert loaded.embedder.int8_convolutions and "two-level" in loaded.describe()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embedder.features(x), batched, rtol=0, atol=0)
    plain = copy.deepcopy(fp32)
    assert not quantize_convolutions(plain, levels=2) and not plain.embedder.int8_convolutions
    with pytest.raises(ValueError, match="does not fit"):
        quantize_convolutions(_with_meta(fp32, {CONV_INT8_KEY: {**cal, "points": {"quant": cal["points"]["quant"]}}}),
                              levels=2)


def test_the_bundled_model_in_int8x2_answers_as_fp32_and_streams_as_it_predicts_offline(models, emodb_dir, emodb_wav):
    """The bundled model with two-level int8 convolutions: the same answers as float32 on real speech of every
    EMO-DB speaker, and a stream's full windows equal the offline windows (to the per-batch scaling of the
    int8 FC6/FC7, as ``int8``)."""
    from stream_ser.model import two_level_convolutions_available
    if not two_level_convolutions_available():
        pytest.skip("this torch build has no oneDNN quantised convolution")
    _, f = models
    q = load_checkpoint(default_checkpoint(), "cpu", precision="int8x2")
    assert "two-level" in q.describe()
    waves = [load_audio(p) for p in sorted((emodb_dir / "wav").glob("*.wav"))[::45]]
    pq, pf = q.predict(waves), f.predict(waves)
    assert (pq.argmax(-1) == pf.argmax(-1)).all()
    assert float((pq - pf).abs().max()) < 0.03
    audio = load_audio(emodb_wav("16b01Tb")).numpy()
    cfg = q.frontend_config
    n = cfg.segments_for_frames(cfg.frames_for(len(audio))) - cfg.segments_per_utterance + 1
    offline = q.predict([torch.from_numpy(audio[cfg.shift_samples * k: cfg.shift_samples * k + cfg.utterance_samples])
                         for k in range(n)]).numpy()
    rec = StreamingRecognizer(q, adapt=False, vad=False)
    preds = []
    for i in range(0, len(audio), 1000):
        preds += rec.push(audio[i:i + 1000])
    got = np.array([[p.probabilities[lab] for lab in q.labels] for p in preds if not p.partial])
    assert got.shape == offline.shape
    np.testing.assert_allclose(got, offline, atol=0.01, rtol=0)


def test_the_heads_lstm_input_projection_runs_in_int8_close_to_fp32_and_offline_uses_it_too(models, emodb_wav):
    """The fast path projects each segment's features for the head's LSTM in int8 (one dynamically quantised
    linear for both directions): close to float32's projection on real speech; the recurrence stays float32;
    and ``forward`` (offline) goes through the same projection as the streaming ``project`` / ``infer``."""
    q, f = models
    assert q.head.int8_projection is not None and "int8 LSTM input projection" in q.describe()
    assert f.head.int8_projection is None and "int8_projection" not in "".join(f.state_dict())
    segs = q.frontend.segments(load_audio(emodb_wav("03a01Wa")))[0]  # [S, C, M, L]
    with torch.no_grad():
        feats = f.embed(segs)  # the same float32 features into both projections
        pq, pf = q.head.project(feats), f.head.project(feats)
        assert pq.shape == pf.shape == (len(segs), 2, 4 * f.model_config.lstm_hidden)
        assert float((pq - pf).norm() / pf.norm()) < 0.01
        window = feats[None, :8]
        logits, alpha = q.head(window)
        logits_stream, alpha_stream = q.head.infer(q.head.project(window))
        torch.testing.assert_close(logits, logits_stream, rtol=0, atol=0)
        torch.testing.assert_close(alpha, alpha_stream, rtol=0, atol=0)
        assert float((q.probabilities(logits) - f.probabilities(f.head(window)[0])).abs().max()) < 0.02


def _with_meta(model, meta: dict):
    import copy
    m = copy.deepcopy(model)
    m.meta = dict(m.meta) | meta
    return m
