"""Training the DCNN-BLSTMwA model in the paper's two stages (section 3.2).

Stage 1 fine-tunes the AlexNet embedder on segments (segment label = utterance
label) with a class-weighted cross-entropy. Stage 2 embeds every segment once
(FC7, 4096-d) and trains the BLSTM-attention head on 8-segment utterances.
Model selection in both stages uses the validation speakers' UAR only.

Speed is mostly about doing work once: log-Mels are computed once per
(file, speed) and cached on disk keyed by the front-end config; segments live in
memory (on the device where it fits); images are resized on the device per batch;
CUDA runs use mixed precision and channels-last.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stream_ser.adaptation import speech_frames, stats_by_group
from stream_ser.audio import AudioError
from stream_ser.config import LOG_FLOOR, FrontendConfig, ModelConfig
from stream_ser.features import Frontend
from stream_ser.model import EmotionModel

from .augment import PAPER_SPEEDS, speed_perturb
from .corpora import Corpus, Utterance, load_waves
from .metrics import confusion_matrix, uar

Log = Callable[[str], None]


LR_SCHEDULES = ("constant", "onecycle")


@dataclass(frozen=True)
class TrainConfig:
    """Every training choice; presets fill it, every field is a command-line flag."""

    preset: str = "paper"
    stage1_epochs: int = 20
    stage1_batch: int = 128
    stage1_lr: float = 1e-4
    stage2_epochs: int = 30
    stage2_batch: int = 16
    stage2_lr: float = 5e-6
    speeds: tuple[float, ...] = PAPER_SPEEDS
    runs: int = 3
    weights: str = "imagenet"
    seed: int = 0
    image_size: int = 227
    channels: int = 3
    segment_frames: int = 64
    normalization: str = "segment"
    attention: bool = True
    arch: str = "dcnn_blstmwa"
    class_weights: bool = True
    amp: bool = True  # CUDA only
    max_per_speaker: int = 0  # 0: all; >0: a small subset (tests, smoke runs)
    # recipe levers beyond the paper (0 / "constant": off, the paper's training)
    lr_schedule: str = "constant"  # "onecycle": warm-up to the lr, cosine down to ~0 (both stages)
    label_smoothing: float = 0.0
    mask_frames: int = 0  # stage 1: one time mask of up to N frames per segment (SpecAugment)
    mask_bins: int = 0  # stage 1: one frequency mask of up to N Mel bins per segment
    mixup: float = 0.0  # stage 1: mixup alpha (0: off)
    start_at_speech: bool = False  # the 3 s window starts at the speech onset (FrontendConfig.start_at_speech)
    stage1_min_speech: float = 0.0  # stage 1 learns only from segments with at least this fraction of speech frames
    silence_floor: float = 0.0  # FrontendConfig.silence_floor (0: off)
    onset_below_peak_db: float = 0.0  # FrontendConfig.onset_below_peak_db (0: the absolute onset threshold)
    log_floor: float = LOG_FLOOR  # FrontendConfig.log_floor: Mel power floor before the log

    def __post_init__(self):
        object.__setattr__(self, "speeds", tuple(float(s) for s in self.speeds))
        if 1.0 not in self.speeds:
            raise ValueError("speeds must include 1.0 (the unmodified audio)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")

    def frontend_config(self) -> FrontendConfig:
        return FrontendConfig(channels=self.channels, segment_frames=self.segment_frames,
                              segment_shift=max(1, self.segment_frames // 2), image_size=self.image_size,
                              normalization=self.normalization, start_at_speech=self.start_at_speech,
                              silence_floor=self.silence_floor, onset_below_peak_db=self.onset_below_peak_db,
                              log_floor=self.log_floor)

    def model_config(self, labels: Sequence[str]) -> ModelConfig:
        return ModelConfig(labels=tuple(labels), arch=self.arch, attention=self.attention)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["speeds"] = list(self.speeds)
        return d


PRESETS: dict[str, TrainConfig] = {
    # The paper's values (DESIGN.md). ImageNet weights must be in the torch hub cache.
    "paper": TrainConfig(),
    # CPU-feasible: 10 EMO-DB folds in well under an hour on 2 cores. Smaller CNN input
    # (112 px: ~4x cheaper), 4 fine-tuning epochs at batch 32 (4x the optimizer steps of
    # batch 128 for the same compute: fold 03 UAR 48 % against 33 %), no augmentation, one
    # run per fold, and a head learning rate that converges in 30 epochs without augmentation.
    "quick": TrainConfig(preset="quick", stage1_epochs=4, stage1_batch=32, stage2_lr=1e-4, speeds=(1.0,), runs=1,
                         weights="none", image_size=112),
    # The best CPU recipe measured so far (docs/results/README.md): per-speaker normalisation, the
    # native 64 x 64 segment as the CNN input (no resize; FC6/FC7 dominate the cost anyway),
    # 8 epochs at batch 64 with a one-cycle schedule peaking at 3e-4 (both stages), fused Adam,
    # 3 s windows from the speech onset. Run it with `--pretrain ravdess` (the CNN first learns
    # on RAVDESS, once for all folds) for the best figure.
    "cpu": TrainConfig(preset="cpu", stage1_epochs=8, stage1_batch=64, stage1_lr=3e-4, stage2_epochs=30,
                       stage2_lr=3e-4, speeds=(1.0,), runs=1, weights="none", image_size=64,
                       normalization="speaker", lr_schedule="onecycle", start_at_speech=True),
}


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 over the classes present (paper section 3.2)."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


# --- features ----------------------------------------------------------------------
class FeatureBank:
    """log-Mel [M, T] of each utterance's 3 s window, per speed, cached on disk.

    The cache file is named by corpus, front-end (``FrontendConfig.log_mel_key``) and
    speed; every entry carries its file's path, size and modification time and is
    used only while they still match, so two corpora with one name never share
    features and a changed (or repaired) file is recomputed. Missing utterances are
    computed and added. Bad audio files are reported
    once through ``log`` and counted in ``bad``; they are left out, never fatal.
    """

    def __init__(self, corpus: Corpus, frontend_config: FrontendConfig, cache_dir: str | Path | None,
                 device: torch.device, log: Log = print, progress=None):
        self.corpus = corpus
        self.frontend = Frontend(frontend_config).to(device)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device = device
        self.log = log
        self.progress = progress
        self.by_uid = {u.uid: u for u in corpus.utterances}
        self.bad: dict[str, str] = {}
        self._mem: dict[float, dict[str, torch.Tensor]] = {}

    def _cache_path(self, speed: float) -> Path | None:
        if not self.cache_dir:
            return None
        return self.cache_dir / f"{self.corpus.name}-{self.frontend.config.log_mel_key()}-x{speed:.2f}.pt"

    def _fingerprint(self, uid: str) -> list:
        """What an entry was computed from: the file's path, size and modification time."""
        path = self.by_uid[uid].path
        try:
            st = path.stat()
            return [str(path), st.st_size, st.st_mtime_ns]
        except OSError:
            return [str(path), -1, -1]

    def _load_cache(self, speed: float) -> dict[str, torch.Tensor]:
        """Cached entries whose file is unchanged (same path, size, mtime); others are recomputed.

        A file that was bad is tried again when it has changed since."""
        path = self._cache_path(speed)
        if path and path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                prints = blob.get("fingerprints", {})
                fresh = lambda uid: uid in self.by_uid and prints.get(uid) == self._fingerprint(uid)
                for uid, reason in blob.get("bad", {}).items():
                    if fresh(uid):
                        self.bad[uid] = reason
                        self.bad[str(self.by_uid[uid].path)] = reason
                return {u: x for u, x in zip(blob["uids"], blob["log_mel"].unbind(0)) if fresh(u)}
            except Exception as e:  # a damaged cache is recomputed, not fatal
                self.log(f"feature cache {path} unreadable ({e}); recomputing")
        return {}

    def _save_cache(self, speed: float, table: dict[str, torch.Tensor]) -> None:
        path = self._cache_path(speed)
        if not path or not table:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        old: dict = {}
        if path.is_file():  # keep entries of utterances this corpus object does not hold (a subset run)
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                old = {u: (x, blob.get("fingerprints", {}).get(u)) for u, x in zip(blob["uids"], blob["log_mel"].unbind(0))
                       if u not in self.by_uid}
            except Exception:
                old = {}
        uids = sorted(table)
        bad = {u: r for u, r in self.bad.items() if u in self.by_uid}
        entries = {u: (table[u], self._fingerprint(u)) for u in uids} | old
        keys = sorted(entries)
        tmp = path.with_suffix(".tmp")
        prints = {u: entries[u][1] for u in keys} | {u: self._fingerprint(u) for u in bad}
        torch.save({"uids": keys, "log_mel": torch.stack([entries[u][0] for u in keys]), "fingerprints": prints,
                    "bad": bad}, tmp)
        tmp.replace(path)

    def log_mels(self, uids: Sequence[str], speed: float) -> tuple[list[str], torch.Tensor]:
        """-> (the uids that have audio, log-Mel [U, M, T] on CPU). Computes what is not cached."""
        if speed not in self._mem:
            self._mem[speed] = self._load_cache(speed)
        table = self._mem[speed]
        todo = [u for u in uids if u not in table and u not in self.bad]
        if todo:
            task = self.progress.add_task(f"log-Mel x{speed:g}", total=len(todo)) if self.progress else None
            step = (lambda: self.progress.advance(task)) if task is not None else None

            def report(e: AudioError):
                self.bad[e.source] = e.reason
                self.log(f"skipped bad audio file {e.source}: {e.reason}")

            waves, _ = load_waves([self.by_uid[u] for u in todo], on_error=report, progress=step)
            for u in todo:
                if str(self.by_uid[u].path) in self.bad:
                    self.bad[u] = self.bad[str(self.by_uid[u].path)]
            fe = self.frontend
            items = list(waves.items())
            with torch.no_grad():
                for i in range(0, len(items), 32):
                    chunk = items[i:i + 32]
                    batch = torch.stack([fe.prepare_utterance(speed_perturb(w, speed).to(self.device)) for _, w in chunk])
                    lm = fe.log_mel(batch).cpu()
                    for (uid, _), x in zip(chunk, lm):
                        table[uid] = x.clone()
            if task is not None:
                self.progress.remove_task(task)
            self._save_cache(speed, table)
        have = [u for u in uids if u in table]
        T = self.frontend.config.utterance_frames
        out = torch.stack([table[u] for u in have]) if have else torch.zeros(0, self.frontend.config.n_mels, T)
        return have, out


