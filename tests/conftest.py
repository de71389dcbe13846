import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def write_flac(path: Path, seconds: float = 0.5, sr: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    """A short noise+tone FLAC (what LibriSpeech stores), for fixtures."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(n)
    x = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, format="FLAC", subtype="PCM_16")
    return path


def write_chapter(split_dir: Path, speaker: str, chapter: str, texts: dict[str, str], **audio_kw) -> Path:
    """`texts` maps utterance index -> transcript; writes LibriSpeech-layout audio + trans.txt."""
    chap = split_dir / speaker / chapter
    lines = []
    for i, (utt, text) in enumerate(texts.items()):
        uid = f"{speaker}-{chapter}-{utt}"
        write_flac(chap / f"{uid}.flac", seed=i, **audio_kw)
        lines.append(f"{uid} {text}")
    (chap / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return chap


@pytest.fixture
def python() -> str:
    return sys.executable
