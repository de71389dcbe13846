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


# A tiny offline corpus and model: enough to run every stage in seconds.
TINY_DATA = [
    "data.synth.train_hours=0.01",
    "data.synth.dev_utterances=4",
    "data.synth.test_utterances=4",
    "data.synth.train_espeak_speakers=4",
    "data.synth.train_flite_speakers=4",
    "data.synth.heldout_espeak_speakers=1",
    "data.synth.heldout_flite_speakers=1",
    "data.tokenizer.vocab_size=40",
    "data.jobs=2",
]
TINY_MODEL = [
    "model.encoder.d_model=32",
    "model.encoder.n_layers=1",
    "model.encoder.n_heads=2",
    "model.encoder.ff_dim=64",
    "model.encoder.kernel_size=7",
    "model.subsampling_channels=8",
    "model.decoder.n_layers=1",
    "model.decoder.n_heads=2",
    "model.decoder.ff_dim=64",
    "train.max_batch_seconds=12",
    "train.warmup_steps=5",
    "logger=csv",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny synthesized corpus (prepared + tokenizer), shared by the tests that train."""
    from edgeconformer.config import compose
    from edgeconformer.data.prepare import prepare, tokenize

    root = tmp_path_factory.mktemp("tiny")
    cfg = compose([*TINY_DATA, f"data.root={root / 'raw'}", f"data.out_dir={root / 'prepared'}"])
    prepare(cfg)
    tokenize(cfg)
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared machine spinning threads get descheduled."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def package_metadata(path) -> dict:
    """A saved .mlpackage's metadata as an app reads it: standard fields plus the user-defined values, the JSON
    ones decoded, integers as integers and the SentencePiece model as bytes (docs/export.md)."""
    import base64
    import json

    import coremltools as ct

    meta = ct.utils.load_spec(str(path)).description.metadata
    user = dict(meta.userDefined)
    out = {
        "author": meta.author,
        "license": meta.license,
        "short_description": meta.shortDescription,
        "version": meta.versionString,
        **user,
    }
    for key in ("features", "cmvn_folded", "vocabulary"):
        if key in user:
            out[key] = json.loads(user[key])
    for key in ("sample_rate", "subsampling_factor", "blank_id"):
        if key in user:
            out[key] = int(user[key])
    if "sentencepiece_model" in user:
        out["sentencepiece_model"] = base64.b64decode(user["sentencepiece_model"])
    return out