@dataclass
class SplitData:
    """Segments [U, S, C, M, L] and labels [U] of one split (on CPU or the device)."""

    uids: list[str]
    segments: torch.Tensor
    labels: torch.Tensor
    speech: torch.Tensor | None = None  # [U, S] fraction of each segment's frames that are speech

    def segment_view(self, min_speech: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """All segments [N, C, M, L] with their utterance's label [N]; only those with enough speech."""
        X = self.segments.reshape(-1, *self.segments.shape[-3:])
        y = self.labels.repeat_interleave(self.segments.shape[1])
        if min_speech > 0 and self.speech is not None:
            keep = (self.speech.reshape(-1) >= min_speech).nonzero().squeeze(1)
            X, y = X[keep.to(X.device)], y[keep.to(y.device)]
        return X, y


def build_split(bank: FeatureBank, model: EmotionModel, utts: Sequence[Utterance], speeds: Sequence[float],
                device: torch.device, per_speaker: bool = True) -> SplitData:
    """Normalised segments of ``utts`` at each speed.

    With ``speaker`` normalisation every speaker's statistics come from all of
    that speaker's utterances in ``utts`` at the same speed (their 3 s windows,
    speech frames only, never labels): a speed-perturbed copy of a speaker is
    treated as a speaker of its own, as its spectra differ. ``per_speaker=False``
    uses the model's stored corpus statistics instead (speaker adaptation off).
    """
    uids, segs, labels, speech = [], [], [], []
    lab = {u.uid: bank.corpus.label_index(u.label) if u.label in bank.corpus.labels else -1 for u in utts}
    spk = {u.uid: u.speaker for u in utts}
    fe = model.frontend
    for s in speeds:
        have, lm = bank.log_mels([u.uid for u in utts], s)
        if not have:
            continue
        uids += [f"{u}@{s:g}" for u in have]
        raw = fe.raw_segments_from_log_mel(lm.to(device))
        stats = None
        if fe.config.normalization == "speaker" and per_speaker:
            stats = stats_by_group(raw, [spk[u] for u in have])
        segs.append(fe.normalize(raw, stats))
        speech.append(speech_frames(raw).float().mean(-1).cpu())
        del raw
        labels.append(torch.tensor([lab[u] for u in have], dtype=torch.long))
    if not segs:
        raise ValueError("no usable utterances in this split")
    return SplitData(uids, torch.cat(segs), torch.cat(labels).to(device), torch.cat(speech))


# --- the two stages ----------------------------------------------------------------
class BestEpoch:
    """Keeps the state of the epoch with the best validation UAR (the last epoch when there is no validation)."""

    def __init__(self, module: torch.nn.Module, progress, title: str, epochs: int):
        self.module = module
        self.best = {"val_uar": -1.0, "epoch": 0, "state": None}
        self.progress = progress
        self.task = progress.add_task(title, total=epochs) if progress else None

    def update(self, epoch: int, val_uar: float, has_val: bool, description: str) -> None:
        if not has_val or val_uar > self.best["val_uar"]:
            self.best = {"val_uar": val_uar, "epoch": epoch, "state": copy.deepcopy(self.module.state_dict())}
        if self.task is not None:
            self.progress.update(self.task, advance=1, description=description)

    def finish(self, history: list) -> dict:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.module.load_state_dict(self.best["state"])
        return {"best_epoch": self.best["epoch"], "best_val_uar": self.best["val_uar"], "history": history}


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel: the same update, but on the CPU one step over AlexNet's 58 M
    parameters costs ~40 ms instead of ~300 ms (measured, 2 cores), which dominated small batches."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, lr: float, steps: int):
    """None for a constant rate; else one cycle over ``steps`` optimizer steps (10 % warm-up, cosine down)."""
    if cfg.lr_schedule == "constant" or steps < 2:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1,
                                               anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)


