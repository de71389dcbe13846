"""What `edgeconformer transcribe` reads: inputs (files, directories, JSONL manifests) and audio in bounded memory.

Inputs expand to `Item`s in the order given: a file is itself, a directory is every audio file under it (recursively,
by extension, sorted), a `.jsonl` manifest is its rows (the prepare stage's format: `audio_filepath`, optional `id`,
`text`, `duration`). An input that cannot be expanded (a missing path, a directory without audio, a bad manifest
line) becomes an Item carrying its error, so the command reports it in order and carries on with the others.

Audio is read block by block (`read_blocks`): any format soundfile reads, any channel count (averaged to mono) and
any sample rate (resampled in a streaming way that equals resampling the whole file), so an hour-long 44.1 kHz
stereo file never sits in memory whole. Non-finite samples are an error naming the file and the time of the first
one: a model fed NaN returns an empty transcript, which would look like silence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch
import torchaudio

from edgeconformer.scoring import score

# Extensions a directory is searched for (soundfile reads all of these; the comparison ignores case).
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf", ".w64")
MANIFEST_EXTENSIONS = (".jsonl",)
BLOCK_SECONDS = 10.0  # audio read per step: memory use does not depend on the file's length
SILENCE_PEAK = 1e-4  # peak amplitude below which a file is reported as silent (-80 dBFS)


@dataclass
class Item:
    """One thing to transcribe: `path` as given (or as written in the manifest), the manifest's `id` and `text`
    when there are any; `error` is set when the input could not even be listed."""

    path: str
    id: str | None = None
    reference: str | None = None
    error: str | None = None
    source: str | None = None  # manifest:line, for messages


class AudioError(Exception):
    """An audio file that cannot be transcribed; the message names the file and what to do."""


@dataclass
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int  # samples per channel at sample_rate, as the header says

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


@dataclass
class ReadStats:
    """Filled while a file is read: its length at the model's rate, peak amplitude (silence check)."""

    samples: int = 0
    peak: float = 0.0
    info: AudioInfo | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ inputs
def expand_inputs(inputs: list[str]) -> list[Item]:
    items: list[Item] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS and not f.name.startswith(".")
            )
            if not found:
                items.append(
                    Item(
                        given,
                        error=f"{given}: directory holds no audio files "
                        f"({', '.join(AUDIO_EXTENSIONS)}), searched recursively",
                    )
                )
            items += [Item(str(f)) for f in found]
        elif p.suffix.lower() in MANIFEST_EXTENSIONS and p.is_file():
            items += read_manifest(p)
        elif not p.exists():
            items.append(Item(given, error=f"{given}: no such file or directory"))
        else:
            items.append(Item(given))
    return items


