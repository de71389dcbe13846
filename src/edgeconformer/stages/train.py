"""Stage function `train(cfg) -> metrics`: manifests + tokenizer -> models/<variant>/s<seed>/ (artifacts.run_paths).

Writes into `out_dir`: `last.ckpt` (every epoch; resumable), `best.ckpt` (lowest `val/wer`), `tokenizer.model`,
`config.yaml` (the composed config), `csv/metrics.csv` (learning curves) and `train_metrics.json` (summary).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from edgeconformer.artifacts import run_paths
from edgeconformer.config import variant_name
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
from edgeconformer.files import atomic_path, load_weights, read_jsonl, save_torch_atomic, write_json_atomic
from edgeconformer.models.lightning import FIRST_PASS_METHODS, ASRModule, word_error_rate


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
        return {"id": self.rows[i]["id"], "feats": self.feats[i], "tokens": self.tokens[i],
                "text": self.rows[i]["text"]}


def collate_features(batch: list[dict]) -> dict:
    """Pads feats with 0 -> (B, Tmax, F), tokens with -1 -> (B, Umax)."""
    t = [b["feats"].size(0) for b in batch]
    u = [b["tokens"].numel() for b in batch]
    feats = torch.zeros(len(batch), max(t), batch[0]["feats"].size(1))
    tokens = torch.full((len(batch), max(u, default=1)), TOKEN_PAD, dtype=torch.long)
    for i, b in enumerate(batch):
        feats[i, : t[i]] = b["feats"]
        tokens[i, : u[i]] = b["tokens"]
    return {"ids": [b["id"] for b in batch], "feats": feats, "feat_lengths": torch.tensor(t),
            "tokens": tokens, "token_lengths": torch.tensor(u), "texts": [b["text"] for b in batch]}


def load_split(data: DictConfig, split: str, t: DictConfig | None = None) -> list[dict]:
    path = Path(data.out_dir) / "manifests" / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"{path}: manifest not found; run `dvc repro prepare` (or python pipelines/prepare.py)")
    rows = read_jsonl(path)
    if t is not None:
        rows, dropped = filter_by_duration(rows, t.min_duration, t.max_duration)
        if dropped:
            print(f"{path}: {len(dropped)} utterances outside train.min_duration/max_duration not used for "
                  f"training: {', '.join(r['id'] for r in dropped[:10])}{' ...' if len(dropped) > 10 else ''}")
    return rows


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    if sweep_group():  # each multirun job writes into its own job folder

        return Path(HydraConfig.get().runtime.output_dir)
    return run_paths(cfg).model_dir


def make_loggers(cfg: DictConfig, out: Path) -> list:
    loggers = [CSVLogger(save_dir=str(out), name="", version="csv")]
    lg = cfg.logger
    if lg.get("wandb"):
        os.environ.setdefault("WANDB_MODE", lg.get("wandb_mode", "offline"))
        os.environ.setdefault("WANDB_SILENT", "true")

        # One W&B run per seed, grouped per variant (error bars over seeds in the project's panels).
        group = f"{cfg.model.name}-{variant_name(cfg)}"
        name = f"{group}-s{cfg.seed}"
        loggers.append(WandbLogger(project=lg.project, entity=lg.entity, group=lg.group or sweep_group() or group,
                                   name=name, job_type="train",
                                   tags=list(lg.tags), save_dir=".", config=OmegaConf.to_container(cfg,
                                                                                                   resolve=True)))
    return loggers


def sweep_group() -> str | None:
    """Under Hydra multirun, all jobs of one sweep share a W&B group named after the sweep folder."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra job
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return "sweep-" + "-".join(Path(hc.sweep.dir).parts[-2:])


