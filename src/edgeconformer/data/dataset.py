"""Manifest rows -> (audio, tokens) items, padded batches and duration-bucketed batch sampling.

Audio is read with soundfile only (torchaudio 2.9 decodes through torchcodec, which is not available here).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import soundfile as sf
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from edgeconformer.data.tokenizer import Tokenizer
from edgeconformer.errors import UserError
from edgeconformer.files import read_jsonl

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
TOKEN_PAD = -1  # never a real id (ids start at 0 = blank), so a loss or metric can mask on it


def load_audio(
    path: str | Path, *, uid: str = "?", manifest: str | Path | None = None, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """Mono float32 samples (N,) of one manifest row; a UserError names the manifest, id and fix otherwise."""
    where = f"{manifest}: " if manifest else ""
    prepare = "rerun data preparation (`python pipelines/prepare.py`) so the manifest and audio agree"
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, OSError)
        raise UserError(
            f"{where}utterance {uid}: cannot read audio {path} ({type(e).__name__}: {e}); the file is "
            f"missing or corrupt: {prepare}"
        ) from e
    if sr != sample_rate:
        raise UserError(
            f"{where}utterance {uid}: {path} has sample rate {sr} Hz, expected {sample_rate} Hz; "
            f"{prepare} with data.validate.resample=true"
        )
    if audio.shape[1] != 1:
        raise UserError(
            f"{where}utterance {uid}: {path} has {audio.shape[1]} channels, expected mono; "
            f"{prepare} with data.validate.downmix=true"
        )
    return torch.from_numpy(audio[:, 0].copy())


def filter_by_duration(
    rows: Sequence[dict], min_duration: float | None = None, max_duration: float | None = None
) -> tuple[list[dict], list[dict]]:
    """Splits rows into (kept, dropped) by their manifest `duration` (seconds, bounds inclusive)."""
    lo = -math.inf if min_duration is None else min_duration
    hi = math.inf if max_duration is None else max_duration
    kept, dropped = [], []
    for row in rows:
        (kept if lo <= float(row["duration"]) <= hi else dropped).append(row)
    return kept, dropped


class ASRDataset(Dataset):
    """Items: {"id", "audio" (N,) float32, "tokens" (U,) int64, "text"}.

    Transcripts are tokenized once here, so workers never need the SentencePiece processor (which keeps the
    dataset cheap to pickle for spawned workers). Rows outside [min_duration, max_duration] are dropped and their
    ids kept in `dropped_ids` for the caller to report.
    """

    def __init__(
        self,
        rows: Sequence[dict],
        tokenizer: Tokenizer,
        *,
        manifest: str | Path | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
        sample_rate: int = SAMPLE_RATE,
    ):
        self.manifest = str(manifest) if manifest is not None else None
        self.sample_rate = sample_rate
        for i, row in enumerate(rows):
            missing = {"id", "audio_filepath", "duration", "text"} - row.keys()
            if missing:
                where = f"{self.manifest}: " if self.manifest else ""
                raise UserError(
                    f"{where}row {i + 1} ({row.get('id', 'no id')}) lacks {sorted(missing)}; regenerate "
                    "the manifest with `python pipelines/prepare.py`"
                )
        kept, dropped = filter_by_duration(rows, min_duration, max_duration)
        self.rows = list(kept)
        self.dropped_ids = [r["id"] for r in dropped]
        self.durations = [float(r["duration"]) for r in self.rows]
        self.tokens = [tokenizer.encode(r["text"]) for r in self.rows]

    @classmethod
    def from_manifest(cls, path: str | Path, tokenizer: Tokenizer, **kwargs) -> ASRDataset:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: manifest not found; run data preparation (`python pipelines/prepare.py`)")
        return cls(read_jsonl(path), tokenizer, manifest=path, **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        audio = load_audio(row["audio_filepath"], uid=row["id"], manifest=self.manifest, sample_rate=self.sample_rate)
        return {
            "id": row["id"],
            "audio": audio,
            "tokens": torch.tensor(self.tokens[i], dtype=torch.long),
            "text": row["text"],
        }


def collate(batch: list[dict]) -> dict:
    """Pads audio with 0.0 -> (B, Nmax) and tokens with -1 -> (B, Umax); lengths are (B,) int64."""
    n = [len(b["audio"]) for b in batch]
    u = [len(b["tokens"]) for b in batch]
    audio = torch.zeros(len(batch), max(n, default=0), dtype=torch.float32)
    tokens = torch.full((len(batch), max(u, default=0)), TOKEN_PAD, dtype=torch.long)
    for i, b in enumerate(batch):
        audio[i, : n[i]] = b["audio"]
        tokens[i, : u[i]] = b["tokens"]
    return {
        "ids": [b["id"] for b in batch],
        "audio": audio,
        "audio_lengths": torch.tensor(n, dtype=torch.long),
        "tokens": tokens,
        "token_lengths": torch.tensor(u, dtype=torch.long),
        "texts": [b["text"] for b in batch],
    }


class DurationBucketSampler(Sampler[list[int]]):
    """Batches of similar-duration utterances whose padded cost (size x longest duration) is <= max_batch_seconds.

    Utterances are sorted by duration and grouped into buckets whose longest item is at most `bucket_ratio` times
    the shortest (wider where needed for a bucket to fill one batch). Each bucket gets a fixed batch size,
    floor(max_batch_seconds / its longest duration) (and at most `max_batch_size`), and is split into ceil(n / size)
    near-equal batches. So the batch count depends only on the durations, never on the epoch: `len()` is exact and
    learning-rate schedules sized from it hold. An utterance longer than the cap forms its own batch.

    shuffle=True: each epoch, rng(seed + epoch) shuffles the order inside every bucket (new batch compositions)
    and the order of the batches. shuffle=False: a fixed order sorted by duration, for validation.
    Distributed: every rank builds the same batch list; the list is padded by repeating its head to a multiple
    of num_replicas, and rank r takes batches r, r + R, ... (disjoint apart from the padding, equal counts).
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        *,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = 1,
        rank: int = 0,
        bucket_ratio: float = 1.1,
    ):
        if max_batch_seconds <= 0:
            raise UserError(f"max_batch_seconds must be > 0, got {max_batch_seconds}")
        if max_batch_size is not None and max_batch_size < 1:
            raise UserError(f"max_batch_size must be >= 1 or null, got {max_batch_size}")
        if bucket_ratio < 1.0:
            raise ValueError(f"bucket_ratio must be >= 1, got {bucket_ratio}")
        if num_replicas is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.durations = [float(d) for d in durations]
        self.max_batch_seconds, self.max_batch_size = float(max_batch_seconds), max_batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        self.buckets = self._make_buckets(bucket_ratio)
        self.num_batches = sum(math.ceil(len(b) / size) for b, size in self.buckets)

    def _make_buckets(self, ratio: float) -> list[tuple[list[int], int]]:
        # -> [(indices sorted by duration, batch size)]; ties break on the index, so the order is total.
        order = sorted(range(len(self.durations)), key=lambda i: (self.durations[i], i))
        buckets: list[tuple[list[int], int]] = []
        current: list[int] = []
        for i in order:
            d = self.durations[i]
            if d > self.max_batch_seconds:  # over the cap on its own: a batch of one
                buckets.append(([i], 1))
                continue
            # Close a bucket at the ratio only once it fills a whole batch; else sparse data (a small dev set)
            # would give one tiny bucket, and so one tiny batch, per duration step.
            if current and d > self.durations[current[0]] * ratio and len(current) >= self._batch_size(current):
                buckets.append((current, self._batch_size(current)))
                current = []
            current.append(i)
        if current:
            buckets.append((current, self._batch_size(current)))
        return buckets

    def _batch_size(self, bucket: list[int]) -> int:
        longest = self.durations[bucket[-1]]
        size = int(self.max_batch_seconds // longest) if longest > 0 else len(bucket)
        if self.max_batch_size is not None:
            size = min(size, self.max_batch_size)
        return max(size, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The full batch list of an epoch, before it is split across replicas."""
        rng = random.Random(self.seed + (self.epoch if epoch is None else epoch))
        out: list[list[int]] = []
        for bucket, size in self.buckets:
            if self.shuffle:
                bucket = bucket[:]
                rng.shuffle(bucket)
            n = math.ceil(len(bucket) / size)
            # n near-equal chunks instead of full batches plus a small remainder
            step, extra = divmod(len(bucket), n)
            start = 0
            for k in range(n):
                end = start + step + (k < extra)
                out.append(bucket[start:end])
                start = end
        if self.shuffle:
            rng.shuffle(out)
        return out

    def replicas(self) -> tuple[int, int]:
        """(num_replicas, rank); num_replicas=None reads them from torch.distributed when iterated, so a sampler
        built before the processes exist (Lightning's ddp_spawn) still shards."""
        if self.num_replicas is not None:
            return self.num_replicas, self.rank

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        replicas, rank = self.replicas()
        batches = self.batches()
        total = len(self) * replicas
        if batches:
            batches = (batches * math.ceil(total / len(batches)))[:total]
        return iter(batches[rank::replicas])

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.replicas()[0])
