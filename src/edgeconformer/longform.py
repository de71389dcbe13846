"""Transcription of audio of any length in bounded memory: overlapping encoder windows, pause-cut decoding.

Decoding a whole recording at once costs memory quadratic in its length (full attention over every encoder frame:
a 10-minute file is 15,000 frames), so long inputs go through two bounded stages (docs/transcribe.md has the
measurements behind the choice and the defaults):

1. Encoder windows. The encoder runs on windows of `left + chunk + right` encoder frames that advance by `chunk`;
   only the `chunk` frames in the middle are kept, so every kept frame saw at least `context_seconds` of audio on
   each side, and the kept frames tile the input exactly. The stitching is exact in time: a window starts at a
   multiple of the subsampling factor's feature frames, and the front end (log-mels without centre padding,
   padding-free subsampling) computes the same frames for a slice as for the whole input, so window frame i is
   global frame start + i. Only the attention and convolution context differs from a whole-input forward (none at
   all for a model whose receptive field fits in the context: tested). Chunk-trained (streaming) encoders get
   windows that start on their chunk grid.
2. Decode segments. The stitched CTC posteriors are cut where the CTC path is blank: at the first pause (a run of
   confident blank frames) after `min_segment_seconds`, or, with no pause, at the longest blank run before
   `max_segment_seconds`. Each segment is decoded on its own with any method (attention decoders see
   utterance-sized inputs, as in training). A cut inside a blank run (or, failing any, where the greedy path
   changes label) does not change the greedy CTC tokens.

`transcribe_items` (what the command runs) sends inputs no longer than `max_segment_seconds` past both stages:
they are decoded whole, exactly as `ASRModule.transcribe` does, in padded batches (`transcribe_batch`); padding
does not change an utterance's encoder output (tested), so batching changes no transcript.

Word timestamps come from a CTC forced alignment (Viterbi) of the decoded tokens to the segment's posteriors:
a word starts at the first frame of its first token and ends after the last frame of its last token. CTC emits
peaky spikes, so starts are good to about one or two encoder frames (40-80 ms) and ends are early.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeconformer.data.tokenizer import BLANK_ID, SOS_EOS_ID
from edgeconformer.decoding import METHODS, decode
from edgeconformer.transcribe_io import (
    AudioError,
    AudioInfo,
    Item,
    ReadStats,
    audio_notes,
    probe,
    read_audio,
    read_blocks,
)

CTC_METHODS = ("ctc_greedy", "ctc_beam")  # need only the CTC head (a cascade's first pass has nothing else)
# A pause is a stretch the CTC head is sure holds no token. Measured on the dws model over a 10-minute recording of
# test utterances 0.4 s apart (docs/transcribe.md): runs of frames with P(blank) > 0.99 last at most 7 frames
# (0.28 s) inside an utterance and at least 10 frames between utterances; runs of merely argmax-blank frames
# overlap (up to 15 frames inside, from 15 between), so cuts at them split sentences.
PAUSE_BLANK_PROB = 0.99
WORD_START = "\u2581"  # SentencePiece's word-boundary mark


@dataclass(frozen=True)
class Settings:
    method: str = "ctc_greedy"
    beam: int = 8
    ctc_weight: float = 0.5
    first_pass: bool = False  # a cascaded model's streaming first pass and its CTC head alone
    chunk_seconds: float = 8.0  # encoder frames kept per window
    context_seconds: float = 1.0  # encoded on each side of the chunk and thrown away
    max_segment_seconds: float = 20.0  # the longest stretch decoded in one piece; longer inputs are windowed
    min_segment_seconds: float = 0.5  # no cut before this (no segment is a mere click)
    pause_seconds: float = 0.4  # this long with P(blank) > PAUSE_BLANK_PROB is a pause to cut at
    timestamps: bool = False  # word timestamps (a CTC alignment per segment)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {METHODS}")
        if self.first_pass and self.method not in CTC_METHODS:
            raise ValueError(f"the first pass has only a CTC head: method must be one of {CTC_METHODS}")
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        if not 0 <= self.ctc_weight <= 1:
            raise ValueError(f"ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if self.chunk_seconds <= 0 or self.context_seconds < 0:
            raise ValueError(
                f"chunk_seconds must be > 0 and context_seconds >= 0, got {self.chunk_seconds} and "
                f"{self.context_seconds}"
            )
        if not 0 < self.min_segment_seconds < self.max_segment_seconds:
            raise ValueError(
                f"need 0 < min_segment_seconds < max_segment_seconds, got {self.min_segment_seconds} "
                f"and {self.max_segment_seconds}"
            )


def decoding_defaults(module) -> dict:
    """The decoding settings the model was trained and tested with (train.decode in its config): method, beam,
    ctc_weight. Checkpoints without them get the config defaults."""
    d = dict(module.hparams.get("decode") or {})
    return {
        "method": d.get("method", "ctc_greedy"),
        "beam": int(d.get("beam", 8)),
        "ctc_weight": float(d.get("ctc_weight", module.hparams["model"].get("ctc_weight", 0.5))),
    }


@dataclass
class Transcript:
    text: str
    seconds: float  # audio length at the model's sample rate
    words: list[dict] | None = None  # [{"word", "start", "end"}] in seconds, with Settings.timestamps
    segments: int = 1  # pieces decoded separately (1: decoded whole)
    compute_seconds: float = 0.0
    ids: list[int] = field(default_factory=list)  # the decoded token ids, in order


# ------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Geometry:
    """Sample / feature-frame / encoder-frame bookkeeping of a model, and the window sizes in encoder frames."""

    hop: int  # samples per feature frame
    win: int  # samples per feature window
    factor: int  # feature frames per encoder frame
    receptive: int  # feature frames one encoder frame reads (7 for factor 4)
    sample_rate: int
    chunk: int  # encoder frames kept per window
    left: int
    right: int
    max_segment: int
    min_segment: int
    pause: int

    @classmethod
    def of(cls, module, s: Settings) -> Geometry:
        sub = module.model.encoder.subsampling
        receptive = 1
        for _ in range(sub.n_convs):  # each 3x3 stride-2 convolution: r -> 2r + 1
            receptive = 2 * receptive + 1
        fb = module.fbank
        frame = sub.factor * fb.hop_length / fb.sample_rate  # seconds per encoder frame

        def frames(seconds):
            return max(0, round(seconds / frame))

        # A chunk-trained encoder numbers its attention chunks from its input's first frame: windows must start
        # on that grid to see the chunks it was trained (and whole-input decoding) with.
        grid = max(1, module.model.encoder.chunk_size)
        chunk = max(grid, math.ceil(frames(s.chunk_seconds) / grid) * grid)
        left = math.ceil(frames(s.context_seconds) / grid) * grid
        return cls(
            hop=fb.hop_length,
            win=fb.win_length,
            factor=sub.factor,
            receptive=receptive,
            sample_rate=fb.sample_rate,
            chunk=chunk,
            left=left,
            right=frames(s.context_seconds),
            max_segment=max(1, frames(s.max_segment_seconds)),
            min_segment=max(1, frames(s.min_segment_seconds)),
            pause=max(1, frames(s.pause_seconds)),
        )

    @property
    def frame_seconds(self) -> float:
        return self.factor * self.hop / self.sample_rate

    def encoder_frames(self, samples: int) -> int:
        feats = 1 + (samples - self.win) // self.hop if samples >= self.win else 0
        return (feats - self.receptive) // self.factor + 1 if feats >= self.receptive else 0

    def samples_for(self, frames: int) -> int:
        # samples needed to compute encoder frames 0 .. frames-1
        return self.hop * (self.factor * (frames - 1) + self.receptive - 1) + self.win

    def first_sample(self, frame: int) -> int:
        # first sample read by encoder frame `frame`
        return self.hop * self.factor * frame


# ------------------------------------------------------------------------------------------------ encoding
def encode(module, audio: torch.Tensor, lengths: torch.Tensor, first_pass: bool = False):
    """(B, N) waveforms -> encoder output (B, T', D), CTC log-probs (B, T', V), lengths (B,); the cascade's
    first pass when first_pass."""
    feats, lengths = module.features(audio, lengths)
    if first_pass:
        out, lengths = module.model.encode_first_pass(feats, lengths)
        return out, module.model.first_pass_log_probs(out), lengths
    out, lengths = module.model.encode(feats, lengths)
    return out, module.model.ctc_log_probs(out), lengths


def windowed_frames(
    module, blocks: Iterable[torch.Tensor], g: Geometry, first_pass: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Audio blocks (n,) -> the encoder output (c, D) and CTC log-probs (c, V) of consecutive runs of encoder
    frames, in order and without gaps. Holds at most one window of audio."""
    buf, buf_start = torch.zeros(0), 0  # audio from sample buf_start on
    j = 0  # next encoder frame to produce
    blocks = iter(blocks)
    eof = False
    while True:
        a, b = max(0, j - g.left), j + g.chunk + g.right  # window: encoder frames [a, b), keeps [j, j + chunk)
        while not eof and buf_start + buf.numel() < g.samples_for(b):
            block = next(blocks, None)
            if block is None:
                eof = True
            else:
                buf = torch.cat([buf, block])
        if eof:
            b = min(b, g.encoder_frames(buf_start + buf.numel()))
            if j >= b:
                return
        x = buf[g.first_sample(a) - buf_start : g.samples_for(b) - buf_start]
        out, lp, _ = encode(module, x[None], torch.tensor([x.numel()]), first_pass)  # (1, b - a, D), (1, b - a, V)
        assert out.size(1) == b - a, (out.shape, a, b)
        keep = slice(j - a, min(j + g.chunk, b) - a)
        yield out[0, keep], lp[0, keep]
        j = min(j + g.chunk, b)
        drop = g.first_sample(max(0, j - g.left)) - buf_start
        buf, buf_start = buf[drop:], buf_start + drop


