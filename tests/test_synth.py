"""The offline corpus: LibriSpeech layout, held-out speakers, disjoint texts, determinism."""

import dataclasses
import hashlib
import json
import re

import soundfile as sf

from edgeconformer.data.synth import (
    ESPEAK_HELDOUT_VARIANTS,
    ESPEAK_TRAIN_VARIANTS,
    SynthConfig,
    build_mini_corpus,
    plan_corpus,
)
from edgeconformer.data.texts import load_pool

TINY = SynthConfig(
    train_hours=0.01,
    dev_utterances=4,
    test_utterances=4,
    train_espeak_speakers=4,
    train_flite_speakers=4,
    heldout_espeak_speakers=1,
    heldout_flite_speakers=1,
    jobs=2,
)


def test_default_plan_holds_out_speakers_and_sentences():
    plan = plan_corpus(SynthConfig())
    by_split = {s: [u for u in plan if u.speaker.split == s] for s in ("train", "dev", "test")}
    train_speakers = {u.speaker for u in by_split["train"]}
    train_texts = {u.text for u in by_split["train"]}
    train_variants = {s.variant for s in train_speakers if s.engine == "espeak-ng"}
    train_flite_prosody = {(s.rate, s.pitch) for s in train_speakers if s.engine == "flite"}
    assert train_variants <= set(ESPEAK_TRAIN_VARIANTS)
    for split in ("dev", "test"):
        speakers = {u.speaker for u in by_split[split]}
        assert not {s.id for s in speakers} & {s.id for s in train_speakers}
        # same engines and voices as train (an engine absent from train is not recognised at all) ...
        assert {(s.engine, s.voice) for s in speakers} <= {(s.engine, s.voice) for s in train_speakers}
        # ... but unseen variants / prosodies
        assert all(
            s.variant in ESPEAK_HELDOUT_VARIANTS and s.variant not in train_variants
            for s in speakers
            if s.engine == "espeak-ng"
        )
        assert all((s.rate, s.pitch) not in train_flite_prosody for s in speakers if s.engine == "flite")
        assert not {u.text for u in by_split[split]} & train_texts
    dev_variants = {u.speaker.variant for u in by_split["dev"]}
    test_variants = {u.speaker.variant for u in by_split["test"]}
    assert not (dev_variants & test_variants) - {""}
    words = {w for u in plan for w in u.text.split()}
    assert len(words) <= 300
    assert len({u.id for u in plan}) == len(plan)


def test_plan_is_deterministic_for_a_seed():
    assert plan_corpus(SynthConfig()) == plan_corpus(SynthConfig())
    assert plan_corpus(SynthConfig()) != plan_corpus(SynthConfig(seed=7))


def test_pool_is_the_recorded_one():
    pool = load_pool()
    assert len(pool) == 17273 and all(re.fullmatch(r"[A-Z' ]+", s) for s in pool)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".flac", ".txt"):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_tiny_corpus_has_librispeech_layout_and_is_deterministic(tmp_path):
    root = build_mini_corpus(tmp_path / "a", TINY, progress=False)
    assert root.name == "LibriSpeech" and sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "dev",
        "test",
        "train",
    ]
    flacs = sorted(root.rglob("*.flac"))
    plan = plan_corpus(TINY)
    assert len(flacs) == len(plan)
    for flac in flacs:
        split, spk, chap = flac.parent.parent.parent.name, flac.parent.parent.name, flac.parent.name
        assert split in {"dev", "test", "train"}
        assert re.fullmatch(rf"{spk}-{chap}-\d{{4}}\.flac", flac.name)
        info = sf.info(flac)
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert 0.5 < info.duration < 15
        trans = flac.parent / f"{spk}-{chap}.trans.txt"
        lines = dict(line.split(" ", 1) for line in trans.read_text().splitlines())
        assert re.fullmatch(r"[A-Z' ]+", lines[flac.stem])
    card = json.loads((root / "corpus.json").read_text())
    assert card["splits"]["train"]["utterances"] == sum(u.speaker.split == "train" for u in plan)
    assert card["splits"]["train"]["hours"] > 0 and set(card["engines"]) == {"espeak-ng", "flite"}
    assert (root / "CORPUS.md").read_text().startswith("# edgeconformer-mini corpus card")
    # bit-identical when built again elsewhere
    again = build_mini_corpus(tmp_path / "b", dataclasses.replace(TINY, jobs=1), progress=False)
    assert _digest(root) == _digest(again)
    # a second build with the same config is a no-op
    mtime = (root / "corpus.json").stat().st_mtime_ns
    build_mini_corpus(tmp_path / "a", TINY, progress=False)
    assert (root / "corpus.json").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]