def _mask(x: torch.Tensor, width: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """SpecAugment-style: per item of x [N, C, M, L], zero one band of 0..width along ``dim`` (-2 bins, -1 frames).

    Zero is the mean after normalisation, so a masked band looks like "no information".
    """
    n, size = x.shape[0], x.shape[dim]
    w = torch.randint(0, width + 1, (n,), generator=gen)
    start = (torch.rand(n, generator=gen) * (size - w + 1).float()).long()
    pos = torch.arange(size)
    keep = ~((pos[None] >= start[:, None]) & (pos[None] < (start + w)[:, None]))  # [N, size]
    shape = [n, 1, 1, 1]
    shape[dim] = size
    return x * keep.reshape(shape).to(x)


def augment_segments(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Stage-1 masking of normalised segments [N, C, M, L] (a copy; the input is untouched)."""
    if cfg.mask_frames:
        x = _mask(x, cfg.mask_frames, -1, gen)
    if cfg.mask_bins:
        x = _mask(x, cfg.mask_bins, -2, gen)
    return x


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def _segment_val_uar(model: EmotionModel, val: SplitData, device, amp: bool, min_speech: float = 0.0,
                     batch: int = 256) -> float:
    model.eval()
    X, y = val.segment_view(min_speech)
    preds = []
    for i in range(0, len(X), batch):
        with _autocast(device, amp):
            preds.append(model.embedder.logits(model.images(X[i:i + batch].to(device))).argmax(-1).cpu())
    return uar(confusion_matrix(y.cpu().tolist(), torch.cat(preds).tolist(), len(model.labels)))


def stage1_finetune(model: EmotionModel, train: SplitData, val: SplitData | None, cfg: TrainConfig,
                    device: torch.device, gen: torch.Generator, log: Log, progress=None) -> dict:
    """Fine-tune the embedder on segments; keep the epoch with the best validation segment UAR."""
    emb = model.embedder
    X, y = train.segment_view(cfg.stage1_min_speech)  # segments of silence carry no emotion: left out when asked
    if cfg.stage1_min_speech > 0:
        log(f"stage 1 learns from {len(X)} of {train.segments.shape[0] * train.segments.shape[1]} segments "
            f"(those with >= {100 * cfg.stage1_min_speech:.0f} % speech frames)")
    K = len(model.labels)
    weight = class_weights(y.cpu(), K).to(device) if cfg.class_weights else None
    opt = _adam(emb.parameters(), cfg.stage1_lr)
    sched = _scheduler(opt, cfg, cfg.stage1_lr, cfg.stage1_epochs * -(-len(X) // cfg.stage1_batch))
    keeper = BestEpoch(emb, progress, "stage 1 (fine-tune CNN)", cfg.stage1_epochs)
    history = []
    n_batches = -(-len(X) // cfg.stage1_batch)
    for epoch in range(1, cfg.stage1_epochs + 1):
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        total, n, hits, t0 = 0.0, 0, 0, time.perf_counter()
        batches = progress.add_task(f"stage 1 epoch {epoch}/{cfg.stage1_epochs}", total=n_batches) if progress else None
        for i in range(0, len(X), cfg.stage1_batch):
            idx = perm[i:i + cfg.stage1_batch]
            segs = X[idx.to(X.device)]
            if cfg.mask_frames or cfg.mask_bins:
                segs = augment_segments(segs.cpu(), cfg, gen).to(segs.device)
            target = y[idx.to(y.device)].to(device)
            lam, partner = 1.0, None
            if cfg.mixup > 0:
                lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(cfg.mixup, cfg.mixup))
                partner = torch.randperm(len(idx), generator=gen).to(segs.device)
                segs = lam * segs + (1 - lam) * segs[partner]
            imgs = model.images(segs.to(device, non_blocking=True))
            if device.type == "cuda":
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            with _autocast(device, cfg.amp):
                logits = emb.logits(imgs)
            loss = F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=cfg.label_smoothing)
            if partner is not None:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), target[partner.to(device)], weight=weight,
                                                                label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
            hits += int((logits.argmax(-1) == target).sum())
            if batches is not None:
                progress.update(batches, advance=1, description=f"stage 1 epoch {epoch}/{cfg.stage1_epochs} "
                                f"loss {total / n:.3f} acc {hits / n:.2f}")
        if batches is not None:
            progress.remove_task(batches)
        secs = time.perf_counter() - t0
        val_uar = _segment_val_uar(model, val, device, cfg.amp, cfg.stage1_min_speech) if val is not None else float("nan")
        rec = {"epoch": epoch, "loss": total / n, "train_accuracy": hits / n, "val_segment_uar": val_uar,
               "seconds": secs, "segments_per_s": n / secs}
        history.append(rec)
        val_txt = f"val segment UAR {val_uar:.4f}" if val is not None else "no validation speaker (last epoch kept)"
        log(f"stage1 epoch {epoch}/{cfg.stage1_epochs} loss {rec['loss']:.4f} train acc {hits / n:.3f} {val_txt} "
            f"({rec['segments_per_s']:.0f} seg/s, {secs:.0f} s)")
        keeper.update(epoch, val_uar, val is not None, f"stage 1 epoch {epoch} loss {rec['loss']:.3f} val {val_uar:.3f}")
    return keeper.finish(history)


@torch.no_grad()
def embed_split(model: EmotionModel, split: SplitData, device: torch.device, amp: bool, batch: int = 256) -> torch.Tensor:
    """Each segment embedded once: [U, S, C, M, L] -> [U, S, D] (eval mode)."""
    model.eval()
    X = split.segments.reshape(-1, *split.segments.shape[-3:])
    out = []
    for i in range(0, len(X), batch):
        imgs = model.images(X[i:i + batch].to(device))
        if device.type == "cuda":
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        # a model loaded for bf16/fp16 inference (half_precision_cnn) embeds in its own dtype, without autocast
        with _autocast(device, amp and model.embed_dtype is None):
            out.append(model.embed_images(imgs).float())
    return torch.cat(out).reshape(*split.segments.shape[:2], -1)


@torch.no_grad()
def head_probs(model: EmotionModel, feats: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.probabilities(model.head(feats[i:i + batch])[0]) for i in range(0, len(feats), batch)])


def stage2_head(model: EmotionModel, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None,
                val_y: torch.Tensor | None, cfg: TrainConfig, gen: torch.Generator, log: Log,
                progress=None, trainable: torch.nn.Module | None = None, inputs_are_segments: bool = False) -> dict:
    """Train the head on utterances (batch 16); keep the epoch with the best validation UAR.

    With ``inputs_are_segments`` (the 2-CNN-LSTM baseline) the inputs are segments and
    the whole network is trained end to end.
    """
    device = model.device
    module = trainable or model.head
    K = len(model.labels)
    weight = class_weights(train_y.cpu(), K).to(device) if cfg.class_weights else None
    lr = cfg.stage1_lr if inputs_are_segments else cfg.stage2_lr
    opt = _adam(module.parameters(), lr)
    sched = _scheduler(opt, cfg, lr, cfg.stage2_epochs * -(-len(train_x) // cfg.stage2_batch))
    forward = model if inputs_are_segments else model.head

    def predict(x):
        model.eval()
        with torch.no_grad():
            return torch.cat([forward(x[i:i + 64].to(device))[0].argmax(-1).cpu() for i in range(0, len(x), 64)])

    keeper = BestEpoch(module, progress, "stage 2 (BLSTM-attention head)", cfg.stage2_epochs)
    history = []
    for epoch in range(1, cfg.stage2_epochs + 1):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(train_x), cfg.stage2_batch):
            idx = perm[i:i + cfg.stage2_batch]
            logits, _ = forward(train_x[idx.to(train_x.device)].to(device))
            loss = F.cross_entropy(logits.float(), train_y[idx.to(train_y.device)].to(device), weight=weight,
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        val_uar = float("nan")
        if val_x is not None:
            val_uar = uar(confusion_matrix(val_y.cpu().tolist(), predict(val_x).tolist(), K))
        history.append({"epoch": epoch, "loss": total / n, "val_uar": val_uar})
        keeper.update(epoch, val_uar, val_x is not None, f"stage 2 epoch {epoch} loss {total / n:.3f} val {val_uar:.3f}")
    out = keeper.finish(history)
    if val_x is not None:
        log(f"stage2 best epoch {out['best_epoch']} val UAR {out['best_val_uar']:.4f} (last loss {history[-1]['loss']:.4f})")
    else:
        log(f"stage2 {cfg.stage2_epochs} epochs, no validation speaker: last epoch kept (last loss {history[-1]['loss']:.4f})")
    warn_if_collapsed(predict(train_x), K, model.labels, log)
    return out


def warn_if_collapsed(pred: torch.Tensor, n_classes: int, labels, log: Log, share: float = 0.9) -> bool:
    """Log a warning when one class takes ``share`` of the predictions on the training data (a model that
    learnt one answer: too few epochs, a bad learning rate, or NaN inputs); True if so."""
    if n_classes < 2 or pred.numel() == 0:
        return False
    counts = torch.bincount(pred, minlength=n_classes)
    top = int(counts.argmax())
    if counts[top] >= share * pred.numel():
        log(f"warning: the model predicts {labels[top]!r} for {100 * float(counts[top]) / pred.numel():.0f} % of its "
            f"own training utterances: it has collapsed to one class (more epochs, another learning rate, "
            f"or check the data)")
        return True
    return False


def train_model(bank: FeatureBank, train_utts: Sequence[Utterance], val_utts: Sequence[Utterance], cfg: TrainConfig,
                device: torch.device, seed: int, log: Log = print, progress=None) -> tuple[EmotionModel, dict]:
    """Both stages on ``train_utts`` (augmented with ``cfg.speeds``), selected on ``val_utts`` (never augmented)."""
    gen = seed_everything(seed)
    model = EmotionModel(cfg.frontend_config(), cfg.model_config(bank.corpus.labels), weights=cfg.weights).to(device)
    t0 = time.perf_counter()
    if cfg.normalization in ("corpus", "speaker"):  # speaker: the corpus statistics are the live warm-up
        _, lm = bank.log_mels([u.uid for u in train_utts], 1.0)
        model.frontend.set_corpus_stats(model.frontend.raw_segments_from_log_mel(lm.to(device)))
    # data stays on the device where it fits (CUDA); on CPU it is where it already is
    train = build_split(bank, model, train_utts, cfg.speeds, device)
    val = build_split(bank, model, val_utts, (1.0,), device) if val_utts else None
    info: dict = {"n_train_utterances": len(train.uids), "n_val_utterances": len(val.uids) if val else 0,
                  "n_train_segments": int(train.segments.shape[0] * train.segments.shape[1])}
    log(f"train {len(train.uids)} utterances ({info['n_train_segments']} segments, speeds {list(cfg.speeds)}), "
        f"val {info['n_val_utterances']}")
    if cfg.arch == "cnn_lstm":
        info["stage2"] = stage2_head(model, train.segments, train.labels, val.segments if val else None,
                                     val.labels if val else None, cfg, gen, log, progress,
                                     trainable=model, inputs_are_segments=True)
    else:
        t1 = time.perf_counter()
        info["stage1"] = stage1_finetune(model, train, val, cfg, device, gen, log, progress)
        info["stage1_seconds"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        tx = embed_split(model, train, device, cfg.amp)
        vx = embed_split(model, val, device, cfg.amp) if val else None
        info["embed_seconds"] = time.perf_counter() - t2
        info["stage2"] = stage2_head(model, tx, train.labels, vx, val.labels if val else None, cfg, gen, log, progress)
    info["train_seconds"] = time.perf_counter() - t0
    model.eval()
    return model, info


def evaluate_model(model: EmotionModel, bank: FeatureBank, utts: Sequence[Utterance], device: torch.device,
                   amp: bool = False) -> dict:
    """Test predictions on unmodified audio: labels, predictions, probabilities, confusion."""
    split = build_split(bank, model, utts, (1.0,), device)
    if model.model_config.arch == "cnn_lstm":
        model.eval()
        with torch.no_grad():
            probs = torch.cat([model.probabilities(model(split.segments[i:i + 64])[0])
                               for i in range(0, len(split.segments), 64)])
    else:
        probs = head_probs(model, embed_split(model, split, device, amp))
    pred = probs.argmax(-1).cpu().tolist()
    true = split.labels.cpu().tolist()
    cm = confusion_matrix(true, pred, len(model.labels))
    return {"uids": [u.split("@")[0] for u in split.uids], "true": true, "pred": pred,
            "probs": probs.cpu().numpy().round(5).tolist(), "confusion": cm.tolist(), "uar": uar(cm),
            "wa": float(np.trace(cm) / max(cm.sum(), 1))}


def config_from_args(preset: str, overrides: dict) -> TrainConfig:
    """A preset with the overrides that were given (None means not given)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[preset], **given)


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