# ------------------------------------------------------------------------------------------------ segments
def blank_runs(is_blank: np.ndarray) -> list[tuple[int, int]]:
    """(T,) bool -> [(start, end)] of the runs of True, end exclusive."""
    padded = np.concatenate([[False], is_blank, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def find_cut(lp: torch.Tensor, g: Geometry, final: bool) -> tuple[int, bool] | None:
    """Where to end the next decode segment in pending log-probs (P, V), and whether the cut is at a pause (a
    word boundary); None to wait for more frames."""
    P = lp.size(0)
    path = lp.argmax(-1).numpy()  # (P,) the greedy path
    quiet = (lp[:, BLANK_ID] > math.log(PAUSE_BLANK_PROB)).numpy()
    for s, e in blank_runs(quiet):  # the first pause that leaves min_segment .. max_segment frames before it
        if e - s >= g.pause:
            cut = (s + e) // 2 if e < P else s + g.pause // 2  # a run at the end may still grow
            if g.min_segment <= cut <= g.max_segment:
                return cut, True
    if P < g.max_segment:
        return (P, False) if final else None
    # No pause: the longest blank run before max_segment; without one, where the path changes label (a greedy
    # transcript does not change when cut there) and blank is likeliest.
    runs = blank_runs(path == BLANK_ID)
    inside = [(e - s, (s + e) // 2) for s, e in runs if g.min_segment <= (s + e) // 2 <= g.max_segment]
    if inside:
        return max(inside)[1], False
    lo = max(1, g.max_segment // 2)
    blank = lp[lo : g.max_segment, BLANK_ID].clone()
    blank[torch.from_numpy(path[lo : g.max_segment] == path[lo - 1 : g.max_segment - 1])] = -math.inf
    return lo + int(blank.argmax()), False


class Segmenter:
    """Collects stitched frames and releases decode segments (start frame, encoder out (S, D) or None,
    log-probs (S, V), whether a pause precedes it); holds at most max_segment + chunk frames."""

    def __init__(self, g: Geometry, keep_encoder_out: bool):
        self.g, self.keep = g, keep_encoder_out
        self.out: torch.Tensor | None = None
        self.lp: torch.Tensor | None = None
        self.start = 0
        self.after_pause = False

    def push(self, out: torch.Tensor, lp: torch.Tensor) -> Iterator[tuple]:
        if self.keep:
            self.out = out if self.out is None else torch.cat([self.out, out])
        self.lp = lp if self.lp is None else torch.cat([self.lp, lp])
        yield from self._cuts(final=False)

    def finish(self) -> Iterator[tuple]:
        yield from self._cuts(final=True)

    def _cuts(self, final: bool) -> Iterator[tuple]:
        while self.lp is not None and self.lp.size(0):
            found = find_cut(self.lp, self.g, final)
            if found is None:
                return
            cut, pause = found
            yield self.start, self.out[:cut] if self.keep else None, self.lp[:cut], self.after_pause
            self.start, self.after_pause = self.start + cut, pause
            self.lp = self.lp[cut:]
            if self.keep:
                self.out = self.out[cut:]


# ------------------------------------------------------------------------------------------------ decoding
def decode_ids(module, out: torch.Tensor | None, lp: torch.Tensor, s: Settings) -> list[int]:
    """One utterance or segment: encoder output (T, D) (unused by CTC methods) and CTC log-probs (T, V) -> token
    ids, exactly as ASRModule.decode_encoder_output / decode_first_pass decode it."""
    T = lp.size(0)
    if s.first_pass:
        return decode(s.method, lp, beam=s.beam, blank=BLANK_ID)
    kwargs = {}
    if s.method in ("attention", "joint"):
        kwargs["step_fn"] = module.model.attention_step_fn(out[None], T)
    if s.method == "rescoring":
        kwargs["score_fn"] = module.model.sequence_score_fn(out[None], T)
    return decode(
        s.method, lp, sos_eos=SOS_EOS_ID, beam=s.beam, ctc_weight=s.ctc_weight, blank=BLANK_ID, max_len=T, **kwargs
    )


def ctc_align(lp: np.ndarray, ids: list[int], blank: int = BLANK_ID) -> list[tuple[int, int]] | None:
    """Viterbi CTC alignment: log-probs (T, V), token ids (U,) -> per token its (first, last) frame, or None when
    no path fits (an attention hypothesis longer than the CTC frames allow)."""
    T, U = lp.shape[0], len(ids)
    if U == 0:
        return []
    ext = np.full(2 * U + 1, blank)  # blank y1 blank y2 ... yU blank
    ext[1::2] = ids
    S = ext.size
    skip = np.zeros(S, dtype=bool)  # a state may be entered from two back: labels that differ from the one before
    skip[3::2] = ext[3::2] != ext[1:-2:2]
    emit = lp[:, ext]  # (T, S)
    alpha = np.full(S, -np.inf)
    alpha[:2] = emit[0, :2]
    back = np.zeros((T, S), dtype=np.int8)  # 0: stay, 1: from s-1, 2: from s-2
    for t in range(1, T):
        cands = np.stack(
            [
                alpha,
                np.concatenate([[-np.inf], alpha[:-1]]),
                np.where(skip, np.concatenate([[-np.inf, -np.inf], alpha[:-2]]), -np.inf),
            ]
        )  # (3, S)
        back[t] = cands.argmax(0)
        alpha = cands.max(0) + emit[t]
    end = S - 1 if S == 1 or alpha[S - 1] >= alpha[S - 2] else S - 2
    if not np.isfinite(alpha[end]):
        return None
    spans: list[list[int]] = [[-1, -1] for _ in range(U)]
    state = end
    for t in range(T - 1, -1, -1):
        if state % 2:  # a label state: token (state - 1) / 2
            u = (state - 1) // 2
            spans[u][0] = t
            if spans[u][1] < 0:
                spans[u][1] = t
        state -= int(back[t, state])
    return [(a, b) for a, b in spans]


def words_of(
    module, ids: list[int], spans: list[tuple[int, int]] | None, first_frame: int, n_frames: int, g: Geometry
) -> list[dict]:
    """Token ids with their frame spans -> words with start/end seconds. Without spans (no alignment), the
    words share the segment's time evenly (flagged `aligned: false`)."""
    pieces = module.tokenizer.pieces(ids)
    groups: list[list[int]] = []
    for k, piece in enumerate(pieces):
        if piece.startswith(WORD_START) or not groups:
            groups.append([])
        groups[-1].append(k)
    words = []
    for n, group in enumerate(groups):
        text = module.tokenizer.decode([ids[k] for k in group]).strip()
        if not text:
            continue
        if spans is not None:
            start, end = spans[group[0]][0], spans[group[-1]][1] + 1
        else:
            start, end = n * n_frames // len(groups), (n + 1) * n_frames // len(groups)
        word = {
            "word": text,
            "start": round((first_frame + start) * g.frame_seconds, 3),
            "end": round((first_frame + end) * g.frame_seconds, 3),
        }
        if spans is None:
            word["aligned"] = False
        words.append(word)
    return words


class _Collector:
    """Token ids and words of consecutive segments -> one transcript. A pause is a word boundary: segments after
    one start a new word whatever their first token (a model often drops the word mark of a sentence's first
    piece, which a per-utterance transcript never shows). Across a cut without a pause, a word split in two (its
    second half starts without the word mark) is joined back."""

    def __init__(self, module, s: Settings, g: Geometry):
        self.module, self.s, self.g = module, s, g
        self.ids: list[int] = []
        self.run: list[int] = []  # ids since the last pause
        self.texts: list[str] = []
        self.words: list[dict] = []
        self.segments = 0

    def add(self, start: int, out: torch.Tensor | None, lp: torch.Tensor, after_pause: bool = False) -> None:
        ids = decode_ids(self.module, out, lp, self.s)
        self.segments += 1
        if after_pause:
            self._close_run()
        if self.s.timestamps and ids:
            spans = ctc_align(lp.double().numpy(), ids)
            words = words_of(self.module, ids, spans, start, lp.size(0), self.g)
            glued = self.run and not self.module.tokenizer.pieces(ids[:1])[0].startswith(WORD_START)
            if words and self.words and glued:
                first = words.pop(0)
                self.words[-1]["word"] += first["word"]
                self.words[-1]["end"] = first["end"]
            self.words += words
        self.run += ids
        self.ids += ids

    def _close_run(self) -> None:
        text = self.module.tokenizer.decode(self.run)
        if text:
            self.texts.append(text)
        self.run = []

    def result(self, seconds: float, t0: float) -> Transcript:
        self._close_run()
        return Transcript(
            " ".join(self.texts),
            seconds,
            self.words if self.s.timestamps else None,
            self.segments,
            time.perf_counter() - t0,
            self.ids,
        )


@torch.inference_mode()
def transcribe_long(module, blocks: Iterable[torch.Tensor], s: Settings) -> Transcript:
    """Audio of any length, given as (n,) blocks at the model's sample rate -> its transcript, in memory bounded
    by the window and segment sizes (not by the length)."""
    t0 = time.perf_counter()
    g = Geometry.of(module, s)
    collector = _Collector(module, s, g)
    segmenter = Segmenter(g, keep_encoder_out=not s.first_pass and s.method not in CTC_METHODS)
    samples = 0

    def counted(blocks):
        nonlocal samples
        for b in blocks:
            samples += b.numel()
            yield b

    for out, lp in windowed_frames(module, counted(blocks), g, s.first_pass):
        for seg in segmenter.push(out, lp):
            collector.add(*seg)
    for seg in segmenter.finish():
        collector.add(*seg)
    return collector.result(samples / g.sample_rate, t0)


@torch.inference_mode()
def transcribe_batch(module, audios: list[torch.Tensor], s: Settings) -> list[Transcript]:
    """Utterance-sized inputs (N_i,) decoded whole, as one padded batch; each result equals decoding it alone."""
    t0 = time.perf_counter()
    g = Geometry.of(module, s)
    lengths = torch.tensor([a.numel() for a in audios])
    batch = torch.zeros(len(audios), int(lengths.max()))  # (B, N) zero-padded
    for i, a in enumerate(audios):
        batch[i, : a.numel()] = a
    out, lp, frames = encode(module, batch, lengths, s.first_pass)
    results = []
    for i in range(len(audios)):
        T = int(frames[i])
        c = _Collector(module, s, g)
        c.add(0, out[i, :T], lp[i, :T])
        results.append(c.result(int(lengths[i]) / g.sample_rate, t0))
    # Time of the whole batch, shared out in proportion to audio length.
    total = time.perf_counter() - t0
    for r in results:
        r.compute_seconds = total * r.seconds / max(1e-9, float(lengths.sum()) / g.sample_rate)
    return results


# ------------------------------------------------------------------------------------------------ many inputs
@dataclass
class Outcome:
    """What became of one input: a transcript, or an error naming the file; notes are warnings (silence)."""

    item: Item
    transcript: Transcript | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    info: AudioInfo | None = None


def transcribe_items(module, items: list, s: Settings, batch_size: int = 16) -> Iterator[Outcome]:
    """Items (transcribe_io.expand_inputs) -> Outcomes in the same order. Inputs up to max_segment_seconds are
    read whole and decoded in padded batches of up to batch_size, sorted by length within a look-ahead of
    8 batches so that little padding is computed; longer ones are streamed through transcribe_long."""

    s.check()
    g = Geometry.of(module, s)
    queue: list[tuple] = []  # (item, info or None, error or None), in input order
    for item in items:
        if item.error:
            queue.append((item, None, item.error))
            continue
        try:
            info = probe(item.path)
        except AudioError as e:
            queue.append((item, None, str(e)))
            continue
        if info.seconds <= s.max_segment_seconds:
            queue.append((item, info, None))
            if len(queue) >= 8 * batch_size:
                yield from _flush(module, queue, g, s, batch_size)
            continue
        yield from _flush(module, queue, g, s, batch_size)
        yield _transcribe_streamed(module, item, info, g, s)
    yield from _flush(module, queue, g, s, batch_size)


def _too_short(item, stats: ReadStats, g: Geometry) -> str:
    return (
        f"{item.path}: audio too short to transcribe ({stats.samples / g.sample_rate:.3f} s; the model "
        f"needs at least {g.samples_for(1) / g.sample_rate:.3f} s)"
    )


def _failed(item, error: str, info=None) -> Outcome:
    """A failed item's Outcome; a manifest row's error also says where the row is."""
    return Outcome(item, error=f"{error} (listed at {item.source})" if item.source else error, info=info)


def _transcribe_streamed(module, item, info, g: Geometry, s: Settings) -> Outcome:
    """An input longer than max_segment_seconds, read block by block while transcribe_long decodes it."""
    stats = ReadStats()
    try:
        t = transcribe_long(module, read_blocks(item.path, g.sample_rate, stats), s)
    except AudioError as e:
        return _failed(item, str(e), info)
    if g.encoder_frames(stats.samples) == 0:
        return _failed(item, _too_short(item, stats, g), info)
    return Outcome(item, t, notes=audio_notes(stats), info=info)


def _flush(module, queue: list[tuple], g: Geometry, s: Settings, batch_size: int) -> Iterator[Outcome]:
    """The queued inputs' Outcomes in queue order, each read whole and decoded in padded batches sorted by length;
    empties the queue."""
    done, audio, stats, read_seconds = _read_queued(module, queue, g, s)
    order = sorted(audio, key=lambda k: audio[k].numel())
    for i in range(0, len(order), batch_size):
        ks = order[i : i + batch_size]
        for k, t in zip(ks, transcribe_batch(module, [audio[k] for k in ks], s)):
            t.compute_seconds += read_seconds[k]  # as for long files, whose blocks are read while decoding
            done[k] = Outcome(queue[k][0], t, notes=audio_notes(stats[k]), info=queue[k][1])
    for k in range(len(queue)):
        yield done[k]
    queue.clear()


def _read_queued(module, queue: list[tuple], g: Geometry, s: Settings) -> tuple[dict, dict, dict, dict]:
    """Reads the queued inputs, keyed by queue position: -> (the Outcomes already known: errors, audio too short,
    and audio longer than its header said, streamed through transcribe_long; the others' audio, their ReadStats,
    and the seconds their reading took)."""
    done: dict[int, Outcome] = {}
    audio: dict[int, torch.Tensor] = {}
    stats: dict[int, ReadStats] = {}
    read_seconds: dict[int, float] = {}
    for k, (item, info, error) in enumerate(queue):
        if error:
            done[k] = _failed(item, error, info)
            continue
        stats[k] = ReadStats()
        t0 = time.perf_counter()
        try:
            audio[k] = read_audio(item.path, g.sample_rate, stats[k])
        except AudioError as e:
            done[k] = _failed(item, str(e), info)
            continue
        read_seconds[k] = time.perf_counter() - t0
        if g.encoder_frames(audio[k].numel()) == 0:
            del audio[k]
            done[k] = _failed(item, _too_short(item, stats[k], g), info)
        elif g.encoder_frames(audio[k].numel()) > g.max_segment:  # the header understated the length
            t = transcribe_long(module, [audio.pop(k)], s)
            done[k] = Outcome(item, t, notes=audio_notes(stats[k]), info=info)
    return done, audio, stats, read_seconds
