"""Corpora: EMO-DB, RAVDESS (speech), IEMOCAP (improvised, 4 classes) and any CSV manifest.

A :class:`Corpus` is a list of :class:`Utterance` records plus label names.
Loading audio goes through :func:`load_waves`, which reports and counts bad
files and goes on: one bad file never aborts a corpus run.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from stream_ser.audio import AudioError, load_audio
from stream_ser.config import EMODB_LABELS

EMODB_CODES = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear",
               "F": "happiness", "T": "sadness", "N": "neutral"}
EMODB_NAME = re.compile(r"^(\d\d)([ab]\d\d)([WLEAFTN])([a-z])$")

# RAVDESS emotion codes (file name field 3), named like EMO-DB's where they share an emotion
RAVDESS_CODES = {"01": "neutral", "02": "calm", "03": "happiness", "04": "sadness", "05": "anger", "06": "fear",
                 "07": "disgust", "08": "surprise"}
RAVDESS_LABELS = ("anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
RAVDESS_NAME = re.compile(r"^03-01-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)$")

IEMOCAP_LABELS = ("angry", "happy", "neutral", "sad")
IEMOCAP_CODES = {"ang": "angry", "hap": "happy", "neu": "neutral", "sad": "sad"}
IEMOCAP_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(\S+)\s+(\S+)\s+\[")


class CorpusError(ValueError):
    """A corpus folder or manifest that cannot be used (message says what and where)."""


@dataclass(frozen=True)
class Utterance:
    path: Path
    label: str
    speaker: str
    fold: str  # EMO-DB: the speaker; IEMOCAP: the session
    uid: str


@dataclass
class Corpus:
    name: str
    labels: tuple[str, ...]
    utterances: list[Utterance]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason) seen while listing

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    @property
    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    @property
    def folds(self) -> list[str]:
        return sorted({u.fold for u in self.utterances})

    def counts(self, key: Callable[[Utterance], str]) -> Counter:
        return Counter(key(u) for u in self.utterances)

    def subset(self, keep: Callable[[Utterance], bool]) -> "Corpus":
        return Corpus(self.name, self.labels, [u for u in self.utterances if keep(u)], list(self.skipped))

    def first_per_speaker(self, n: int) -> "Corpus":
        """At most ``n`` utterances per speaker, in corpus order (0: all) — for smoke runs."""
        if not n:
            return self
        seen: Counter = Counter()
        keep = set()
        for u in self.utterances:
            if seen[u.speaker] < n:
                seen[u.speaker] += 1
                keep.add(u.uid)
        return self.subset(lambda u: u.uid in keep)


def load_emodb(root: str | Path) -> Corpus:
    """EMO-DB from its file names (``03a01Fa.wav``: speaker 03, text a01, emotion F, version a).

    ``root`` is the corpus folder or its ``wav/`` subfolder.
    """
    root = Path(root)
    folder = root / "wav" if (root / "wav").is_dir() else root
    if not folder.is_dir():
        raise CorpusError(f"EMO-DB folder not found: {root} (expected a folder of files like 03a01Fa.wav)")
    utts, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".wav":
            continue
        m = EMODB_NAME.match(p.stem)
        if not m:
            skipped.append((str(p), "file name is not an EMO-DB name (e.g. 03a01Fa.wav)"))
            continue
        spk, text, code, version = m.groups()
        utts.append(Utterance(p, EMODB_CODES[code], spk, spk, p.stem))
    if not utts:
        raise CorpusError(f"no EMO-DB wav files in {folder}")
    return Corpus("emodb", EMODB_LABELS, utts, skipped)


def load_ravdess(root: str | Path) -> Corpus:
    """RAVDESS speech (audio only) from its file names (``Actor_05/03-01-06-02-01-02-05.flac``).

    Fields: modality 03 (audio), channel 01 (speech), emotion, intensity (01 normal,
    02 strong), statement, repetition, actor. The actor is the speaker; the fold is
    a group of 4 consecutive actors (6 folds: ``actors01-04`` ... ``actors21-24``, 2
    women and 2 men each), so speaker-independent evaluation tests 4 actors, validates
    on one actor of the next group and trains on the other 19. The uid is the file
    stem (unique: it contains the actor).
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"RAVDESS folder not found: {root} (expected Actor_01 .. Actor_24 folders)")
    utts, skipped = [], []
    for p in sorted(root.glob("Actor_*/*")):
        if p.suffix.lower() not in (".flac", ".wav"):
            continue
        m = RAVDESS_NAME.match(p.stem)
        if not m:
            skipped.append((str(p), "not a RAVDESS speech file name (e.g. 03-01-06-02-01-02-05.flac)"))
            continue
        code, intensity, statement, repetition, actor = m.groups()
        if p.parent.name != f"Actor_{actor}":
            skipped.append((str(p), f"actor {actor} in the name but in folder {p.parent.name}"))
            continue
        group = f"actors{4 * ((int(actor) - 1) // 4) + 1:02d}-{4 * ((int(actor) - 1) // 4) + 4:02d}"
        utts.append(Utterance(p, RAVDESS_CODES[code], actor, group, p.stem))
    if not utts:
        raise CorpusError(f"no RAVDESS speech files (03-01-*.flac) under {root}/Actor_*")
    return Corpus("ravdess", RAVDESS_LABELS, utts, skipped)


