"""The DCNN-BLSTMwA model (Zhang et al. 2021) and the one checkpoint format.

- :class:`SegmentEmbedder`: torchvision's AlexNet; the segment feature is FC7
  (4096-d, after its ReLU). A linear ``classify`` layer on top is used only for
  stage-1 fine-tuning (segment label = utterance label).
- :class:`AttentionHead`: BLSTM 128/direction -> attention
  ``alpha_i = softmax(mu^T y_i)``, ``Z = sum alpha_i y_i`` (eqs. 4-5) -> DNN
  512 (dropout) -> 256 -> 256 -> classes. ``forward`` for training;
  ``project`` + ``infer`` for streaming over cached per-segment input projections.
- :class:`BaselineEmbedder` / :class:`BaselineHead`: the paper's 2-CNN-LSTM
  (Table 5): two 5x5 convolutions (16, 32 kernels) with max-pooling on the
  64x64 3-channel log-Mel segment, an LSTM of 512 over the segments, dropout 0.5.
- :class:`EmotionModel`: front-end + embedder + head + labels + configs.
  ``EmotionModel()`` is the paper's model, randomly initialised, EMO-DB's 7 labels.

Checkpoints are one ``torch.save`` file of plain containers and tensors, loaded
with ``weights_only=True`` and rebuilt from the configs stored in them. The
compact form stores large matrices as int8 with one float32 scale per row.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .config import FrontendConfig, ModelConfig
from .features import Frontend

CHECKPOINT_FORMAT = "stream_ser.checkpoint/1"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 file name in the hub cache


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


class WeightsError(RuntimeError):
    """ImageNet weights that cannot be found; the message says where to put them."""


# --- embedders ---------------------------------------------------------------------
def _to_three_channels(x: torch.Tensor) -> torch.Tensor:
    """AlexNet takes RGB: 1 channel is repeated, 2 channels get a zero third."""
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.expand(-1, 3, -1, -1)
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def alexnet_state_dict(weights: str) -> dict[str, torch.Tensor] | None:
    """``"none"`` -> None; ``"imagenet"`` -> torchvision's IMAGENET1K_V1 (hub cache); else a file path."""
    if weights == "none":
        return None
    if weights == "imagenet":
        hub = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
        try:
            return torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # no network, proxy, partial file ...
            raise WeightsError(
                f"ImageNet AlexNet weights are not in the torch hub cache and could not be downloaded ({e}). "
                f"Put {ALEXNET_FILE} (from {torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url}) at {hub}, "
                "or pass --weights PATH to the file, or --weights none to start from random initialisation."
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"AlexNet weights file not found: {path} (use 'imagenet', 'none' or a path to a .pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, a pickle with code in it, truncated ...
        raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return _embedder_from_checkpoint(state, path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "features.0.weight" not in state:
        raise WeightsError(f"{path}: not an AlexNet state dict (no features.0.weight) nor a stream_ser checkpoint")
    return state


def _embedder_from_checkpoint(payload: dict, path: Path) -> dict[str, torch.Tensor]:
    """A stream_ser checkpoint's AlexNet (features, FC6, FC7) in torchvision's key names.

    This is how a CNN pre-trained on another corpus (e.g. RAVDESS) initialises the
    embedder; its stage-1 classifier is not carried over (the labels differ).
    """
    if (payload.get("model_config") or {}).get("arch", "dcnn_blstmwa") != "dcnn_blstmwa":
        raise WeightsError(f"{path}: a {payload['model_config'].get('arch')} checkpoint has no AlexNet embedder")
    out = {}
    for k, v in expand_state(payload["state_dict"], payload.get("scales", {}), {}).items():
        if k.startswith("embedder.features."):
            out[k[len("embedder."):]] = v.float()
        elif k.startswith("embedder.fc."):
            _, _, idx, name = k.split(".")
            out[f"classifier.{idx}.{name}"] = v.float()  # fc = classifier[:6]: same indices
    if "features.0.weight" not in out:
        raise WeightsError(f"{path}: checkpoint holds no embedder weights")
    return out


class SegmentEmbedder(nn.Module):
    """AlexNet up to FC7: images [N, C, 227, 227] -> features [N, 4096]."""

    def __init__(self, n_classes: int, weights: str = "none"):
        super().__init__()
        alex = torchvision.models.alexnet(weights=None)
        state = alexnet_state_dict(weights)
        if state is not None:
            missing, unexpected = alex.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("classifier.6.") for k in missing):  # the 1000-class layer may be absent
                raise WeightsError(f"AlexNet weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
        self.features = alex.features
        self.avgpool = alex.avgpool
        self.fc = alex.classifier[:6]  # dropout, FC6, ReLU, dropout, FC7, ReLU
        self.classify = nn.Linear(4096, n_classes)  # stage-1 fine-tuning layer only
        self.out_dim = 4096
        self.input_size: int | None = None  # None: the front-end's image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_three_channels(images)
        first = self.features[0] if isinstance(self.features, nn.Sequential) else None
        if first is not None and first.weight.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # the CPU fast path (quantize_for_cpu)
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward(images))

    @property
    def int8_convolutions(self) -> bool:
        """Whether the convolutions run in int8 (:func:`quantize_convolutions`)."""
        return isinstance(self.features, (_QuantizedConvStack, _TwoLevelConvStack))


class BaselineEmbedder(nn.Module):
    """2-CNN part of the baseline: segments [N, C, 64, 64] -> [N, 32*13*13]."""

    def __init__(self, channels: int, segment_frames: int = 64, n_mels: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        h = ((n_mels - 4) // 2 - 4) // 2
        w = ((segment_frames - 4) // 2 - 4) // 2
        self.out_dim = 32 * h * w
        self.input_size = 0  # 0: the raw segment, no resize

    def forward(self, segs: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(segs), 1)


# --- heads -------------------------------------------------------------------------
def _lstm_run(proj: torch.Tensor, w_hh: torch.Tensor, reverse: bool) -> torch.Tensor:
    """One LSTM direction over precomputed input projections.

    proj: [B, S, 4H] = x W_ih^T + b_ih + b_hh (PyTorch gate order i, f, g, o);
    w_hh: [4H, H]. Returns hidden states [B, S, H] in time order.
    """
    B, S, H4 = proj.shape
    H = H4 // 4
    h = proj.new_zeros(B, H)
    c = proj.new_zeros(B, H)
    out = [None] * S
    steps = range(S - 1, -1, -1) if reverse else range(S)
    for t in steps:
        g = proj[:, t] + h @ w_hh.t()
        i, f, gg, o = g.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        out[t] = h
    return torch.stack(out, dim=1)


def _input_weights(lstm: nn.LSTM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each direction's input weights and both biases: [(W_ih [4H, D], b_ih + b_hh [4H])], forward first."""
    sfx = ["", "_reverse"][: 2 if lstm.bidirectional else 1]
    return [(getattr(lstm, f"weight_ih_l0{s}"), getattr(lstm, f"bias_ih_l0{s}") + getattr(lstm, f"bias_hh_l0{s}"))
            for s in sfx]


def _input_projection(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> [..., dirs, 4H]: the part of each LSTM step that depends on its input alone."""
    return torch.stack([F.linear(x, w, b) for w, b in _input_weights(lstm)], dim=-2)


class _ProjectedHead(nn.Module):
    """A head over an LSTM whose input projections are computed once per segment (``project``, cached by
    the live path) and may run in int8 on the CPU (:func:`quantize_head_projection` sets
    ``int8_projection``; then ``forward`` goes through ``project`` and ``infer`` too, so that offline and
    streaming use the same numbers)."""

    lstm: nn.LSTM

    def __init__(self):
        super().__init__()
        self.int8_projection: nn.Module | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Per-segment input projection [..., D] -> [..., dirs, 4H]; cacheable once per segment."""
        if self.int8_projection is None:
            return _input_projection(self.lstm, x)
        return self.int8_projection(x).unflatten(-1, (2 if self.lstm.bidirectional else 1, -1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Utterance features [B, S, D] -> (logits [B, K], weights over segments [B, S])."""
        if self.int8_projection is not None:
            return self.infer(self.project(x))
        y, _ = self.lstm(x)
        return self._readout(y)

    def infer(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``forward`` from cached projections [B, S, dirs, 4H]."""
        raise NotImplementedError

    def _readout(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM outputs [B, S, dirs * H] -> (logits [B, K], weights over segments [B, S])."""
        raise NotImplementedError


class AttentionHead(_ProjectedHead):
    """Utterance features [B, S, D] -> (logits [B, K], attention [B, S])."""

    def __init__(self, cfg: ModelConfig, in_dim: int):
        super().__init__()
        H = cfg.lstm_hidden
        self.attention = cfg.attention
        self.lstm = nn.LSTM(in_dim, H, batch_first=True, bidirectional=True)
        self.mu = nn.Linear(2 * H, 1, bias=False)  # eq. (4)'s mu
        layers, d = [], 2 * H
        for i, width in enumerate(cfg.dnn):
            layers += [nn.Linear(d, width), nn.ReLU(inplace=True)]
            if i == 0:
                layers.append(nn.Dropout(cfg.dropout))
            d = width
        layers.append(nn.Linear(d, cfg.n_classes))
        self.dnn = nn.Sequential(*layers)

    def _readout(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attention:
            alpha = torch.softmax(self.mu(y).squeeze(-1), dim=1)  # eq. (4)
        else:
            alpha = y.new_full(y.shape[:2], 1.0 / y.shape[1])  # mean pooling (Table 3 ablation)
        z = (alpha.unsqueeze(-1) * y).sum(dim=1)  # eq. (5)
        return self.dnn(z), alpha

    def infer(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``forward`` from cached projections [B, S, 2, 4H].

        Both directions are re-run over the window each time: the forward LSTM
        starts from a zero state at the window's first segment, and the backward
        one from its last, so neither state carries over from the previous window.
        Only the input projections (the 4096 x 512 matmuls) are reused.
        """
        fwd = _lstm_run(proj[:, :, 0], self.lstm.weight_hh_l0, reverse=False)
        bwd = _lstm_run(proj[:, :, 1], self.lstm.weight_hh_l0_reverse, reverse=True)
        return self._readout(torch.cat([fwd, bwd], dim=-1))


class BaselineHead(_ProjectedHead):
    """LSTM 512 over the segments' CNN features, last state -> dropout 0.5 -> classes."""

    def __init__(self, cfg: ModelConfig, in_dim: int):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, cfg.baseline_lstm, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.baseline_lstm, cfg.n_classes)

    def _readout(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = torch.zeros(y.shape[:2], device=y.device, dtype=y.dtype)
        last[:, -1] = 1.0  # the prediction reads the last state: all weight on the last segment
        return self.out(self.drop(y[:, -1])), last

    def infer(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._readout(_lstm_run(proj[:, :, 0], self.lstm.weight_hh_l0, reverse=False))


# --- the model ---------------------------------------------------------------------
class EmotionModel(nn.Module):
    """Front-end + segment embedder + utterance head.

    ``predict(wave)`` takes [B, N] or a list of [N_i] 16 kHz waves, fits each to
    the 3 s utterance (truncate / zero-pad), and returns probabilities [B, K].
    ``meta`` is a JSON-like dict saved with the checkpoint (what it was trained on).
    """

    def __init__(self, frontend_config: FrontendConfig | None = None, model_config: ModelConfig | None = None,
                 weights: str = "none"):
        super().__init__()
        self.frontend_config = frontend_config or FrontendConfig()
        self.model_config = mc = model_config or ModelConfig()
        self.frontend = Frontend(self.frontend_config)
        if mc.arch == "dcnn_blstmwa":
            self.embedder = SegmentEmbedder(mc.n_classes, weights)
            self.head = AttentionHead(mc, self.embedder.out_dim)
        else:
            fc = self.frontend_config
            self.embedder = BaselineEmbedder(fc.channels, fc.segment_frames, fc.n_mels)
            self.head = BaselineHead(mc, self.embedder.out_dim)
        self.meta: dict = {}
        self.embed_dtype: torch.dtype | None = None  # bf16/fp16: the CNN's dtype (half_precision_cnn)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model_config.labels

    @property
    def device(self) -> torch.device:
        return self.frontend.window.device

    @property
    def temperature(self) -> float:
        """Softmax temperature (1: as trained). ``ser-offline calibrate`` fits it on held-out predictions of
        the model's recipe and stores it in ``meta["calibration"]``; it changes how sure the probabilities
        are, never which label is on top."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [..., K] -> probabilities [..., K] (float32) at the model's temperature; every path that
        turns logits into probabilities (offline, the API, the live stream, the engine) goes through here."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def images(self, segments: torch.Tensor) -> torch.Tensor:
        """Segments [..., C, M, L] -> what the embedder takes."""
        if self.embedder.input_size == 0:
            return segments
        return self.frontend.images(segments)

    def embed(self, segments: torch.Tensor) -> torch.Tensor:
        """Segments [..., C, M, L] -> segment features [..., D] (float32; with ``embed_dtype`` the CNN's
        weights and images are in that dtype and its features come back as float32 for the head)."""
        lead = segments.shape[:-3]
        feats = self.embed_images(self.images(segments.reshape(-1, *segments.shape[-3:])))
        return feats.reshape(*lead, feats.shape[-1])

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """CNN images [N, C, H, W] -> features [N, D]; in ``embed_dtype`` where set, then back to float32."""
        if self.embed_dtype is None:
            return self.embedder(images)
        return self.embedder(images.to(self.embed_dtype)).float()

    def forward(self, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments [B, S, C, M, L] -> (logits [B, K], attention [B, S])."""
        return self.head(self.embed(segments))

    @torch.no_grad()
    def predict(self, wave: torch.Tensor | list[torch.Tensor], batch_size: int = 32, stats=None) -> torch.Tensor:
        """Utterance probabilities [B, K] (eval mode, no gradients).

        ``stats``: the speaker's (mean, std) [C, M] for ``speaker`` normalisation
        (``stream_ser.adaptation``); without them the stored corpus statistics.
        """
        was_training = self.training
        self.eval()
        waves = list(wave) if not isinstance(wave, torch.Tensor) or wave.dim() == 2 else [wave]
        out = []
        try:
            for i in range(0, len(waves), batch_size):
                segs = self.frontend.utterance_segments([w.to(self.device) for w in waves[i:i + batch_size]], stats)
                logits, _ = self(segs)
                out.append(self.probabilities(logits))
        finally:
            self.train(was_training)
        return torch.cat(out).cpu() if out else torch.zeros(0, len(self.labels))

    def describe(self) -> str:
        """One line for dashboards and logs: architecture and what it was trained on."""
        mc = self.model_config
        trained = self.meta.get("trained_on", "untrained (random initialisation)")
        licence = f"; terms: {self.meta['licence']}" if self.meta.get("licence") else ""
        inference = f"; {self.meta['inference']}" if self.meta.get("inference") else ""
        calibrated = f"; probabilities calibrated (temperature {self.temperature:g})" if self.temperature != 1 else ""
        return f"{mc.arch} ({len(mc.labels)} classes) — {trained}{licence}{inference}{calibrated}"


# --- checkpoints -------------------------------------------------------------------
def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w ~= q * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def compact_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The compact form: matrices with >= 65 536 entries as int8 + per-row scales, the other
    floating tensors (except the front-end's buffers) as float16."""
    out, scales = {}, {}
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            if v.dim() == 2 and v.numel() >= 65_536:
                out[k], scales[k] = _quantize_rows(v.float())
                continue
            if not k.startswith("frontend."):
                v = v.half()
        out[k] = v.clone()
    return out, scales


def expand_state(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                 like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`compact_state` (dequantise), with dtypes from ``like``."""
    out = {}
    for k, v in state.items():
        if k in scales:
            v = v.float() * scales[k][:, None]
        out[k] = v.to(like[k].dtype) if k in like else v
    return out


def compact_copy(model: "EmotionModel") -> "EmotionModel":
    """The model as it comes back from a compact checkpoint (for measuring what compaction costs)."""
    ref = model.state_dict()
    q, scales = compact_state(ref)
    copy = EmotionModel(model.frontend_config, model.model_config).to(model.device)
    copy.load_state_dict(expand_state(q, scales, ref))
    copy.meta = dict(model.meta)
    return copy.eval()


def save_checkpoint(model: EmotionModel, path: str | Path, compact: bool = False) -> Path:
    """Write one self-describing file: configs, labels, meta, normalisation statistics, weights.

    ``compact``: see :func:`compact_state` (about a quarter of the size; dequantised at load).
    """
    if compact:
        state, scales = compact_state(model.state_dict())
    else:
        state, scales = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, {}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "frontend_config": model.frontend_config.to_dict(),
        "model_config": model.model_config.to_dict(),
        "labels": list(model.labels),
        "meta": dict(model.meta),
        "compact": compact,
        "state_dict": state,
        "scales": scales,
    }
    return write_payload(payload, path)


def write_payload(payload: dict, path: str | Path) -> Path:
    """Write a checkpoint payload (as :func:`save_checkpoint` builds it, or :func:`read_checkpoint` returns
    it, amended) through a temporary file, so that a half-written checkpoint never has the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


PRECISIONS = ("auto", "int8", "int8x2", "fp32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def half_precision_cnn(model: EmotionModel, precision: str) -> EmotionModel:
    """The CNN (the embedder) in bf16 or fp16, in place: its weights converted once (autocast would
    convert FC6/FC7's 54 M weights on every call: a 64 px segment took 48 ms in bf16 on this CPU that way,
    against 12 ms in fp32), its images cast on the way in, its features back to float32; the front-end,
    the head and the probabilities stay float32. A GPU path (tensor cores); on the CPU it runs too,
    slower than the int8 fast path, so the accuracy cost can be measured anywhere
    (``python -m bench.int8_agreement --precision bf16``)."""
    model.embed_dtype = HALF_DTYPES[precision]
    model.embedder.to(model.embed_dtype)
    model.meta["inference"] = f"{precision} CNN, float32 front-end and head"
    return model


def fold_pool_into_fc6(model: EmotionModel) -> bool:
    """Below 227 px, in place: AlexNet's conv stack ends at s x s with s < 6 (1 at 64 px, 2 at 112 px), and
    the adaptive 6 x 6 pool only copies (or averages) those cells, so FC6's 9216 inputs are a fixed linear
    map of 256 s^2 values. FC6 composed with that map is one Linear(256 s^2, 4096): the same outputs to
    float rounding from 36x (64 px) or 9x (112 px) fewer weights, and the pool is skipped. Inference only
    (training keeps the paper's layers). Returns whether it folded."""
    emb = model.embedder
    if not isinstance(emb, SegmentEmbedder) or not isinstance(emb.avgpool, nn.AdaptiveAvgPool2d):
        return False
    size = emb.input_size or model.frontend_config.image_size
    fc6 = emb.fc[1]
    dev = fc6.weight.device
    with torch.no_grad():
        s = emb.features(torch.zeros(1, 3, size, size, device=dev)).shape[-1]
        if s >= 6:
            return False
        basis = torch.eye(s * s, device=dev).reshape(s * s, 1, s, s)
        pool = emb.avgpool(basis).reshape(s * s, -1).T  # [36, s^2]: each pooled cell from the conv cells
        channels = fc6.in_features // pool.shape[0]
        folded = nn.Linear(channels * s * s, fc6.out_features, device=dev)
        folded.weight.copy_((fc6.weight.reshape(fc6.out_features, channels, -1) @ pool).reshape(fc6.out_features, -1))
        folded.bias.copy_(fc6.bias)
    emb.fc[1] = folded
    emb.avgpool = nn.Identity()
    return True


# --- int8 convolutions (static quantisation) -----------------------------------------------------------
# Dynamic quantisation, which FC6/FC7 use, has no convolution; static quantisation does, with the ranges of
# the activations fixed beforehand from real segments (calibration, ``ser-offline int8-calibrate``) and
# stored in the checkpoint's meta. Fixed ranges also make a segment's features independent of the batch it
# rides in. Measured on this CPU (AlexNet's conv stack, x86 engine, float32 channels-last -> int8): one
# segment on one thread 6.5 -> 1.7 ms at 227 px, 2.3 -> 0.4 ms at 112 px; 64 segments on two threads
# 190 -> 55-73 ms at 227 px, 37 -> 15-17 ms at 112 px.
CONV_INT8_KEY = "conv_int8"  # meta key of the calibrated activation ranges
CONV_INT8_ENGINES = ("x86", "fbgemm", "onednn")  # quantised-kernel engines the ranges are valid for


class _QuantizedConvStack(nn.Module):
    """AlexNet's conv stack between a quantise and a dequantise step: float images in, float maps out."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        import copy

        from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules
        self.quant, self.features, self.dequant = QuantStub(), copy.deepcopy(features).float().eval(), DeQuantStub()
        self.features.to(memory_format=torch.contiguous_format)
        pairs = [[str(i), str(i + 1)] for i, m in enumerate(self.features)
                 if isinstance(m, nn.Conv2d) and i + 1 < len(self.features) and isinstance(self.features[i + 1], nn.ReLU)]
        fuse_modules(self.features, pairs, inplace=True)  # conv + ReLU as one quantised op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.features(self.quant(x)))


def _observed_points(stack: nn.Module) -> dict[str, nn.Module]:
    """The prepared stack's activation observers by module name (the input, then each conv's output)."""
    return {name: m.activation_post_process for name, m in stack.named_modules()
            if name not in ("", "features", "dequant") and hasattr(m, "activation_post_process")}


def calibrate_conv_int8(model: EmotionModel, images: torch.Tensor, batch: int = 64) -> dict:
    """The activation ranges of the embedder's conv stack from real CNN images [N, 3, S, S] (what
    :meth:`EmotionModel.images` makes of real segments) -> a JSON-able dict for ``meta["conv_int8"]``:
    per observed point its (scale, zero point, quant_min, quant_max), found by the engine's default
    observers (a histogram of each activation). The ranges belong to these weights: calibrate again after
    any training.

    The ranges are the engine's 7-bit ones (``reduce_range``: quant_max 127), but the quantised kernels clamp
    at 255, so every activation keeps twice its calibrated range as headroom. That headroom is what keeps the
    error down: about 1 activation in 10^4 on other speakers lies beyond the calibrated range, and ranges
    measured for 8 bits, which clip those, leave the bundled model's conv output 13.5 % from float32 instead
    of 2.5 % (``python -m bench.conv_int8_error``, 2026-11-27; the kernels themselves match integer
    arithmetic exactly, with no saturation)."""
    import warnings

    from torch.ao.quantization import get_default_qconfig, prepare
    emb = model.embedder
    if not isinstance(emb, SegmentEmbedder) or not isinstance(emb.features, nn.Sequential):
        raise ValueError("int8 convolutions are for the AlexNet embedder (dcnn_blstmwa) in float32")
    engine = torch.backends.quantized.engine
    if engine not in CONV_INT8_ENGINES:
        raise ValueError(f"the quantised engine {engine!r} is not one of {CONV_INT8_ENGINES}")
    stack = _QuantizedConvStack(emb.features).cpu().eval()  # (a copy: the model stays where it is)
    stack.qconfig = get_default_qconfig(engine)
    with warnings.catch_warnings():  # torch 2.11 flags torch.ao.quantization for a future move to torchao
        warnings.simplefilter("ignore")
        prepare(stack, inplace=True)
        with torch.no_grad():
            for i in range(0, len(images), batch):
                stack(_to_three_channels(images[i:i + batch].float().cpu()))
    points = {}
    for name, obs in _observed_points(stack).items():
        scale, zp = obs.calculate_qparams()
        points[name] = [float(scale), int(zp), int(obs.quant_min), int(obs.quant_max)]
    return {"engine": engine, "points": points, "images": int(len(images)),
            "image_size": int(images.shape[-1])}


def quantize_convolutions(model: EmotionModel, levels: int = 1) -> bool:
    """In place: the embedder's convolutions in int8 with the activation ranges stored in
    ``meta["conv_int8"]`` (:func:`calibrate_conv_int8`): ``levels`` 1, each activation one uint8 (the fastest),
    or 2, two uint8 levels (:class:`_TwoLevelConvStack`: a quarter of the error, slower). Returns False,
    changing nothing, where the checkpoint holds no ranges or this machine's quantised engine is not one they
    fit (for 2 levels: where this torch has no oneDNN quantised convolution)."""
    import warnings

    from torch.ao.quantization import FixedQParamsObserver, QConfig, convert, get_default_qconfig, prepare
    if levels not in (1, 2):
        raise ValueError(f"levels must be 1 or 2, got {levels}")
    cal = model.meta.get(CONV_INT8_KEY)
    emb = model.embedder
    engine = torch.backends.quantized.engine
    if (not cal or engine not in CONV_INT8_ENGINES or not isinstance(emb, SegmentEmbedder)
            or not isinstance(emb.features, nn.Sequential) or model.device.type != "cpu"):
        return False
    if levels == 2:
        if not two_level_convolutions_available():
            return False
        _named_fixed(emb.features, cal["points"])  # (ValueError: another network's ranges)
        emb.features = _TwoLevelConvStack(emb.features, cal["points"])
        return True
    stack = _QuantizedConvStack(emb.features).eval()
    default = get_default_qconfig(engine)
    weight = default.weight
    stack.dequant.qconfig = default  # (observes nothing; without a qconfig it would not become a dequantise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        points = dict(_named_fixed(stack.features, cal["points"]))
        for name, (scale, zp, qmin, qmax) in points.items():  # (the kernels clamp at 255, not at qmax)
            stack.get_submodule(name).qconfig = QConfig(
                activation=FixedQParamsObserver.with_args(scale=scale, zero_point=zp, dtype=torch.quint8,
                                                          quant_min=qmin, quant_max=qmax), weight=weight)
        prepare(stack, inplace=True)
        convert(stack, inplace=True)
    emb.features = stack
    return True


class _TwoLevelConvStack(nn.Module):
    """AlexNet's conv stack on int8 kernels with every activation carried as two uint8 levels, for about
    16-bit activations: float images in, float maps out (channels-last), the same values whatever the batch.

    Each convolution's input x becomes q1 = floor(x / s1) (s1: the stored calibrated step, the image's zero
    point kept) and q2 = round((x / s1 - q1) * 255), the remainder in steps of s1 / 255 (zero point 0: oneDNN's
    kernels are many times slower with another); the convolution runs on both (float32 output), summed, with
    the bias and ReLU fused into the second call. What is left is the weights' int8 rounding: the bundled
    model's conv output 0.67 % from float32 against 2.53 % with one level (``python -m bench.conv_int8_error``),
    at two int8 convolutions and a few element-wise passes per layer. oneDNN's quantised convolution
    (``torch.ops.onednn.qconv2d_pointwise``, the kernels torch.compile lowers int8 models to on x86)."""

    def __init__(self, features: nn.Sequential, points: dict):
        super().__init__()
        # what it was built from (oneDNN's packed weights are opaque tensors, which deepcopy cannot copy)
        self._source = (copy.deepcopy(features).float().cpu().eval(), copy.deepcopy(points))
        self.layers: list = []  # ("conv", params) or ("module", the float32 module: max-pooling)
        before = points["quant"]
        for i, m in enumerate(features):
            if isinstance(m, nn.Conv2d):
                s1, z1 = float(before[0]), int(before[1])
                w = m.weight.detach().float().cpu()
                w_q, w_scale = _quantize_rows(w.reshape(len(w), -1))  # per output channel, symmetric
                w_q = w_q.view_as(w)
                geometry = (list(m.stride), list(m.padding), list(m.dilation), m.groups)
                packed = [torch.ops.onednn.qconv_prepack(w_q, w_scale, s, z, *geometry, None)
                          for s, z in ((s1, z1), (s1 / 255, 0))]
                bias = None if m.bias is None else m.bias.detach().float().cpu()
                self.layers.append(("conv", (s1, z1, packed, w_scale, torch.zeros(len(w_scale), dtype=torch.long),
                                             bias, geometry)))
                before = points[f"features.{i}"]
            elif not isinstance(m, nn.ReLU):  # (every ReLU follows a convolution: fused into it)
                self.layers.append(("module", copy.deepcopy(m)))

    def __deepcopy__(self, memo):
        return _TwoLevelConvStack(*self._source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pointwise = torch.ops.onednn.qconv2d_pointwise
        x = x.float().contiguous(memory_format=torch.channels_last)
        for kind, layer in self.layers:
            if kind == "module":
                x = layer(x)
                continue
            s1, z1, (p1, p2), w_scale, w_zero, bias, (stride, padding, dilation, groups) = layer
            u = torch.mul(x, 1.0 / s1)
            if z1:
                u.add_(z1)
            coarse = u.floor().clamp_(0, 255)
            fine = u.sub_(coarse).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
            y = pointwise(coarse.to(torch.uint8), s1, z1, p1, w_scale, w_zero, bias, stride, padding, dilation,
                          groups, 1.0, 0, torch.float32, "none", [], "")
            x = pointwise.binary(fine, s1 / 255, 0, p2, w_scale, w_zero, y, None, stride, padding, dilation,
                                 groups, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "relu", [], "")
        return x


def two_level_convolutions_available() -> bool:
    """Whether this torch build has oneDNN's quantised convolution (x86 CPUs with oneDNN: the PyPI wheels)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
            and hasattr(torch.ops.onednn, "qconv_prepack"))


def _named_fixed(features: nn.Sequential, points: dict) -> list[tuple[str, list]]:
    """The stored points, checked against the conv stack's quantisable modules, fused or not (a mismatch:
    another network)."""
    names = ["quant"] + [f"features.{n}" for n, m in features.named_children()
                         if not isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.Identity))]
    if sorted(names) != sorted(points):
        raise ValueError(f"meta['{CONV_INT8_KEY}'] does not fit this network: {sorted(points)} vs {sorted(names)}")
    return [(n, points[n]) for n in names]


def quantize_head_projection(model: EmotionModel) -> bool:
    """The head's LSTM input projection (both directions' W_ih, 4096 x 1024 with the bundled head) as one
    dynamically quantised int8 linear layer, in place; its recurrence and everything after stay float32.
    The projection is computed once per segment (the live path caches it), and at float32 its 16.8 MB of
    weights, read right after FC7's, cost a one-segment hop more than the convolutions do; in int8 a
    segment's embedding and projection take half the time and 256 streams' projections an eighth
    (``docs/benchmarks.md``). False where the head has no LSTM to project for."""
    import warnings
    head = model.head
    lstm = getattr(head, "lstm", None)
    if not isinstance(head, _ProjectedHead) or not isinstance(lstm, nn.LSTM):
        return False
    with torch.no_grad():
        ws, bs = zip(*_input_weights(lstm))
        w, b = torch.cat(ws), torch.cat(bs)  # [dirs * 4H, D], [dirs * 4H]: the directions side by side
        linear = nn.Linear(w.shape[1], w.shape[0]).to(w.device)
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    with warnings.catch_warnings():  # torch 2.11 flags torch.ao.quantization for a future move to torchao
        warnings.simplefilter("ignore")
        head.int8_projection = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]
    return True


def quantize_for_cpu(model: EmotionModel, conv_levels: int = 1) -> EmotionModel:
    """The CPU fast path, in place: int8 inference for the embedder's FC6/FC7 (dynamic quantisation,
    fbgemm/oneDNN kernels) and for its convolutions where the checkpoint carries their activation ranges.

    FC6 and FC7 hold 218 MB of the AlexNet's weights and dominate one segment's cost
    on the CPU; weights become int8 per output channel and activations are
    quantised per batch on the fly. The convolutions run in int8 with the ranges
    measured on real speech (``meta["conv_int8"]``, :func:`quantize_convolutions`;
    ``ser-offline train`` stores them, ``ser-offline int8-calibrate`` adds them to
    older checkpoints); without them they stay float32, channels-last (NHWC), which
    oneDNN's kernels take about 30 % faster here at 227 px, for the same values to
    float rounding. The head's LSTM input projection runs in int8 too
    (:func:`quantize_head_projection`); its recurrence and classifier stay float32.
    Below 227 px the pool is first folded into FC6 (:func:`fold_pool_into_fc6`). CPU only.
    ``conv_levels`` 2: the convolutions' activations as two int8 levels (:class:`_TwoLevelConvStack`).
    """
    import warnings
    emb = model.embedder
    if not isinstance(emb, SegmentEmbedder) or model.device.type != "cpu":
        return model
    folded = fold_pool_into_fc6(model)
    with warnings.catch_warnings():  # torch 2.11 flags torch.ao.quantization for a future move to torchao
        warnings.simplefilter("ignore")
        emb.fc = torch.ao.quantization.quantize_dynamic(emb.fc, {nn.Linear}, dtype=torch.qint8)
    if quantize_convolutions(model, conv_levels):
        convs = ("int8 convolutions (static, calibrated)" if conv_levels == 1
                 else "int8 convolutions (static, calibrated, two-level activations)")
    else:
        emb.features.to(memory_format=torch.channels_last)
        convs = "channels-last convolutions"
    head = ", int8 LSTM input projection (dynamic)" if quantize_head_projection(model) else ""
    model.meta["inference"] = (f"int8 FC6/FC7 (dynamic), {convs}{head}" + (", pool folded into FC6" if folded else ""))
    return model


def read_checkpoint(path: str | Path) -> dict:
    """The raw payload of a checkpoint file (``weights_only=True``), as :func:`save_checkpoint` wrote it;
    :class:`CheckpointError` with a clear message when it is missing, unreadable or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}. Train one with `ser-offline train --corpus emodb --data DIR "
            f"--out {path.name}`, or leave out --checkpoint to use the bundled default model.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling a damaged file fails in many ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a stream_ser checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", precision: str = "auto",
                    payload: dict | None = None) -> EmotionModel:
    """Rebuild an :class:`EmotionModel` from a checkpoint (``weights_only=True``), in eval mode.
    ``payload``: the file's contents when the caller has read them already (:func:`read_checkpoint`).

    ``precision``: ``auto`` (int8 FC6/FC7 and head input projection on the CPU, and the convolutions where
    ``meta["conv_int8"]`` holds their activation ranges; fp32 elsewhere; see
    :func:`quantize_for_cpu`), ``int8`` (the same), ``int8x2`` (the same with the convolutions' activations
    as two int8 levels: :class:`_TwoLevelConvStack`), ``fp32``, or ``bf16`` / ``fp16`` (the CNN in
    half precision, :func:`half_precision_cnn`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    payload = read_checkpoint(path) if payload is None else payload
    path = Path(path)
    try:
        fc = FrontendConfig.from_dict(payload["frontend_config"])
        mc = ModelConfig.from_dict(payload["model_config"])
        model = EmotionModel(fc, mc, weights="none")
        state = expand_state(payload["state_dict"], payload.get("scales", {}), model.state_dict())
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint is damaged or from an incompatible version ({str(e)[:300]})") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
                              f"{' …' if len(bad) > 3 else ''}; the model would answer NaN. Retrain it.")
    model.meta = dict(payload.get("meta") or {})
    model = model.to(device).eval()
    if precision in HALF_DTYPES:
        return half_precision_cnn(model, precision)
    if precision != "fp32":
        quantize_for_cpu(model, 2 if precision == "int8x2" else 1)
    return model
