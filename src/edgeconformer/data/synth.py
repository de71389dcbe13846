"""The offline `mini` corpus: synthesized speech in LibriSpeech's exact layout.

    <root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac   16 kHz mono FLAC
    <root>/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt    `<id> <UPPER CASE TEXT>`

Speakers are synthetic voices: an engine (espeak-ng or flite), a voice, an espeak-ng variant and a fixed prosody
(rate and pitch). Design choices (measured effects are in docs/corpus.md):
- every engine appears in train: voices of an engine absent in train are not recognised at all;
- dev/test speakers are held out: espeak-ng speakers use variants never used in train, flite speakers (only four
  voices exist) use prosodies (rate, pitch) no train speaker has; prosody ranges are the same for all splits, so
  held-out speakers interpolate rather than extrapolate;
- texts come from a restricted vocabulary (the N most frequent words of the KJV clause pool) and the train, dev and
  test sentence sets are disjoint, so no test sentence is ever heard in training.
Everything is a pure function of the config and the seed; the engines are deterministic for a given version,
which the data card records.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from edgeconformer.data.texts import load_pool, pool_path, restrict_vocabulary
from edgeconformer.errors import UserError
from edgeconformer.files import atomic_folder, atomic_path

SAMPLE_RATE = 16000
ESPEAK_ACCENTS = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
]
# Natural-sounding espeak-ng variants only (robots, whispers and croaks are left out). The held-out list is never
# used in train.
ESPEAK_TRAIN_VARIANTS = [
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "f1",
    "f2",
    "f3",
    "f4",
    "Andy",
    "Annie",
    "adam",
    "benjamin",
    "edward",
    "john",
    "linda",
    "max",
    "paul",
    "robert",
    "steph",
    "travis",
    "zac",
    "Alicia",
    "aunty",
    "belinda",
    "caleb",
    "norbert",
    "quincy",
]
ESPEAK_HELDOUT_VARIANTS = ["m6", "m7", "f5", "Alex", "david", "rob", "shelby", "victor", "anika", "ed"]
# flite voices and their approximate mean F0 in Hz; a speaker's pitch is a factor on it.
FLITE_VOICES = {"kal16": 105.0, "slt": 170.0, "awb": 110.0, "rms": 100.0}
ESPEAK_RATE = (140, 185)  # words per minute
ESPEAK_PITCH = (25, 70)  # espeak-ng's 0-99 pitch scale
FLITE_STRETCH = (0.85, 1.15)  # duration_stretch: > 1 is slower
FLITE_PITCH = (0.85, 1.15)  # factor on the voice's mean F0
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 1234
    train_hours: float = 2.5
    dev_utterances: int = 240
    test_utterances: int = 240
    vocab_words: int = 300
    train_espeak_speakers: int = 40
    train_flite_speakers: int = 16
    heldout_espeak_speakers: int = 6  # per held-out split
    heldout_flite_speakers: int = 2  # per held-out split
    dev_sentences: int = 300
    test_sentences: int = 300
    jobs: int = 0  # 0: all CPU cores


@dataclass(frozen=True)
class Speaker:
    id: int
    split: str
    engine: str  # espeak-ng | flite
    voice: str  # espeak-ng accent or flite voice
    variant: str  # espeak-ng variant ("" for flite)
    rate: float  # espeak-ng words/minute; flite duration stretch
    pitch: float  # espeak-ng 0-99; flite F0 factor


@dataclass(frozen=True)
class PlannedUtterance:
    speaker: Speaker
    chapter: int
    index: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.speaker.id}-{self.chapter}-{self.index:04d}"

    def relpath(self) -> str:
        return f"{self.speaker.split}/{self.speaker.id}/{self.chapter}/{self.id}.flac"


def _uniform(rng: random.Random, lo_hi: tuple[float, float], digits: int = 2) -> float:
    return round(rng.uniform(*lo_hi), digits)


def plan_speakers(cfg: SynthConfig, rng: random.Random) -> list[Speaker]:
    """Speaker ids are LibriSpeech-like integers: 1000+ train, 5000+ dev, 7000+ test."""
    speakers: list[Speaker] = []
    first_id = {"train": 1000, "dev": 5000, "test": 7000}
    heldout = ESPEAK_HELDOUT_VARIANTS[:]
    rng.shuffle(heldout)
    heldout_by_split = {"dev": heldout[: len(heldout) // 2], "test": heldout[len(heldout) // 2 :]}
    flite_train_prosody: list[tuple[float, float]] = []
    for split in SPLITS:
        n_espeak = cfg.train_espeak_speakers if split == "train" else cfg.heldout_espeak_speakers
        n_flite = cfg.train_flite_speakers if split == "train" else cfg.heldout_flite_speakers
        variants = (ESPEAK_TRAIN_VARIANTS if split == "train" else heldout_by_split[split])[:]
        rng.shuffle(variants)
        sid = first_id[split]
        for i in range(n_espeak):
            # Cycle accents and variants so every one is used before any repeats.
            accent = ESPEAK_ACCENTS[i % len(ESPEAK_ACCENTS)]
            variant = variants[i % len(variants)]
            speakers.append(
                Speaker(
                    sid,
                    split,
                    "espeak-ng",
                    accent,
                    variant,
                    _uniform(rng, ESPEAK_RATE, 0),
                    _uniform(rng, ESPEAK_PITCH, 0),
                )
            )
            sid += 1
        for i in range(n_flite):
            voice = list(FLITE_VOICES)[i % len(FLITE_VOICES)]
            while True:  # held-out flite speakers get a prosody no train speaker has
                prosody = (_uniform(rng, FLITE_STRETCH), _uniform(rng, FLITE_PITCH))
                if split == "train" or all(
                    abs(prosody[0] - a) + abs(prosody[1] - b) > 0.04 for a, b in flite_train_prosody
                ):
                    break
            if split == "train":
                flite_train_prosody.append(prosody)
            speakers.append(Speaker(sid, split, "flite", voice, "", *prosody))
            sid += 1
    return speakers


def split_sentences(cfg: SynthConfig, rng: random.Random) -> dict[str, list[str]]:
    sentences = restrict_vocabulary(load_pool(), cfg.vocab_words)
    rng.shuffle(sentences)
    n_held = cfg.dev_sentences + cfg.test_sentences
    if len(sentences) < n_held + 100:
        raise UserError(
            f"data.synth.vocab_words={cfg.vocab_words} leaves {len(sentences)} sentences; raise it or "
            f"lower dev_sentences/test_sentences"
        )
    return {
        "dev": sentences[: cfg.dev_sentences],
        "test": sentences[cfg.dev_sentences : n_held],
        "train": sentences[n_held:],
    }


def estimate_seconds(text: str, speaker: Speaker) -> float:
    """Duration model for sizing the plan, fitted on a built corpus (espeak-ng speaks faster than its nominal
    words/minute); the measured hours are in the data card."""
    words = len(text.split())
    if speaker.engine == "espeak-ng":
        return 0.44 + 0.67 * words * 60.0 / speaker.rate
    return 0.42 + 0.24 * words * speaker.rate


def plan_corpus(cfg: SynthConfig) -> list[PlannedUtterance]:
    rng = random.Random(cfg.seed)
    speakers = plan_speakers(cfg, rng)
    texts = split_sentences(cfg, rng)
    utterances: list[PlannedUtterance] = []
    for split in SPLITS:
        split_speakers = [s for s in speakers if s.split == split]
        pool = texts[split][:]
        rng.shuffle(pool)
        budget_s = cfg.train_hours * 3600 if split == "train" else None
        count = {"dev": cfg.dev_utterances, "test": cfg.test_utterances}.get(split)
        total, k = 0.0, 0
        # Round-robin over speakers; sentences are drawn in a shuffled cycle so each is used about equally.
        while (budget_s is not None and total < budget_s) or (count is not None and k < count):
            spk = split_speakers[k % len(split_speakers)]
            text = pool[k % len(pool)]
            utterances.append(PlannedUtterance(spk, spk.id * 10 + 1, k // len(split_speakers), text))
            total += estimate_seconds(text, spk)
            k += 1
    return utterances


def engine_command(u: PlannedUtterance, wav: str) -> list[str]:
    s, text = u.speaker, u.text.lower()  # lower case: engines spell out some all-caps words as acronyms
    if s.engine == "espeak-ng":
        return [
            "espeak-ng",
            "-v",
            f"{s.voice}+{s.variant}",
            "-s",
            str(int(s.rate)),
            "-p",
            str(int(s.pitch)),
            "-w",
            wav,
            text,
        ]
    f0 = FLITE_VOICES[s.voice] * s.pitch
    return [
        "flite",
        "-voice",
        s.voice,
        "--setf",
        f"duration_stretch={s.rate}",
        "--setf",
        f"int_f0_target_mean={f0:.1f}",
        "-t",
        text,
        "-o",
        wav,
    ]


def _resample(audio: np.ndarray, sr: int) -> np.ndarray:
    if sr == SAMPLE_RATE:
        return audio

    return AF.resample(torch.from_numpy(audio), sr, SAMPLE_RATE).numpy()


def synthesize(u: PlannedUtterance, root: Path) -> tuple[str, float]:
    """Renders one utterance to `root/<relpath>`; returns (id, seconds)."""
    out = root / u.relpath()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "u.wav")
        proc = subprocess.run(engine_command(u, wav), capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(wav):
            raise RuntimeError(f"{u.speaker.engine} failed for {u.id}: {proc.stderr.strip()[:500]}")
        audio, sr = sf.read(wav, dtype="float32", always_2d=True)
    audio = _resample(audio.mean(axis=1), sr)
    peak = float(np.abs(audio).max()) or 1.0
    audio = (audio * (0.9 / peak)).astype(np.float32)  # same loudness for all voices, no clipping
    with atomic_path(out, suffix=".flac") as tmp:
        sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return u.id, len(audio) / SAMPLE_RATE


def engine_versions() -> dict[str, str]:
    versions = {}
    for engine in ("espeak-ng", "flite"):
        try:
            out = subprocess.run([engine, "--version"], capture_output=True, text=True).stdout
        except FileNotFoundError:
            versions[engine] = "missing"
            continue
        lines = [text.strip() for text in out.splitlines() if text.strip()]
        # espeak-ng: "eSpeak NG text-to-speech: 1.51  Data at: ..."; flite: "... version: flite-2.2-current ..."
        line = next((t for t in lines if "version" in t.lower() or "text-to-speech" in t), lines[0] if lines else "")
        versions[engine] = line.split("  Data at")[0].replace("version: ", "") or "unknown"
    return versions


def check_engines() -> None:
    missing = [e for e in ("espeak-ng", "flite") if shutil.which(e) is None]
    if missing:
        hint = (
            "brew install espeak-ng flite"
            if sys.platform == "darwin"
            else "sudo apt-get install espeak-ng flite (or run scripts/setup.sh)"
        )
        raise UserError(
            f"speech engine(s) {', '.join(missing)} not found on PATH; the offline corpus needs "
            f"them. Install with: {hint}"
        )


def config_hash(cfg: SynthConfig) -> str:
    payload = {k: v for k, v in asdict(cfg).items() if k != "jobs"}
    payload["pool"] = hashlib.sha256(pool_path().read_bytes()).hexdigest()
    payload["generator"] = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # code changes rebuild
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_mini_corpus(out_root: Path, cfg: SynthConfig, progress: bool = True) -> Path:
    """Synthesizes the corpus into `out_root/LibriSpeech` (atomically: built aside, then renamed into place).

    A tree already built with the same config is kept as is.
    """
    out_root = Path(out_root)
    final = out_root / "LibriSpeech"
    card_path = final / "corpus.json"
    digest = config_hash(cfg)
    if card_path.exists() and json.loads(card_path.read_text()).get("config_hash") == digest:
        return final
    check_engines()
    plan = plan_corpus(cfg)
    out_root.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as staging:
        seconds = _render(plan, staging, cfg.jobs, progress)
        _write_transcripts(plan, staging)
        card = corpus_card(cfg, plan, seconds, digest)
        (staging / "corpus.json").write_text(json.dumps(card, indent=2) + "\n")
        (staging / "CORPUS.md").write_text(card_markdown(card))
    return final


def _render(plan: list[PlannedUtterance], root: Path, jobs: int, progress: bool) -> dict[str, float]:
    workers = jobs or os.cpu_count() or 1
    seconds: dict[str, float] = {}
    # spawn, not fork: a child forked from a process whose torch/OpenMP thread pool already runs can deadlock in
    # its first torch call (the resampler); spawned workers start clean.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.map(synthesize, plan, [root] * len(plan), chunksize=16)
        for uid, secs in tqdm(
            results, total=len(plan), desc="synthesize", unit="utt", disable=not progress, mininterval=2.0
        ):
            seconds[uid] = secs
    return seconds


def _write_transcripts(plan: list[PlannedUtterance], root: Path) -> None:
    chapters: dict[Path, list[str]] = {}
    for u in plan:
        chapter_dir = (root / u.relpath()).parent
        chapters.setdefault(chapter_dir, []).append(f"{u.id} {u.text}")
    for chapter_dir, lines in chapters.items():
        spk, chap = chapter_dir.parent.name, chapter_dir.name
        (chapter_dir / f"{spk}-{chap}.trans.txt").write_text("\n".join(sorted(lines)) + "\n")


def corpus_card(cfg: SynthConfig, plan: list[PlannedUtterance], seconds: dict[str, float], digest: str) -> dict:
    splits = {}
    for split in SPLITS:
        items = [u for u in plan if u.speaker.split == split]
        words = {w for u in items for w in u.text.split()}
        splits[split] = {
            "utterances": len(items),
            "hours": round(sum(seconds[u.id] for u in items) / 3600, 3),
            "speakers": len({u.speaker.id for u in items}),
            "sentences": len({u.text for u in items}),
            "vocabulary": len(words),
            "engines": sorted({u.speaker.engine for u in items}),
        }
    speakers = sorted({u.speaker for u in plan}, key=lambda s: s.id)
    return {
        "name": "edgeconformer-mini",
        "config": asdict(cfg),
        "config_hash": digest,
        "splits": splits,
        "speakers": [asdict(s) for s in speakers],
        "engines": engine_versions(),
        "text_source": "King James Version (public domain), Debian bible-kjv-text 4.38; pool "
        "src/edgeconformer/data/texts/kjv_clauses.txt",
        "sample_rate": SAMPLE_RATE,
    }


def card_markdown(card: dict) -> str:
    lines = [
        "# edgeconformer-mini corpus card",
        "",
        "Synthetic read speech in LibriSpeech's layout, built offline by `edgeconformer.data.synth`.",
        "",
        "| split | utterances | hours | speakers | sentences | vocabulary | engines |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, s in card["splits"].items():
        lines.append(
            f"| {split} | {s['utterances']} | {s['hours']} | {s['speakers']} | {s['sentences']} | "
            f"{s['vocabulary']} | {', '.join(s['engines'])} |"
        )
    lines += [
        "",
        f"- Texts: {card['text_source']}.",
        "- Engines: " + "; ".join(f"{k} {v}" for k, v in card["engines"].items()) + ".",
        "- Dev/test speakers are held out (unseen espeak-ng variants, unseen flite prosodies); dev/test "
        "sentences never occur in train.",
        f"- Config: `{json.dumps(card['config'])}` (hash {card['config_hash']}).",
        "",
    ]
    return "\n".join(lines)
