"""Scan a LibriSpeech-layout tree into NeMo-style JSON-lines manifests.

Every candidate item (an audio file or a transcript line) ends up either kept in `<split>.jsonl` or listed in
`<split>.rejected.jsonl` with a reason: kept + rejected = found, nothing is dropped silently.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from edgeconformer.files import atomic_path

AUDIO_SUFFIXES = (".flac", ".wav")


@dataclass(frozen=True)
class Checks:
    sample_rate: int = 16000
    resample: bool = True  # False: reject other rates
    downmix: bool = True  # False: reject multi-channel audio
    min_duration: float = 0.1  # seconds
    max_duration: float = 35.0
    charset: str = "A-Z' "  # regex character class body of allowed transcript characters
    min_kept_fraction: float = 0.9


@dataclass(frozen=True)
class Candidate:
    id: str
    speaker: str
    chapter: str
    audio: str | None  # absolute path, None when only a transcript line exists
    text: str | None  # None when the audio has no transcript line
    origin: str  # where the item was found, for error messages (file or file:line)


def find_candidates(split_dir: Path) -> tuple[list[Candidate], list[dict]]:
    """Pairs audio files with transcript lines under `<split>/<speaker>/<chapter>/`.

    Returns the candidates and the items rejected while reading transcripts (malformed or duplicate lines).
    """
    audio: dict[str, Path] = {}
    texts: dict[str, tuple[str, str]] = {}  # id -> (text, origin)
    rejected: list[dict] = []
    for dirpath, _, files in os.walk(split_dir):
        for name in sorted(files):
            path = Path(dirpath) / name
            if name.endswith(".trans.txt"):
                _read_transcript(path, texts, rejected)
            elif name.endswith(AUDIO_SUFFIXES) and not name.startswith("."):
                uid = name.rsplit(".", 1)[0]
                if uid in audio:
                    rejected.append(
                        {
                            "id": uid,
                            "path": str(path.resolve()),
                            "code": "duplicate",
                            "reason": f"duplicate audio id (also {audio[uid]})",
                        }
                    )
                else:
                    audio[uid] = path.resolve()
    candidates = []
    for uid in sorted(set(audio) | set(texts)):
        path = audio.get(uid)
        text, origin = texts.get(uid, (None, str(path)))
        where = path.parent if path else Path(origin.rsplit(":", 1)[0]).parent
        candidates.append(Candidate(uid, where.parent.name, where.name, str(path) if path else None, text, origin))
    return candidates, rejected


def _read_transcript(path: Path, texts: dict[str, tuple[str, str]], rejected: list[dict]) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            origin = f"{path}:{lineno}"
            if uid in texts:
                rejected.append(
                    {
                        "id": uid,
                        "path": origin,
                        "code": "duplicate",
                        "reason": f"duplicate transcript line (first at {texts[uid][1]})",
                    }
                )
                continue
            texts[uid] = (text.strip(), origin)


def check_candidate(c: Candidate, checks: Checks, converted_dir: str) -> dict:
    """Returns {"kept": manifest row} or {"rejected": row}; never raises for bad data."""

    # Cheap text checks first, so a bad transcript is reported without decoding its audio.
    rejected = _check_text(c, checks)
    if rejected:
        return rejected
    loaded = _load_conformed(c, checks)
    if isinstance(loaded, dict):  # a rejection
        return loaded
    audio, sr, converted = loaded
    duration = audio.shape[0] / sr
    if duration <= 0:
        return _reject(c, "empty_audio", "audio has no samples")
    if not checks.min_duration <= duration <= checks.max_duration:
        return _reject(
            c,
            "duration",
            f"duration {duration:.3f} s outside [{checks.min_duration}, {checks.max_duration}] s "
            "(data.validate.min_duration/max_duration)",
        )
    path = c.audio
    if converted:
        path = os.path.join(converted_dir, f"{c.id}.flac")
        with atomic_path(path, suffix=".flac") as tmp:
            sf.write(tmp, audio, sr, format="FLAC", subtype="PCM_16")
    return {"kept": _manifest_row(c, path, duration, converted)}


def _reject(c: Candidate, code: str, reason: str) -> dict:
    return {"rejected": {"id": c.id, "path": c.audio or c.origin, "code": code, "reason": reason}}


def _check_text(c: Candidate, checks: Checks) -> dict | None:
    """The checks that need no audio decoding (pairing, naming, transcript) -> a rejection, or None when all pass."""
    if c.audio is None:
        return _reject(
            c, "no_audio", f"transcript line without audio file ({c.origin}); expected {c.id}.flac next to it"
        )
    if c.text is None:
        return _reject(
            c,
            "no_transcript",
            f"audio without transcript line; add `{c.id} <TEXT>` to {c.speaker}-{c.chapter}.trans.txt",
        )
    if not c.id.startswith(f"{c.speaker}-{c.chapter}-"):
        return _reject(
            c, "name_mismatch", f"file name does not match its folders <speaker>/<chapter> = {c.speaker}/{c.chapter}"
        )
    if not c.text:
        return _reject(c, "empty_transcript", f"empty transcript ({c.origin})")
    bad = sorted(set(re.sub(f"[{checks.charset}]", "", c.text)))
    if bad:
        return _reject(
            c, "charset", f"transcript has characters outside [{checks.charset}]: {''.join(bad)!r} ({c.origin})"
        )
    return None


def _load_conformed(c: Candidate, checks: Checks) -> tuple[np.ndarray, int, list[str]] | dict:
    """Decodes c.audio and downmixes/resamples it where the checks allow -> (audio (N, 1) float32, sample rate,
    the conversions done, e.g. ["downmixed", "resampled"]), or a rejection when it does not decode or is not
    allowed to be converted."""
    try:
        audio, sr = sf.read(c.audio, dtype="float32", always_2d=True)  # (N, C)
    except Exception as e:  # soundfile raises several types for corrupt files
        return _reject(c, "decode", f"audio does not decode: {type(e).__name__}: {e}")
    converted = []
    if audio.shape[1] > 1:
        if not checks.downmix:
            return _reject(
                c, "channels", f"{audio.shape[1]} channels; set data.validate.downmix=true to average them to mono"
            )
        audio = audio.mean(axis=1, keepdims=True)
        converted.append("downmixed")
    if sr != checks.sample_rate:
        if not checks.resample:
            return _reject(
                c,
                "sample_rate",
                f"sample rate {sr} Hz != {checks.sample_rate} Hz; set data.validate.resample=true to convert",
            )
        audio = _resample(audio[:, 0], sr, checks.sample_rate)[:, None]
        sr = checks.sample_rate
        converted.append("resampled")
    return audio, sr, converted


def _manifest_row(c: Candidate, path: str, duration: float, converted: list[str]) -> dict:
    """The kept item's manifest row; a converted item also names its original file."""
    row = {
        "id": c.id,
        "audio_filepath": path,
        "duration": round(duration, 4),
        "text": c.text,
        "speaker": c.speaker,
        "chapter": c.chapter,
    }
    if converted:
        row["converted"] = converted
        row["source_filepath"] = c.audio
    return row


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    return AF.resample(torch.from_numpy(np.ascontiguousarray(x)), sr, target).numpy()


