"""Tiny untrained ASR models saved as model folders (best.ckpt + tokenizer.model), built in a second.

The transcription tests check invariants that hold for any weights (windowing, batching, bookkeeping, errors), so
the weights are random (seeded); what such a model transcribes is gibberish, but deterministic gibberish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

TEXTS = [
    "SING UNTO THE LORD",
    "ALL THE EARTH",
    "AND GOD SAID",
    "LET THERE BE LIGHT",
    "IN THE BEGINNING",
    "THE WORD WAS WITH GOD",
    "AND THE EVENING AND THE MORNING WERE THE FIRST DAY",
]
TINY = [
    "model.encoder.d_model=32",
    "model.encoder.n_layers=2",
    "model.encoder.n_heads=2",
    "model.encoder.ff_dim=64",
    "model.encoder.kernel_size=7",
    "model.subsampling_channels=8",
    "model.decoder.n_layers=1",
    "model.decoder.n_heads=2",
    "model.decoder.ff_dim=64",
]
KINDS = {
    # softmax attention over the whole input (the default model's shape)
    "attention": [],
    # no attention: every encoder frame reads a bounded stretch of input (7 + 2 * 2 * 3 frames of context), so
    # windowed decoding with more context than that must equal decoding the whole input
    "conv": ["model.encoder.conv_only_layers=2"],
    # a cascade: causal, chunked first pass (convolution-only + Performer) and a full-attention second pass
    "cascade": [
        "+experiment=practical",
        "model.encoder.n_layers=2",
        "model.encoder.conv_only_layers=1",
        "model.encoder.stages=null",
        "model.encoder.performer_features=8",
        "model.encoder.chunk_size=4",
        "model.cascade.n_layers=1",
        "model.cascade.d_model=32",
        "model.cascade.n_heads=2",
        "model.cascade.ff_dim=64",
    ],
}


def tiny_module(kind: str = "attention", tokenizer_dir: Path | None = None, decode: dict | None = None, seed=0):
    """An ASRModule in eval mode with a tokenizer trained on TEXTS (in tokenizer_dir, a temporary folder)."""
    import tempfile

    from edgeconformer.config import compose
    from edgeconformer.data.tokenizer import Tokenizer, train_tokenizer
    from edgeconformer.models.lightning import ASRModule

    cfg = compose([*TINY, *KINDS[kind]])
    tokenizer_dir = Path(tokenizer_dir or tempfile.mkdtemp())
    tokenizer = Tokenizer(train_tokenizer(TEXTS * 4, tokenizer_dir, vocab_size=28))
    torch.manual_seed(seed)
    train_decode = OmegaConf.to_container(cfg.train.decode, resolve=True)
    module = ASRModule(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.train, resolve=True),
        tokenizer.vocab_size,
        decode={**train_decode, **(decode or {})},
    )
    module.tokenizer = tokenizer
    return module.eval()


def save_model_dir(module, out: Path) -> Path:
    """A model folder as training writes it (best.ckpt, tokenizer.model), loadable with cli.load_trained."""
    import shutil

    import lightning

    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        out / "best.ckpt",
    )
    shutil.copy(module.tokenizer.model_path, out / "tokenizer.model")
    return out


def bursts(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """Speech-like test audio: noisy tones in bursts of 0.3-2 s separated by 0.2-1 s of near silence."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = np.zeros(n, dtype=np.float32)
    t = 0
    while t < n:
        length = int(rng.uniform(0.3, 2.0) * sr)
        seg = np.arange(min(length, n - t)) / sr
        f = rng.uniform(150, 600)
        x[t : t + seg.size] = 0.3 * np.sin(2 * np.pi * f * seg) + 0.05 * rng.standard_normal(seg.size)
        t += length + int(rng.uniform(0.2, 1.0) * sr)
    return x + 1e-3 * rng.standard_normal(n).astype(np.float32)


def write_audio(path: Path, x: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype=subtype)
    return path
