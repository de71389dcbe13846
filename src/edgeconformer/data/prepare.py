"""Stage functions `prepare` (corpus -> manifests) and `tokenize` (train transcripts -> SentencePiece)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from edgeconformer.data.librispeech import prepare_librispeech
from edgeconformer.data.manifest import Checks, format_summary, scan_split, split_summary
from edgeconformer.data.synth import SynthConfig, build_mini_corpus
from edgeconformer.data.tokenizer import Tokenizer, train_tokenizer
from edgeconformer.errors import UserError
from edgeconformer.files import read_jsonl, write_json_atomic, write_jsonl_atomic


class PrepareError(UserError):
    """A split ended up empty or below the kept-fraction floor; the message says which and why."""


def corpus_root(data: DictConfig) -> Path:
    """Returns the `LibriSpeech/` folder holding the splits, building or downloading it when needed."""
    if data.corpus == "mini":
        synth = SynthConfig(**OmegaConf.to_container(data.synth, resolve=True), jobs=data.jobs)
        return build_mini_corpus(Path(data.root), synth)
    if data.corpus == "librispeech":
        return prepare_librispeech(list(data.splits), Path(data.root), download=data.download)
    raise UserError(f"data.corpus={data.corpus!r}: choose mini or librispeech")


def prepare(cfg: DictConfig) -> dict:
    data = cfg.data
    started = time.perf_counter()
    root = corpus_root(data)
    built = time.perf_counter()
    checks = Checks(**OmegaConf.to_container(data.validate, resolve=True))
    out = Path(data.out_dir)
    (out / "converted").mkdir(parents=True, exist_ok=True)  # resampled/downmixed copies (a declared output)
    summary: dict[str, dict] = {}
    for split in data.splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise PrepareError(
                f"{split_dir}: split folder not found; data.splits lists {list(data.splits)} but "
                f"{root} holds {sorted(p.name for p in root.iterdir() if p.is_dir())}"
            )
        kept, rejected = scan_split(split_dir, checks, out / "converted" / split, data.jobs)
        write_jsonl_atomic(out / "manifests" / f"{split}.jsonl", kept)
        write_jsonl_atomic(out / "manifests" / f"{split}.rejected.jsonl", rejected)
        summary[split] = split_summary(kept, rejected)
    scanned = time.perf_counter()
    hours = sum(s["hours"] for s in summary.values())
    report = {
        "corpus": data.corpus,
        "root": str(root),
        "splits": summary,
        "build_seconds": round(built - started, 2),
        "validate_seconds": round(scanned - built, 2),
        "validated_hours_per_minute": round(hours / max(scanned - built, 1e-9) * 60, 2),
    }
    write_json_atomic(out / "summary.json", report)
    print(format_summary(summary))
    print(f"validated {hours:.2f} h in {scanned - built:.1f} s ({report['validated_hours_per_minute']} h/min)")
    problems = [
        f"{split}: no usable utterances (see {out / 'manifests' / f'{split}.rejected.jsonl'})"
        for split, s in summary.items()
        if s["kept"] == 0
    ]
    problems += [
        f"{split}: kept {s['kept_fraction']:.1%} < data.validate.min_kept_fraction="
        f"{checks.min_kept_fraction:.0%} (reasons: {s['rejected_reasons']})"
        for split, s in summary.items()
        if s["kept"] and s["kept_fraction"] < checks.min_kept_fraction
    ]
    if problems:
        raise PrepareError("prepare failed:\n  " + "\n  ".join(problems))
    return report


def tokenize(cfg: DictConfig) -> Path:
    data = cfg.data
    out = Path(data.out_dir)
    rows = []
    for split in data.train_splits:
        rows += read_jsonl(out / "manifests" / f"{split}.jsonl")
    tok = data.tokenizer
    model = train_tokenizer(
        [r["text"] for r in rows],
        out / "tokenizer",
        vocab_size=tok.vocab_size,
        model_type=tok.type,
        character_coverage=tok.character_coverage,
    )
    t = Tokenizer(model)
    sample = rows[0]["text"] if rows else ""
    print(f"tokenizer: {tok.type}, {t.vocab_size} pieces -> {model}")
    print(f"example: {sample!r} -> {t.pieces(t.encode(sample))[:20]}")
    return model
