"""What the post-training stages share: the evaluation utterances as features, greedy decoding (a run's paths are
artifacts.run_paths).

The stages after training (stabilize, export, evaluate) work on one utterance at a time (batch 1, no padding): that
is how an on-device recogniser runs, and the ANE-layout graph has no padding masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from edgeconformer.data.dataset import load_audio
from edgeconformer.data.manifest import read_jsonl
from edgeconformer.decoding import ctc_greedy
from edgeconformer.errors import UserError


@dataclass
class Utterance:
    id: str
    text: str
    seconds: float
    feats: torch.Tensor  # (1, T, F) raw log-mels (CMVN is part of the models these stages build)


@torch.no_grad()
def load_utterances(cfg: DictConfig, fbank, split: str | None = None, limit: int | None = None) -> list[Utterance]:
    """The manifest rows of `split` (default data.test_split) as log-mel features, in manifest order."""
    split = split or cfg.data.test_split
    path = Path(cfg.data.out_dir) / "manifests" / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"{path}: manifest not found; run `dvc repro prepare` first")
    rows = read_jsonl(path)[: limit if limit else None]
    if not rows:
        raise UserError(f"{path}: no utterances to evaluate; check the prepare stage's summary")
    out = []
    for r in rows:
        audio = load_audio(r["audio_filepath"], uid=r["id"], manifest=path)
        feats, _ = fbank(audio[None], torch.tensor([audio.numel()]))
        out.append(Utterance(r["id"], r["text"], audio.numel() / fbank.sample_rate, feats))
    return out


def greedy_text(log_probs: torch.Tensor, tokenizer) -> str:
    """(T', V) CTC log-probs of one utterance -> transcript (CTC greedy)."""
    return tokenizer.decode(ctc_greedy(log_probs.float()))
