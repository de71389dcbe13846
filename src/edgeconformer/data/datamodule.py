"""The training data as a LightningDataModule: manifests + tokenizer -> feature datasets, duration-bucketed loaders
and the CMVN statistics of the training utterances.

`ASRDataModule(data, train, tokenizer, fbank, seed)` takes the `data` and `train` config sections as mappings (as
`ASRModule` takes `model` and `train`). `setup("fit")` builds the train and dev sets (log-mels computed once, or
audio decoded per batch with `train.precompute_features=false`) and `cmvn`; `setup("test")` the test set. Both are
idempotent, so a caller may set up before `Trainer.fit` (to time the features and set the module's CMVN) and the
trainer's own call does nothing again.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from edgeconformer.data.dataset import (
    TOKEN_PAD,
    ASRDataset,
    DurationBucketSampler,
    collate,
    filter_by_duration,
    load_audio,
)
from edgeconformer.data.features import LogMelFilterbank, cmvn_stats
from edgeconformer.data.tokenizer import Tokenizer
from edgeconformer.errors import UserError
from edgeconformer.files import read_jsonl


class FeatureDataset(Dataset):
    """Log-mel features computed once up front: 2.5 h of audio is ~300 MB of float32 features, and recomputing
    them every epoch would cost a large share of a CPU training budget. SpecAugment is applied per batch."""

    def __init__(self, rows: list[dict], tokenizer: Tokenizer, fbank: LogMelFilterbank, manifest: str):
        self.rows = rows
        self.durations = [float(r["duration"]) for r in rows]
        self.tokens = [torch.tensor(tokenizer.encode(r["text"]), dtype=torch.long) for r in rows]
        self.feats = []
        with torch.no_grad():
            for r in rows:
                audio = load_audio(r["audio_filepath"], uid=r["id"], manifest=manifest)  # (N,) float32 tensor
                feats, _ = fbank(audio[None], torch.tensor([audio.numel()]))
                self.feats.append(feats[0])  # (T, n_mels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {
            "id": self.rows[i]["id"],
            "feats": self.feats[i],
            "tokens": self.tokens[i],
            "text": self.rows[i]["text"],
        }


def collate_features(batch: list[dict]) -> dict:
    """Pads feats with 0 -> (B, Tmax, F), tokens with -1 -> (B, Umax)."""
    t = [b["feats"].size(0) for b in batch]
    u = [b["tokens"].numel() for b in batch]
    feats = torch.zeros(len(batch), max(t), batch[0]["feats"].size(1))
    tokens = torch.full((len(batch), max(u, default=1)), TOKEN_PAD, dtype=torch.long)
    for i, b in enumerate(batch):
        feats[i, : t[i]] = b["feats"]
        tokens[i, : u[i]] = b["tokens"]
    return {
        "ids": [b["id"] for b in batch],
        "feats": feats,
        "feat_lengths": torch.tensor(t),
        "tokens": tokens,
        "token_lengths": torch.tensor(u),
        "texts": [b["text"] for b in batch],
    }


def load_split(data: Mapping, split: str, t: Mapping | None = None) -> list[dict]:
    """The rows of <data.out_dir>/manifests/<split>.jsonl; with the `train` section `t`, only those within
    t.min_duration..t.max_duration (the others are named)."""
    path = Path(data["out_dir"]) / "manifests" / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"{path}: manifest not found; run `dvc repro prepare` (or python pipelines/prepare.py)")
    rows = read_jsonl(path)
    if t is not None:
        rows, dropped = filter_by_duration(rows, t["min_duration"], t["max_duration"])
        if dropped:
            print(
                f"{path}: {len(dropped)} utterances outside train.min_duration/max_duration not used for "
                f"training: {', '.join(r['id'] for r in dropped[:10])}{' ...' if len(dropped) > 10 else ''}"
            )
    return rows


class ASRDataModule(L.LightningDataModule):
    """Train/dev/test data of one run. Train batches: `DurationBucketSampler` (shuffled per epoch from `seed`,
    `train.max_batch_seconds` of padded audio, sharded across DDP ranks); dev batches: sorted by duration,
    `train.val_max_batch_seconds`. After `setup("fit")`: `train_set`, `dev_set` and `cmvn` (mean, std)."""

    def __init__(self, data: Mapping, train: Mapping, tokenizer: Tokenizer, fbank: LogMelFilterbank, seed: int):
        super().__init__()
        self.data_cfg, self.train_cfg, self.seed = data, train, seed
        self.tokenizer, self.fbank = tokenizer, fbank
        self.train_set: Dataset | None = None
        self.dev_set: FeatureDataset | None = None
        self.test_set: FeatureDataset | None = None
        self.cmvn: tuple[torch.Tensor, torch.Tensor] | None = None
        self.collate_train = collate_features

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            self._setup_fit()
        if stage == "test" and self.test_set is None:
            self.test_set = self.features(self.data_cfg["test_split"])

    def features(self, split: str, rows: list[dict] | None = None) -> FeatureDataset:
        """A split's (or some of its rows') log-mel features."""
        rows = load_split(self.data_cfg, split) if rows is None else rows
        return FeatureDataset(rows, self.tokenizer, self.fbank, split)

    def _setup_fit(self) -> None:
        t = self.train_cfg
        train_rows = [r for s in self.data_cfg["train_splits"] for r in load_split(self.data_cfg, s, t)]
        self.dev_set = self.features(self.data_cfg["dev_split"])
        if t.get("precompute_features", True):
            self.train_set = self.features("train", train_rows)
            stats = self.train_set.feats
        else:
            # Corpora too large for memory (960 h of log-mels is ~110 GB): loader workers decode audio per batch
            # and the module computes features; CMVN statistics come from a seeded sample of the training
            # utterances.
            self.train_set = ASRDataset(train_rows, self.tokenizer, manifest="train")
            self.collate_train = collate
            n = min(len(train_rows), t.get("cmvn_utterances", 2000))
            stats = self.features("train", random.Random(self.seed).sample(train_rows, n)).feats
        self.cmvn = cmvn_stats(stats)

    def train_dataloader(self) -> DataLoader:
        # num_replicas=None: under DDP each rank takes its share of the epoch's batches (resolved in the
        # processes); every rank validates on the whole dev set, so val/wer is the same everywhere.
        t = self.train_cfg
        sampler = DurationBucketSampler(
            self.train_set.durations,
            t["max_batch_seconds"],
            num_replicas=None,
            max_batch_size=t["max_batch_size"],
            shuffle=True,
            seed=self.seed,
        )
        return DataLoader(
            self.train_set, collate_fn=self.collate_train, num_workers=t["num_workers"], batch_sampler=sampler
        )

    def val_dataloader(self) -> DataLoader:
        sampler = DurationBucketSampler(self.dev_set.durations, self.train_cfg["val_max_batch_seconds"], shuffle=False)
        return DataLoader(self.dev_set, collate_fn=collate_features, num_workers=0, batch_sampler=sampler)
