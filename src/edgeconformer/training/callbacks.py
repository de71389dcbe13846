"""Callbacks of the train stage: `TimeGuard` (train.max_time), `AverageLastEpochs` (train.average_last) and
`DecodeTestSplit` (train.test_after_fit).

The two post-fit callbacks (`AfterFit`) run once after fitting, on global rank zero, and report what they measured
for train_metrics.json in `trainer.callback_metrics[POST_FIT]` (read with `post_fit_report`): Lightning carries
callback_metrics back to the main process under ddp_spawn, where a callback's own attributes would stay in the
worker. They also report the seconds they took, which the stage leaves out of `fit_seconds`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from edgeconformer.data.datamodule import FeatureDataset
from edgeconformer.errors import UserError
from edgeconformer.files import load_weights, save_torch_atomic
from edgeconformer.models.lightning import FIRST_PASS_METHODS, ASRModule, word_error_rate
from edgeconformer.training.decode import decode_dataset

POST_FIT = "post_fit"  # trainer.callback_metrics key of the post-fit callbacks' report


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
                "train.max_epochs; rerunning with the same out_dir resumes from last.ckpt."
            )


class AfterFit(Callback, ABC):
    """Work done once after fitting on global rank zero (`after_fit` returns train_metrics.json entries)."""

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        started = time.perf_counter()
        values = self.after_fit(trainer, pl_module)
        report = trainer.callback_metrics.setdefault(POST_FIT, {"metrics": {}, "seconds": 0.0})
        report["metrics"].update(values)
        report["seconds"] += time.perf_counter() - started

    @abstractmethod
    def after_fit(self, trainer, pl_module) -> dict:
        """The work; -> its train_metrics.json entries."""


def post_fit_report(trainer) -> tuple[dict, float]:
    """(train_metrics.json entries of the post-fit callbacks, in their order; the seconds they took)."""
    report = trainer.callback_metrics.get(POST_FIT) or {}
    return dict(report.get("metrics", {})), float(report.get("seconds", 0.0))


def best_score(best: ModelCheckpoint) -> float | None:
    """The monitored value of the best checkpoint (dev WER), None when unknown."""
    return float(best.best_model_score) if best.best_model_score is not None else None


class AverageLastEpochs(AfterFit):
    """Keeps the weights of the last `keep` epochs on disk (<folder>/epochNNN.pt) for averaging; on disk rather than
    in memory so that a resumed run averages the same epochs as an uninterrupted one. After fit, averages them into
    `best`'s checkpoint when the average's dev WER is lower (`average_into_best`)."""

    def __init__(self, folder: Path, keep: int, best: ModelCheckpoint):
        self.folder, self.keep, self.best = folder, keep, best

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch{trainer.current_epoch:03d}.pt"
        save_torch_atomic({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}, path)
        for old in sorted(self.folder.glob("epoch*.pt"))[: -self.keep]:
            old.unlink()

    def after_fit(self, trainer, pl_module) -> dict:
        if not self.best.best_model_path:
            return {}
        return average_into_best(
            self.folder.parent,
            Path(self.best.best_model_path),
            pl_module,
            trainer.datamodule.dev_set,
            best_score(self.best),
        )


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
    info = {
        "averaged_epochs": [int(p.stem[5:]) for p in paths],
        "averaged_val_wer": wer,
        "best_is_average": best_wer is None or wer < best_wer,
    }
    if info["best_is_average"]:
        ckpt = load_weights(best_path, "weight averaging")
        ckpt["state_dict"] = averaged
        save_torch_atomic(ckpt, best_path)
    return info


class DecodeTestSplit(AfterFit):
    """After fit (and weight averaging), the test WER/CER of `best`'s checkpoint for each of `methods`
    (test_wer_<method>, test_cer_<method>), and for a cascaded model its streaming first pass too
    (test_wer_first_pass_<method>, with the CTC methods among `methods`, else ctc_greedy)."""

    def __init__(self, best: ModelCheckpoint, methods: Sequence[str], beam: int, ctc_weight: float):
        self.best, self.methods, self.beam, self.ctc_weight = best, list(methods), beam, ctc_weight

    def after_fit(self, trainer, pl_module) -> dict:
        if not self.best.best_model_path:
            return {}
        datamodule = trainer.datamodule
        module = ASRModule.load_from_checkpoint(self.best.best_model_path, map_location="cpu")
        module.tokenizer = datamodule.tokenizer
        module.eval()
        datamodule.setup("test")
        return self.decode(module, datamodule.test_set)

    def decode(self, module: ASRModule, test_set: FeatureDataset) -> dict:
        metrics = {}
        for method in self.methods:
            refs, hyps = decode_dataset(module, test_set, method, self.beam, self.ctc_weight)
            metrics[f"test_wer_{method}"], metrics[f"test_cer_{method}"] = word_error_rate(refs, hyps)
        if hasattr(module.model, "first_pass_log_probs"):  # cascade: the streaming first pass too
            for method in [m for m in self.methods if m in FIRST_PASS_METHODS] or ["ctc_greedy"]:
                refs, hyps = decode_dataset(module, test_set, method, self.beam, first_pass=True)
                metrics[f"test_wer_first_pass_{method}"], metrics[f"test_cer_first_pass_{method}"] = word_error_rate(
                    refs, hyps
                )
        return metrics