def read_manifest(path: Path) -> list[Item]:
    """JSONL rows -> Items. Relative `audio_filepath`s are taken from the working directory (how the prepare stage
    writes them) or, failing that, from the manifest's folder (NeMo's convention)."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                items.append(
                    Item(
                        where,
                        error=f"{where}: not a JSON object ({e}); one object per line, as the "
                        "prepare stage writes (`audio_filepath`, `text`, `id`)",
                    )
                )
                continue
            if not isinstance(row, dict) or not isinstance(row.get("audio_filepath"), str):
                items.append(
                    Item(
                        where,
                        error=f"{where}: no `audio_filepath` string in this row; each line needs "
                        "one (the prepare stage's manifest format)",
                    )
                )
                continue
            audio = Path(row["audio_filepath"])
            if not audio.is_absolute() and not audio.exists() and (path.parent / audio).exists():
                audio = path.parent / audio
            text = row.get("text")
            items.append(
                Item(
                    str(audio),
                    id=str(row["id"]) if "id" in row else None,
                    reference=text if isinstance(text, str) else None,
                    source=where,
                )
            )
    if not items:
        items.append(Item(str(path), error=f"{path}: empty manifest (no rows)"))
    return items


# ------------------------------------------------------------------------------------------------ audio
def probe(path: str) -> AudioInfo:
    """Header facts of an audio file; AudioError for a file that is missing, unreadable or empty."""

    if not Path(path).exists():
        raise AudioError(f"{path}: no such file")
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises several types for corrupt or unsupported files
        raise AudioError(
            f"{path}: cannot read audio ({type(e).__name__}: {e}); expected a readable audio file "
            f"({', '.join(AUDIO_EXTENSIONS)})"
        ) from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: empty audio file (no samples)")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))


class StreamResampler:
    """Resamples a signal given in blocks to exactly what resampling it whole gives (torchaudio's windowed sinc).

    torchaudio's resampler is a strided convolution: output group k (new_step samples) reads input samples
    [k * orig_step - width, k * orig_step + orig_step + width), where orig_step/new_step are the rates divided
    by their gcd. A group is emitted once its whole input window has arrived; the buffer keeps from the first
    sample the next group reads, aligned to orig_step, so every emitted sample equals the whole-file one.
    """

    def __init__(self, orig: int, new: int):
        self.resample = torchaudio.transforms.Resample(orig, new)
        g = math.gcd(orig, new)
        self.orig_step, self.new_step = orig // g, new // g
        self.width = int(self.resample.width)
        self.buf = torch.zeros(0)
        self.buf_start = 0  # input index of buf[0], a multiple of orig_step
        self.next_group = 0  # first output group not yet emitted
        self.total_in = 0

    def push(self, x: torch.Tensor, final: bool = False) -> torch.Tensor:
        # x: (n,) the next input samples -> (m,) the output samples they complete
        self.buf = torch.cat([self.buf, x])
        self.total_in += x.numel()
        if self.buf.numel() == 0:
            return self.buf
        y = self.resample(self.buf)  # (ceil(len * new_step / orig_step),) outputs from buf_start on
        first = self.buf_start // self.orig_step
        if final:
            last = first + math.ceil(y.numel() / self.new_step)  # one past the last group
        else:  # groups whose input window lies inside the buffer
            buf_end = self.buf_start + self.buf.numel()
            last = max(self.next_group, (buf_end - self.width - self.orig_step) // self.orig_step + 1)
        out = y[(self.next_group - first) * self.new_step : (last - first) * self.new_step]
        self.next_group = last
        keep_from = max(0, (last * self.orig_step - self.width) // self.orig_step * self.orig_step)
        self.buf = self.buf[keep_from - self.buf_start :]
        self.buf_start = keep_from
        return out


def read_blocks(
    path: str, sample_rate: int = 16000, stats: ReadStats | None = None, block_seconds: float = BLOCK_SECONDS
) -> Iterator[torch.Tensor]:
    """(n,) float32 mono blocks at `sample_rate` (channels averaged, resampled as needed); raises AudioError
    naming the file for unreadable audio and for NaN/Inf samples."""

    stats = stats if stats is not None else ReadStats()
    info = stats.info = probe(path)
    resampler = StreamResampler(info.sample_rate, sample_rate) if info.sample_rate != sample_rate else None
    read = 0  # input samples read so far (per channel)
    try:
        with sf.SoundFile(path) as f:
            while True:
                block = f.read(max(1, int(block_seconds * info.sample_rate)), dtype="float32", always_2d=True)
                final = block.shape[0] == 0
                x = torch.from_numpy(block.mean(axis=1)) if not final else torch.zeros(0)  # (n,)
                bad = (~torch.isfinite(x)).nonzero()
                if bad.numel():
                    t = (read + int(bad[0])) / info.sample_rate
                    raise AudioError(
                        f"{path}: non-finite samples (NaN or Inf), the first at {t:.3f} s; the file "
                        "is corrupt or was written from a failed computation: re-export it with "
                        "finite samples"
                    )
                read += x.numel()
                if x.numel():
                    stats.peak = max(stats.peak, float(x.abs().max()))
                if resampler is not None:
                    x = resampler.push(x, final=final)
                stats.samples += x.numel()
                if x.numel():
                    yield x
                if final:
                    break
    except AudioError:
        raise
    except Exception as e:  # a file whose header reads but whose data does not
        raise AudioError(
            f"{path}: cannot read audio ({type(e).__name__}: {e}) after {read / info.sample_rate:.2f} "
            "s; the file is truncated or corrupt"
        ) from e
    if read == 0:
        raise AudioError(f"{path}: empty audio file (no samples)")


def read_audio(path: str, sample_rate: int = 16000, stats: ReadStats | None = None) -> torch.Tensor:
    """The whole file as (N,) float32 mono at `sample_rate` (for utterance-sized files)."""
    blocks = list(read_blocks(path, sample_rate, stats))
    return torch.cat(blocks) if blocks else torch.zeros(0)


def audio_notes(stats: ReadStats) -> list[str]:
    """Warnings about a file that was read: silence (the transcript will be empty, and that is expected)."""
    if stats.peak < SILENCE_PEAK:
        return [f"the audio is silent (peak amplitude {stats.peak:.1e}); an empty transcript is expected"]
    return []


# ------------------------------------------------------------------------------------------------ output
def json_row(outcome) -> dict:
    """One `--output-format jsonl` line: the transcript with its timing and word timestamps, or the error."""
    item, t = outcome.item, outcome.transcript
    row: dict = {"path": item.path}
    if item.id is not None:
        row["id"] = item.id
    if t is None:
        row["error"] = outcome.error
        return row
    row.update(
        transcript=t.text,
        duration=round(t.seconds, 3),
        processing_seconds=round(t.compute_seconds, 6),
        rtf=round(t.compute_seconds / t.seconds, 6) if t.seconds else None,
        words=t.words,
        segments=t.segments,
    )
    if outcome.info is not None:
        row.update(sample_rate=outcome.info.sample_rate, channels=outcome.info.channels)
    if outcome.notes:
        row["warnings"] = outcome.notes
    if item.reference is not None:
        row["reference"] = item.reference
    return row


def utterance_score(reference: str, hypothesis: str) -> dict:
    """Errors of one utterance against its reference: errors (S + D + I), ref_words, wer (percent)."""

    r = score([reference], [hypothesis], ["u"])["utterances"][0]
    return {"errors": r["errors"], "ref_words": r["ref_words"], "wer": round(r["wer"], 2)}


def score_outcomes(outcomes: list) -> tuple[dict | None, list[str]]:
    """Corpus WER/CER (scoring.score) of the transcribed items that have a non-empty reference, and the
    report lines: one per utterance, then the corpus figures and what was left out."""

    scored = [o for o in outcomes if o.transcript is not None and (o.item.reference or "").strip()]
    failed = sum(o.transcript is None and bool((o.item.reference or "").strip()) for o in outcomes)
    unreferenced = sum(o.transcript is not None and not (o.item.reference or "").strip() for o in outcomes)
    if not scored:
        return None, ["score: nothing to score (no transcribed item has a reference text)"]
    ids, seen = [], set()
    for k, o in enumerate(scored):
        uid = o.item.id or o.item.path
        ids.append(uid if uid not in seen else f"{uid}#{k}")  # the same file listed twice is scored twice
        seen.add(uid)
    result = score([o.item.reference for o in scored], [o.transcript.text for o in scored], ids)
    lines = ["score: id\twer\terrors\tref_words\treference\thypothesis"]
    lines += [
        f"score: {r['id']}\t{r['wer']:.1f}\t{r['errors']}\t{r['ref_words']}\t{r['reference']}\t{r['hypothesis']}"
        for r in result["utterances"]
    ]
    summary = (
        f"score: WER {result['wer']:.2f}% (S {result['substitutions']}, D {result['deletions']}, "
        f"I {result['insertions']} over {result['ref_words']} words), CER {result['cer']:.2f}%, "
        f"{result['n_utterances']} utterances"
    )
    left_out = [f"{failed} failed" if failed else "", f"{unreferenced} without a reference" if unreferenced else ""]
    left_out = [x for x in left_out if x]
    lines.append(summary + (f"; not scored: {', '.join(left_out)}" if left_out else ""))
    return result, lines