def train(cfg: DictConfig) -> dict:
    t, tr = cfg.train, cfg.trainer
    torch.set_num_threads(tr.num_threads)
    seed = int(cfg.seed)
    L.seed_everything(seed, workers=True)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = Path(cfg.data.out_dir) / "tokenizer" / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    saved_config = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").exists() else None
    shutil.copyfile(tok_path, out / "tokenizer.model")
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    started = time.perf_counter()
    module = ASRModule(OmegaConf.to_container(cfg.model, resolve=True),
                       OmegaConf.to_container(t, resolve=True), tokenizer.vocab_size, seed=seed,
                       decode=OmegaConf.to_container(t.decode, resolve=True))
    module.tokenizer = tokenizer
    fbank = module.fbank
    train_rows = [r for s in cfg.data.train_splits for r in load_split(cfg.data, s, t)]
    dev_rows = load_split(cfg.data, cfg.data.dev_split)
    dev_set = FeatureDataset(dev_rows, tokenizer, fbank, cfg.data.dev_split)
    if t.get("precompute_features", True):
        train_set, collate_train = FeatureDataset(train_rows, tokenizer, fbank, "train"), collate_features
        stats_rows = None
    else:
        # Corpora too large for memory (960 h of log-mels is ~110 GB): loader workers decode audio per batch and
        # the module computes features; CMVN statistics come from a seeded sample of the training utterances.
        train_set, collate_train = ASRDataset(train_rows, tokenizer, manifest="train"), collate
        stats_rows = random.Random(seed).sample(train_rows, min(len(train_rows), t.get("cmvn_utterances", 2000)))
    stats = train_set.feats if stats_rows is None else FeatureDataset(stats_rows, tokenizer, fbank, "train").feats
    mean, std = cmvn_stats(stats)
    module.cmvn.set_stats(mean, std)
    features_s = time.perf_counter() - started

    # num_replicas=None: under DDP each rank takes its share of the epoch's batches (resolved in the processes);
    # every rank validates on the whole dev set, so val/wer is the same everywhere.
    train_loader = DataLoader(train_set, collate_fn=collate_train, num_workers=t.num_workers,
                              batch_sampler=DurationBucketSampler(train_set.durations, t.max_batch_seconds,
                                                                  num_replicas=None,
                                                                  max_batch_size=t.max_batch_size, shuffle=True,
                                                                  seed=seed))
    dev_loader = DataLoader(dev_set, collate_fn=collate_features, num_workers=0,
                            batch_sampler=DurationBucketSampler(dev_set.durations, t.val_max_batch_seconds,
                                                                shuffle=False))
    best = ModelCheckpoint(dirpath=out, filename="best", monitor="val/wer", mode="min", save_top_k=1,
                           enable_version_counter=False, auto_insert_metric_name=False)
    # Overwritten after every epoch (monitor=None keeps the latest), the checkpoint to resume from.
    last = ModelCheckpoint(dirpath=out, filename="last", save_top_k=1, enable_version_counter=False)
    callbacks = [best, last]
    if t.get("max_time"):
        callbacks.append(TimeGuard(t.max_time))
    if t.average_last > 1:
        callbacks.append(KeepEpochWeights(out / "epochs", t.average_last))
    trainer = L.Trainer(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
        precision=tr.precision, deterministic=tr.deterministic, max_epochs=t.max_epochs, max_steps=t.max_steps,
        gradient_clip_val=t.grad_clip, check_val_every_n_epoch=t.val_every_n_epochs,
        log_every_n_steps=tr.log_every_n_steps, logger=make_loggers(cfg, out), callbacks=callbacks,
        enable_progress_bar=bool(tr.get("progress_bar", True)), use_distributed_sampler=False,
        default_root_dir=str(out), num_sanity_val_steps=0,
    )
    ckpt_path = resumable_checkpoint(out, cfg, saved_config)
    if ckpt_path is None:
        shutil.rmtree(out / "epochs", ignore_errors=True)  # weights of an earlier run must not be averaged in
    curves = out / "csv" / "metrics.csv"
    earlier = read_csv_rows(curves) if ckpt_path and curves.exists() else []  # the CSV logger starts afresh
    fit_started = time.perf_counter()
    trainer.fit(module, train_loader, dev_loader, ckpt_path=ckpt_path)
    fit_s = time.perf_counter() - fit_started
    if earlier and trainer.is_global_zero:
        prepend_csv_rows(curves, earlier)

    metrics = {"variant": variant_name(cfg), "seed": seed, "model": cfg.model.name, "epochs": trainer.current_epoch,
               "steps": trainer.global_step, "skipped_batches": int(module.skipped_batches),
               "features_seconds": round(features_s, 1), "fit_seconds": round(fit_s, 1),
               "train_hours": round(sum(train_set.durations) / 3600, 3),
               "best_val_wer": float(best.best_model_score) if best.best_model_score is not None else None,
               "resumed_from": ckpt_path}
    metrics["audio_seconds_per_second"] = round(module.audio_seconds_seen / max(fit_s, 1e-9), 1)
    if t.average_last > 1 and best.best_model_path and trainer.is_global_zero:
        metrics.update(average_into_best(out, Path(best.best_model_path), module, dev_set, metrics["best_val_wer"]))
    if best.best_model_path and t.get("test_after_fit", True):
        best_module = ASRModule.load_from_checkpoint(best.best_model_path, map_location="cpu")
        best_module.tokenizer = tokenizer
        best_module.eval()
        test_rows = load_split(cfg.data, cfg.data.test_split)
        test_set = FeatureDataset(test_rows, tokenizer, fbank, cfg.data.test_split)
        d = t.decode
        for method in t.test_methods:
            refs, hyps = decode_dataset(best_module, test_set, method, d.beam, d.ctc_weight)
            metrics[f"test_wer_{method}"], metrics[f"test_cer_{method}"] = word_error_rate(refs, hyps)
        if hasattr(best_module.model, "first_pass_log_probs"):  # cascade: the streaming first pass too

            for method in [m for m in t.test_methods if m in FIRST_PASS_METHODS] or ["ctc_greedy"]:
                refs, hyps = decode_dataset(best_module, test_set, method, d.beam, first_pass=True)
                metrics[f"test_wer_first_pass_{method}"], metrics[f"test_cer_first_pass_{method}"] = \
                    word_error_rate(refs, hyps)
    if trainer.is_global_zero:
        write_json_atomic(out / "train_metrics.json", metrics)
    _finish_wandb()
    print(json.dumps(metrics))
    return metrics


