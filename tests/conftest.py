"""Shared fixtures: the real EMO-DB corpus (skipped with a reason where absent), small generated audio."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMODB = Path(os.environ.get("STREAM_SER_EMODB", ROOT.parent / "shared" / "data" / "emodb"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emodb_dir() -> Path:
    if not (EMODB / "wav").is_dir():
        pytest.skip(f"EMO-DB not found at {EMODB} (set STREAM_SER_EMODB or place it at ../shared/data/emodb)")
    return EMODB


@pytest.fixture(scope="session")
def emodb_wav(emodb_dir):
    """Path of one real EMO-DB file by stem."""
    def get(stem: str) -> Path:
        return emodb_dir / "wav" / f"{stem}.wav"
    return get