def ravdess_intensity(u: Utterance) -> str:
    """``normal`` or ``strong`` from a RAVDESS utterance's file name."""
    return "strong" if u.uid.split("-")[3] == "02" else "normal"


def load_iemocap(root: str | Path, include_excited: bool = False) -> Corpus:
    """IEMOCAP improvised dialogues, 4 classes, the session as the fold.

    Standard release layout: ``Session{1..5}/dialog/EmoEvaluation/*.txt`` for the
    labels and ``Session{n}/sentences/wav/<dialog>/<utterance>.wav`` for the audio.
    The speaker is the session and the utterance's gender (``Ses01F``).
    ``include_excited`` merges ``exc`` into happy (a common variant; off as in the paper).
    """
    root = Path(root)
    sessions = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        raise CorpusError(f"IEMOCAP folder not found or not in the release layout: {root} (expected Session1..Session5)")
    codes = dict(IEMOCAP_CODES)
    if include_excited:
        codes["exc"] = "happy"
    utts, skipped = [], []
    for sess in sessions:
        session_id = "Ses%02d" % int(sess.name[-1])
        for txt in sorted((sess / "dialog" / "EmoEvaluation").glob("*.txt")):
            if "impro" not in txt.stem:
                continue
            for line in txt.read_text(errors="replace").splitlines():
                m = IEMOCAP_LINE.match(line)
                if not m:
                    continue
                uid, code = m.groups()
                if code not in codes:
                    continue
                dialog = uid.rsplit("_", 1)[0]
                wav = sess / "sentences" / "wav" / dialog / f"{uid}.wav"
                if not wav.exists():
                    skipped.append((str(wav), "listed in EmoEvaluation but the wav is missing"))
                    continue
                gender = uid.rsplit("_", 1)[1][0]
                utts.append(Utterance(wav, codes[code], session_id + gender, session_id, uid))
    if not utts:
        raise CorpusError(f"no improvised IEMOCAP utterances with labels {sorted(codes)} under {root}")
    return Corpus("iemocap", IEMOCAP_LABELS, utts, skipped)