class TimeGuard(Callback):
    """`train.max_time` as a guard, not a budget: a run that is still training after this much wall-clock time
    stops with an error (its checkpoints stay, resumable), so a result never silently depends on how fast the
    machine was. Lightning's own max_time would end the fit quietly after fewer epochs."""

    def __init__(self, max_time: str):
        parts = [int(x) for x in str(max_time).split(":") if x.strip().isdigit()]
        if len(parts) != 4 or len(str(max_time).split(":")) != 4:
            raise UserError(f"train.max_time={max_time!r}: expected DD:HH:MM:SS (or null for no guard)")
        days, hours, minutes, seconds = parts
        self.limit = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        self.max_time, self.started = max_time, None

    def on_train_start(self, trainer, pl_module):
        self.started = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.monotonic() - self.started
        if elapsed > self.limit:
            raise UserError(
                f"training exceeded train.max_time={self.max_time} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step} of max_epochs={trainer.max_epochs}: the run is incomplete and its results "
                "would depend on this machine's speed. Raise or remove the guard (train.max_time=null), or lower "
                "train.max_epochs; rerunning with the same out_dir resumes from last.ckpt.")


class KeepEpochWeights(Callback):
    """Keeps the weights of the last `keep` epochs on disk (epochs/epochNNN.pt) for averaging; on disk rather than
    in memory so that a resumed run averages the same epochs as an uninterrupted one."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch{trainer.current_epoch:03d}.pt"
        save_torch_atomic({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}, path)
        for old in sorted(self.folder.glob("epoch*.pt"))[:-self.keep]:
            old.unlink()


def average_state_dicts(states: list[dict]) -> dict:
    """Element-wise mean of floating-point tensors; integer buffers (counters) are taken from the last state."""
    out = {}
    for k, v in states[-1].items():
        out[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
    return out


def average_into_best(out: Path, best_path: Path, module, dev_set, best_wer: float | None) -> dict:
    """Averages the kept epoch weights (a standard ESPnet/WeNet step, typically a few percent relative WER) and
    makes the average best.ckpt when its dev WER is lower than the best single epoch's."""

    paths = sorted((out / "epochs").glob("epoch*.pt"))
    if len(paths) < 2:
        return {}
    averaged = average_state_dicts([load_weights(p, "weight averaging") for p in paths])
    module.load_state_dict(averaged)
    module.eval()
    refs, hyps = decode_dataset(module, dev_set, "ctc_greedy")
    wer = word_error_rate(refs, hyps)[0]
    info = {"averaged_epochs": [int(p.stem[5:]) for p in paths], "averaged_val_wer": wer,
            "best_is_average": best_wer is None or wer < best_wer}
    if info["best_is_average"]:
        ckpt = load_weights(best_path, "weight averaging")
        ckpt["state_dict"] = averaged
        save_torch_atomic(ckpt, best_path)
    return info


