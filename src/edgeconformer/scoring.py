"""Scoring, shared by every stage after training and by `transcribe`: word and character error rates (jiwer 4) over
a corpus with one row per utterance, and the evaluation utterances as features.

Corpus WER = (S + D + I) / N over all reference words N (not the mean of per-utterance WERs, which would weigh a
two-word utterance like a fifty-word one). Rates are in percent (0-100, above 100 when insertions pile up).
Transcripts are compared as given after whitespace normalisation (jiwer's default: runs of spaces collapsed,
ends stripped); the tokenizer already returns upper case, as LibriSpeech references are.

jiwer 4 scores an empty reference as 2.0 (200%) instead of failing, which would silently distort the corpus
figure; empty references are refused here, naming the utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jiwer
import torch
from omegaconf import DictConfig

from edgeconformer.data.dataset import load_audio
from edgeconformer.decoding import ctc_greedy
from edgeconformer.errors import UserError
from edgeconformer.files import read_jsonl


def _check(refs, hyps, ids) -> None:
    if not (len(refs) == len(hyps) == len(ids)):
        raise ValueError(f"refs, hyps and ids must have the same length, got {len(refs)}, {len(hyps)}, {len(ids)}")
    if not refs:
        raise ValueError("no utterances to score: pass at least one (reference, hypothesis) pair")
    seen = set()
    for uid, ref, hyp in zip(ids, refs, hyps):
        if not isinstance(ref, str) or not isinstance(hyp, str):
            raise ValueError(
                f"utterance {uid!r}: reference and hypothesis must be strings, got "
                f"{type(ref).__name__} and {type(hyp).__name__}"
            )
        if not ref.strip():
            raise ValueError(
                f"utterance {uid!r}: empty reference transcript; drop it from the evaluation set "
                "(jiwer scores an empty reference as 200% WER)"
            )
        if uid in seen:
            raise ValueError(f"utterance id {uid!r} appears twice; ids must be unique")
        seen.add(uid)


def score(refs: list[str], hyps: list[str], ids: list[str]) -> dict:
    """Corpus WER/CER (percent) and error counts, plus per-utterance rows
    {id, reference, hypothesis, errors, ref_words, wer} in input order."""
    _check(refs, hyps, ids)
    words = jiwer.process_words(refs, hyps)
    rows = []
    for uid, ref, hyp, ref_words, chunks in zip(ids, refs, hyps, words.references, words.alignments):
        errors = 0
        for c in chunks:
            if c.type in ("substitute", "delete"):
                errors += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errors += c.hyp_end_idx - c.hyp_start_idx
        n = len(ref_words)
        rows.append(
            {
                "id": uid,
                "reference": ref,
                "hypothesis": hyp,
                "errors": errors,
                "ref_words": n,
                "wer": 100.0 * errors / n,
            }
        )
    ref_words = sum(r["ref_words"] for r in rows)
    return {
        "wer": 100.0 * words.wer,
        "cer": 100.0 * jiwer.cer(refs, hyps),
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "hits": words.hits,
        "ref_words": ref_words,
        "n_utterances": len(rows),
        "utterances": rows,
    }


# The stages after training (stabilize, export, evaluate) work on one utterance at a time (batch 1, no padding): that
# is how an on-device recogniser runs, and the ANE-layout graph has no padding masks.


@dataclass
class EvalUtterance:
    id: str
    text: str
    seconds: float
    feats: torch.Tensor  # (1, T, F) raw log-mels (CMVN is part of the models these stages build)


@torch.no_grad()
def load_utterances(cfg: DictConfig, fbank, split: str | None = None, limit: int | None = None) -> list[EvalUtterance]:
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
        out.append(EvalUtterance(r["id"], r["text"], audio.numel() / fbank.sample_rate, feats))
    return out


def greedy_text(log_probs: torch.Tensor, tokenizer) -> str:
    """(T', V) CTC log-probs of one utterance -> transcript (CTC greedy)."""
    return tokenizer.decode(ctc_greedy(log_probs.float()))