def load_manifest(csv_path: str | Path, labels: Iterable[str] | None = None) -> Corpus:
    """A CSV with columns ``path,label,speaker[,fold]`` (header required).

    Relative paths are relative to the CSV's folder; ``fold`` defaults to the
    speaker. Label order is ``labels`` if given, else sorted.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CorpusError(f"manifest not found: {csv_path}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"path", "label", "speaker"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise CorpusError(f"{csv_path}: header must have columns path,label,speaker[,fold]; got {reader.fieldnames}")
        utts = []
        for i, row in enumerate(reader, start=2):
            p = Path(row["path"])
            if not p.is_absolute():
                p = csv_path.parent / p
            if not row["label"] or not row["speaker"]:
                raise CorpusError(f"{csv_path}:{i}: empty label or speaker")
            # the uid is the path relative to the manifest (without suffix), so spkA/clip.wav and
            # spkB/clip.wav stay two utterances; absolute paths keep their whole path
            rel = Path(row["path"])
            uid = (rel.with_suffix("") if not rel.is_absolute() else p.with_suffix("")).as_posix()
            utts.append(Utterance(p, row["label"], row["speaker"], row.get("fold") or row["speaker"], uid))
    if not utts:
        raise CorpusError(f"{csv_path}: no rows")
    dup = [uid for uid, n in Counter(u.uid for u in utts).items() if n > 1]
    if dup:
        raise CorpusError(f"{csv_path}: the same file is listed more than once ({dup[:3]})")
    found = sorted({u.label for u in utts})
    order = tuple(labels) if labels else tuple(found)
    missing = set(found) - set(order)
    if missing:
        raise CorpusError(f"{csv_path}: labels {sorted(missing)} not in the given label list")
    return Corpus(csv_path.stem, order, utts)


def combine(corpora: list[Corpus]) -> Corpus:
    """Several corpora as one, for multi-corpus training.

    Labels: the union, in the first corpus's order, then new ones sorted. No label
    is masked: an utterance of a corpus that lacks a label (RAVDESS has no boredom)
    simply never carries it. Speakers, folds and uids are prefixed with the corpus
    name (``emodb:03``) so no two corpora can share one.
    """
    if len(corpora) == 1:
        return corpora[0]
    labels = list(corpora[0].labels)
    labels += sorted({lab for c in corpora[1:] for lab in c.labels} - set(labels))
    utts, skipped = [], []
    for c in corpora:
        utts += [Utterance(u.path, u.label, f"{c.name}:{u.speaker}", f"{c.name}:{u.fold}", f"{c.name}:{u.uid}")
                 for u in c.utterances]
        skipped += c.skipped
    return Corpus("+".join(c.name for c in corpora), tuple(labels), utts, skipped)


def load_corpus(name: str, data: str | Path) -> Corpus:
    """By name: ``emodb``, ``ravdess``, ``iemocap``, ``csv`` (``data`` is the manifest), or several
    joined by ``+`` with their folders joined by ``,`` (``emodb+ravdess``, ``DIR1,DIR2``): see :func:`combine`."""
    if "+" in name:
        names, dirs = name.split("+"), str(data).split(",")
        if len(names) != len(dirs):
            raise CorpusError(f"--corpus {name} names {len(names)} corpora but --data gives {len(dirs)} folders "
                              "(separate them with commas)")
        return combine([load_corpus(n, d) for n, d in zip(names, dirs)])
    if name == "emodb":
        return load_emodb(data)
    if name == "iemocap":
        return load_iemocap(data)
    if name == "ravdess":
        return load_ravdess(data)
    if name == "csv":
        return load_manifest(data)
    raise CorpusError(f"unknown corpus {name!r} (emodb, ravdess, iemocap, csv)")


def load_waves(utterances: Iterable[Utterance], on_error: Callable[[AudioError], None] | None = None,
               progress: Callable[[], None] | None = None) -> tuple[dict[str, torch.Tensor], list[AudioError]]:
    """Read every utterance's audio (16 kHz mono). Bad files are collected, reported, skipped."""
    waves, bad = {}, []
    for u in utterances:
        try:
            waves[u.uid] = load_audio(u.path)
        except AudioError as e:
            bad.append(e)
            if on_error:
                on_error(e)
        if progress:
            progress()
    return waves, bad
