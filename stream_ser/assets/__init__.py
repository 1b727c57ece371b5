"""Bundled files: the default model (compact checkpoint) and a short speech sample for the no-microphone case."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "default.pt"
SAMPLE = "sample.wav"


def default_checkpoint() -> Path | None:
    p = HERE / DEFAULT_MODEL
    return p if p.is_file() else None


def sample_path() -> Path | None:
    p = HERE / SAMPLE
    return p if p.is_file() else None