def scan_split(split_dir: Path, checks: Checks, converted_dir: Path, jobs: int = 0) -> tuple[list[dict], list[dict]]:
    candidates, rejected = find_candidates(split_dir)
    workers = jobs or os.cpu_count() or 1
    args = (candidates, [checks] * len(candidates), [str(converted_dir)] * len(candidates))
    if workers > 1 and len(candidates) > 64:
        # spawn, not fork: forked children of a process already running torch's thread pool can deadlock in
        # torch calls (resampling); spawned workers start clean.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(check_candidate, *args, chunksize=32))
    else:
        results = list(map(check_candidate, *args))
    kept = [r["kept"] for r in results if "kept" in r]
    rejected += [r["rejected"] for r in results if "rejected" in r]
    return kept, sorted(rejected, key=lambda r: (r["id"], r["reason"]))


def split_summary(kept: list[dict], rejected: list[dict]) -> dict:
    found = len(kept) + len(rejected)
    reasons = Counter(r["code"] for r in rejected)
    return {
        "found": found,
        "kept": len(kept),
        "rejected": len(rejected),
        "kept_fraction": round(len(kept) / found, 4) if found else 0.0,
        "hours": round(sum(r["duration"] for r in kept) / 3600, 4),
        "speakers": len({r["speaker"] for r in kept}),
        "rejected_reasons": dict(reasons.most_common()),
    }


def format_summary(summary: dict[str, dict]) -> str:
    header = f"{'split':<18}{'found':>8}{'kept':>8}{'rejected':>10}{'hours':>9}{'speakers':>10}"
    lines = [header, "-" * len(header)]
    for split, s in summary.items():
        lines.append(
            f"{split:<18}{s['found']:>8}{s['kept']:>8}{s['rejected']:>10}{s['hours']:>9.3f}{s['speakers']:>10}"
        )
        for reason, n in s["rejected_reasons"].items():
            lines.append(f"    rejected {n:>5}: {reason}")
    return "\n".join(lines)