# Keys that may change between an interrupted run and its resumption (they only say how long to train).
RESUME_FREE_KEYS = {"max_epochs", "max_steps", "max_time", "resume", "test_after_fit", "test_methods",
                    "num_workers", "average_last"}


def resumable_checkpoint(out: Path, cfg: DictConfig, saved: DictConfig | None) -> str | None:
    """<out>/last.ckpt when resuming is on and the run that wrote it had the same model/train/data settings."""
    last = out / "last.ckpt"
    if not cfg.train.get("resume", True) or not last.exists():
        return None
    if saved is not None:
        now = OmegaConf.to_container(cfg, resolve=True)
        before = OmegaConf.to_container(saved, resolve=True)
        changed = [f"{section}.{k}" for section in ("model", "data", "train")
                   for k in set(now[section]) | set(before.get(section, {}))
                   if k not in RESUME_FREE_KEYS and now[section].get(k) != before.get(section, {}).get(k)]
        changed += ["seed"] if now.get("seed") != before.get("seed") else []
        if changed:
            raise UserError(f"{last} was written with different settings ({', '.join(sorted(changed))}); "
                            "resuming would mix two experiments. Use another out_dir, or train.resume=false to "
                            "start over (this overwrites the checkpoints there).")
    print(f"resuming from {last}")
    return str(last)


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def prepend_csv_rows(path: Path, earlier: list[dict]) -> None:
    """Learning curves of a resumed run: the rows logged before the interruption, then the new ones."""

    rows = earlier + (read_csv_rows(path) if path.exists() else [])
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@torch.no_grad()
def decode_dataset(module, dataset: FeatureDataset, method: str, beam: int = 8, ctc_weight: float = 0.3,
                   max_batch_seconds: float = 300, first_pass: bool = False) -> tuple[list[str], list[str]]:
    """References and hypotheses over a dataset, batched by duration (outputs are padding-invariant).
    first_pass=True: a cascaded model's first pass (CTC methods only)."""
    sampler = DurationBucketSampler(dataset.durations, max_batch_seconds, shuffle=False)
    refs, hyps = [], []
    for idx in sampler:
        batch = collate_features([dataset[i] for i in idx])
        feats, lengths = module.cmvn(batch["feats"], batch["feat_lengths"]), batch["feat_lengths"]
        if first_pass:
            first, enc_len = module.model.encode_first_pass(feats, lengths)
            hyps += module.decode_first_pass(first, enc_len, method, beam)
        else:
            enc, enc_len = module.model.encode(feats, lengths)
            hyps += module.decode_encoder_output(enc, enc_len, method, beam, ctc_weight)
        refs += batch["texts"]
    return refs, hyps


def _finish_wandb() -> None:
    try:
        import wandb  # lazy: only runs logged to W&B need it (logger=csv does not), ~1 s to import

        if wandb.run is not None:
            wandb.finish()  # one run per job: multirun jobs share this process
    except ImportError:
        pass
