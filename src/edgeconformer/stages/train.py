"""Stage function `train(cfg) -> metrics`: manifests + tokenizer -> models/<variant>/s<seed>/ (artifacts.run_paths).

Writes into `out_dir`: `last.ckpt` (every epoch; resumable), `best.ckpt` (lowest `val/wer`, or the average of the
last epochs when that is lower), `tokenizer.model`, `config.yaml` (the composed config), `csv/metrics.csv` (learning
curves) and `train_metrics.json` (summary). The data is `data.datamodule.ASRDataModule`; weight averaging and the
test WER are the callbacks of `training.callbacks`.

The chain's training: `train_runs` (DVC stage `train_runs`) trains the runs (variant x seed) in a pool of
`trainer.parallel_runs` spawned processes, each on `trainer.run_threads` intra-op threads, into
`trained/<variant>/s<seed>/`;
`publish_run` (DVC stage `train@<variant>-s<seed>`) copies one of them into its run folder
`models/<variant>/s<seed>/`, where the post-training stages add their artifacts.

Why a pool inside one stage: `dvc repro` runs stages one at a time, and a training run on 2 threads keeps 2 cores
only about two-thirds busy (per-op overhead, serial random-number generation, Python). Two one-thread runs side
by side process x1.36 the audio per second of one two-thread run (measured on a 2-vCPU EPYC). `auto` runs two per core
(RUNS_PER_CORE), so that runs of unequal length do not leave a core idle at the end. `dvc exp run
--queue` with workers or Hydra's joblib launcher would parallelise too, but not under plain `dvc repro`; one stage
with a process pool does, and keeps DVC's cache and `dvc status` exact. Runs that wait for a worker start longest
first (longest_first: one timed step per distinct config), so that no long run starts last and ends alone. The
pool's outputs sit in their own folder because a DVC output directory may not contain the outputs of other stages
(stabilized.pt, model.mlpackage).

Determinism: a run's numbers depend on its config and its thread count (`trainer.run_threads`: summation order of
the CPU kernels), never on `parallel_runs` or on which runs share the machine. `python pipelines/train.py
variant=dws seed=2 trainer.num_threads=1` reproduces the chain's run by hand.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from edgeconformer.artifacts import run_paths
from edgeconformer.config import apply_variant, check, load_params, variant_name
from edgeconformer.data.datamodule import ASRDataModule
from edgeconformer.data.tokenizer import Tokenizer
from edgeconformer.errors import UserError
from edgeconformer.files import atomic_path, write_json_atomic
from edgeconformer.hardware import resolve_precision, step_timer, synthetic_batch
from edgeconformer.models.lightning import ASRModule
from edgeconformer.training.callbacks import AverageLastEpochs, DecodeTestSplit, TimeGuard, best_score, post_fit_report


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
        loggers.append(
            WandbLogger(
                project=lg.project,
                entity=lg.entity,
                group=lg.group or sweep_group() or group,
                name=name,
                job_type="train",
                tags=list(lg.tags),
                save_dir=".",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
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
    seed = int(cfg.seed)
    torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(seed, workers=True)
    out = output_dir(cfg)
    tokenizer, saved_config = start_run_folder(cfg, out)

    started = time.perf_counter()
    module = ASRModule(
        container(cfg.model), container(cfg.train), tokenizer.vocab_size, seed=seed, decode=container(cfg.train.decode)
    )
    module.tokenizer = tokenizer
    data = ASRDataModule(container(cfg.data), container(cfg.train), tokenizer, module.fbank, seed)
    data.setup("fit")  # features before the fit (timed apart from it), and the module's CMVN from them
    module.cmvn.set_stats(*data.cmvn)
    features_s = time.perf_counter() - started

    precision, precision_why = training_precision(cfg, module)
    trainer, best = make_trainer(cfg, out, precision)
    ckpt_path = resumable_checkpoint(out, cfg, saved_config)
    fit_s = fit(trainer, module, data, out, ckpt_path)
    metrics = {
        "variant": variant_name(cfg),
        "seed": seed,
        "model": cfg.model.name,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "skipped_batches": int(module.skipped_batches),
        "features_seconds": round(features_s, 1),
        "fit_seconds": round(fit_s, 1),
        "train_hours": round(sum(data.train_set.durations) / 3600, 3),
        "best_val_wer": best_score(best),
        "resumed_from": ckpt_path,
        "precision": precision_why,
        "audio_seconds_per_second": round(module.audio_seconds_seen / max(fit_s, 1e-9), 1),
    }
    metrics.update(post_fit_report(trainer)[0])  # weight averaging, then the test split
    if trainer.is_global_zero:
        write_json_atomic(out / "train_metrics.json", metrics)
    _finish_wandb()
    print(json.dumps(metrics))
    return metrics


def container(section: DictConfig) -> dict:
    return OmegaConf.to_container(section, resolve=True)


def start_run_folder(cfg: DictConfig, out: Path) -> tuple[Tokenizer, DictConfig | None]:
    """Copies the tokenizer and writes the composed config into the run folder; -> (the tokenizer, the config of an
    earlier run in that folder, which decides whether it can be resumed)."""
    out.mkdir(parents=True, exist_ok=True)
    tok_path = Path(cfg.data.out_dir) / "tokenizer" / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    saved = OmegaConf.load(out / "config.yaml") if (out / "config.yaml").exists() else None
    shutil.copyfile(tok_path, out / "tokenizer.model")
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return tokenizer, saved


def training_precision(cfg: DictConfig, module: ASRModule) -> tuple[str, dict]:
    """trainer.precision, with "auto" resolved for this machine and model (hardware.resolve_precision: bf16-mixed
    only where the CPU has bf16 instructions and a timed training step of this model is faster in it); -> (the
    Lightning precision, why)."""
    tr = cfg.trainer
    if tr.precision != "auto":
        return resolve_precision(str(tr.precision))
    batch = synthetic_batch(cfg.model.n_mels, module.model.vocab_size, float(cfg.train.max_batch_seconds))
    precision, why = resolve_precision("auto", tr.accelerator, step_timer(module.model, batch))
    print(f"trainer.precision=auto -> {precision}: {why['reason']}")
    return precision, why


def make_trainer(cfg: DictConfig, out: Path, precision: str) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Trainer with its checkpoints (best.ckpt by val/wer, last.ckpt every epoch) and the callbacks that
    train.max_time, train.average_last and train.test_after_fit ask for; -> (trainer, the best.ckpt callback)."""
    t, tr = cfg.train, cfg.trainer
    best = ModelCheckpoint(
        dirpath=out,
        filename="best",
        monitor="val/wer",
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    # Overwritten after every epoch (monitor=None keeps the latest), the checkpoint to resume from.
    last = ModelCheckpoint(dirpath=out, filename="last", save_top_k=1, enable_version_counter=False)
    callbacks = [best, last]
    if t.get("max_time"):
        callbacks.append(TimeGuard(t.max_time))
    if t.average_last > 1:
        callbacks.append(AverageLastEpochs(out / "epochs", t.average_last, best))
    if t.get("test_after_fit", True):  # after the averaging, which may replace best.ckpt
        callbacks.append(DecodeTestSplit(best, t.test_methods, t.decode.beam, t.decode.ctc_weight))
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        strategy=tr.strategy,
        precision=precision,
        deterministic=tr.deterministic,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        gradient_clip_val=t.grad_clip,
        check_val_every_n_epoch=t.val_every_n_epochs,
        log_every_n_steps=tr.log_every_n_steps,
        logger=make_loggers(cfg, out),
        callbacks=callbacks,
        enable_progress_bar=bool(tr.get("progress_bar", True)),
        use_distributed_sampler=False,
        default_root_dir=str(out),
        num_sanity_val_steps=0,
    )
    return trainer, best


def fit(trainer: L.Trainer, module: ASRModule, data: ASRDataModule, out: Path, ckpt_path: str | None) -> float:
    """Trainer.fit (resuming from ckpt_path), keeping the learning curves logged before an interruption; -> the
    seconds of fitting, without the post-fit callbacks' work."""
    if ckpt_path is None:
        shutil.rmtree(out / "epochs", ignore_errors=True)  # weights of an earlier run must not be averaged in
    curves = out / "csv" / "metrics.csv"
    earlier = read_csv_rows(curves) if ckpt_path and curves.exists() else []  # the CSV logger starts afresh
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - started - post_fit_report(trainer)[1]
    if earlier and trainer.is_global_zero:
        prepend_csv_rows(curves, earlier)
    return seconds


# Keys that may change between an interrupted run and its resumption (they only say how long to train).
RESUME_FREE_KEYS = {
    "max_epochs",
    "max_steps",
    "max_time",
    "resume",
    "test_after_fit",
    "test_methods",
    "num_workers",
    "average_last",
}


def resumable_checkpoint(out: Path, cfg: DictConfig, saved: DictConfig | None) -> str | None:
    """<out>/last.ckpt when resuming is on and the run that wrote it had the same model/train/data settings."""
    last = out / "last.ckpt"
    if not cfg.train.get("resume", True) or not last.exists():
        return None
    if saved is not None:
        now = OmegaConf.to_container(cfg, resolve=True)
        before = OmegaConf.to_container(saved, resolve=True)
        changed = [
            f"{section}.{k}"
            for section in ("model", "data", "train")
            for k in set(now[section]) | set(before.get(section, {}))
            if k not in RESUME_FREE_KEYS and now[section].get(k) != before.get(section, {}).get(k)
        ]
        changed += ["seed"] if now.get("seed") != before.get("seed") else []
        if changed:
            raise UserError(
                f"{last} was written with different settings ({', '.join(sorted(changed))}); "
                "resuming would mix two experiments. Use another out_dir, or train.resume=false to "
                "start over (this overwrites the checkpoints there)."
            )
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


def _finish_wandb() -> None:
    try:
        import wandb  # lazy: only runs logged to W&B need it (logger=csv does not), ~1 s to import

        if wandb.run is not None:
            wandb.finish()  # one run per job: multirun jobs share this process
    except ImportError:
        pass


# ----------------------------------------------------------------------------- the chain's runs, side by side
TRAINED = Path("trained")  # the pool's output folder, one sub-folder per run (<variant>/s<seed>)
# What the run folder receives from the pool: DVC's outputs of train@<run> (dvc.yaml).
PUBLISHED = ("best.ckpt", "last.ckpt", "tokenizer.model", "config.yaml", "train_metrics.json", "csv/metrics.csv")


# Two one-thread runs per core: runs of unequal length then rarely leave a core idle at the end (seven runs in pairs
# leave the longest one training alone), at a small cost of sharing a core (measured on a 2-vCPU EPYC: 4 one-thread
# trainings at once process 2% less per second in total than 2; 7 at once, 7% less).
RUNS_PER_CORE = 2
RUN_MEMORY = 3 * 2**30  # bytes one CPU run may hold: the default recipe peaks at ~1.9 GB resident (measured)


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no memory cap
        return 2**62


def parallel_runs(setting, runs: int, accelerator: str, run_threads: int) -> int:
    """How many runs train at once: `setting` ("auto" or a number), at most `runs`. auto on CPU: RUNS_PER_CORE runs
    per group of `run_threads` usable cores, no more than the memory holds (RUN_MEMORY each); one at a time on an
    accelerator (one device, one run)."""
    if str(setting) != "auto":
        n = int(setting)
        if n < 1:
            raise UserError(f"trainer.parallel_runs={setting}: give a positive number or auto")
        return min(n, max(runs, 1))
    if accelerator not in ("cpu", "auto") or runs <= 1:
        return 1
    if accelerator == "auto" and torch.cuda.is_available():  # Lightning's auto picks the GPU: one device
        return 1
    cores = len(os.sched_getaffinity(0)) // max(1, run_threads)
    return max(1, min(runs, RUNS_PER_CORE * cores, physical_memory() // RUN_MEMORY))


def run_overrides(run: dict, cfg: DictConfig) -> list[str]:
    """The command-line overrides that make a run's config out of the params file."""
    return [
        f"variant={run['variant']}",
        f"seed={run['seed']}",
        f"out_dir={TRAINED / run['dir']}",
        f"trainer.num_threads={int(cfg.trainer.run_threads)}",
        "trainer.progress_bar=false",  # side-by-side runs would interleave their bars
        "train.resume=false",
    ]


def run_config(params: str, overrides: list[str]) -> DictConfig:
    """A run's config: the params file + the run's overrides, as `pipelines/train.py` composes them."""
    cfg, given = load_params(params, overrides)
    return check(apply_variant(cfg, given))


def train_one(params: str, overrides: list[str]) -> dict:
    """One run in a pool worker."""
    return train(run_config(params, overrides))


FRAME_SHIFT_S = 0.01  # frames of step_cost's synthetic batch


def step_cost(cfg: DictConfig) -> float:
    """A run's training time, up to a factor every run shares (the same data): the seconds of one training step
    of its model on a synthetic batch of about its train.max_batch_seconds (hardware.synthetic_batch: 8 s
    utterances), on trainer.num_threads threads, per second of batch audio, times its epochs."""
    t = cfg.train
    vocab = Tokenizer(Path(cfg.data.out_dir) / "tokenizer" / "tokenizer.model").vocab_size
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # the model's initialisation draws from the global generator
        module = ASRModule(container(cfg.model), container(t), vocab, seed=int(cfg.seed), decode=container(t.decode))
        batch = synthetic_batch(
            cfg.model.n_mels, module.model.vocab_size, float(t.max_batch_seconds), frame_shift_s=FRAME_SHIFT_S
        )
        torch.set_num_threads(int(cfg.trainer.num_threads))
        try:
            seconds = step_timer(module.model, batch, steps=1)("32-true")
        finally:
            torch.set_num_threads(threads)
    audio_seconds = float(batch[1].sum()) * FRAME_SHIFT_S  # the batch's lengths (frames)
    return seconds / audio_seconds * int(t.max_epochs)


def longest_first(names: list[str], config, cost=step_cost) -> tuple[list[str], dict]:
    """The runs in the order the pool starts them: the longest first (cost: step_cost of config(name), timed once
    per distinct model and training config: seeds of a variant share it), ties in the given order; -> (order,
    {name: cost}). A run whose config or timing fails costs inf: it starts first, and its worker fails with the
    error, listed with the run like any other failure while the other runs train."""
    timed, costs = {}, {}
    for name in names:
        try:
            c = config(name)
            key = json.dumps([container(c.model), container(c.train), container(c.trainer)], sort_keys=True)
            if key not in timed:
                timed[key] = cost(c)
            costs[name] = timed[key]
        except Exception as e:  # noqa: BLE001 - the run's own worker reports it
            print(f"{name}: no cost estimate ({type(e).__name__}: {e}); it starts first")
            costs[name] = math.inf
    return sorted(names, key=lambda n: -costs[n]), costs


def train_runs(cfg: DictConfig, params: str, extra: list[str] = ()) -> dict:
    """Trains every run of cfg.runs (the params file `params` + the command line's `extra` overrides, + each run's
    own); -> {"runs": {run name: its train_metrics, or {"error": ...}}, ...}. Raises UserError naming the runs
    that failed after the others have finished (their folders are complete and kept)."""
    runs = dict(cfg.runs)
    workers = parallel_runs(cfg.trainer.parallel_runs, len(runs), cfg.trainer.accelerator, cfg.trainer.run_threads)
    print(f"training {len(runs)} runs, {workers} at a time, {cfg.trainer.run_threads} thread(s) each")
    started, results = time.perf_counter(), {}
    overrides = {name: [*extra, *run_overrides(r, cfg)] for name, r in runs.items()}
    order, costs = list(runs), None
    if 1 < workers < len(runs):  # the order matters only when runs wait for a free worker
        order, costs = longest_first(order, lambda name: run_config(params, overrides[name]))
        print("longest first (estimated step cost): " + ", ".join(f"{n} {costs[n]:.3g}" for n in order))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = {pool.submit(train_one, params, overrides[name]): name for name in order}
        for job in as_completed(jobs):
            name = jobs[job]
            try:
                results[name] = job.result()
                print(f"{name}: done after {time.perf_counter() - started:.0f} s")
            except Exception as e:  # noqa: BLE001 - every run is either trained or listed with its error
                results[name] = {"error": "".join(traceback.format_exception_only(type(e), e)).strip()}
                print(f"{name}: FAILED: {results[name]['error']}")
    summary = {
        "runs": {name: results[name] for name in runs},
        "parallel_runs": workers,
        "run_threads": int(cfg.trainer.run_threads),
        "order": order,
        "estimated_costs": costs,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(TRAINED / "runs.json", summary)
    failed = {n: r["error"] for n, r in summary["runs"].items() if "error" in r}
    if failed:
        raise UserError(
            "training failed for " + "; ".join(f"{n}: {e}" for n, e in failed.items()) + " (the other runs are kept "
            f"in {TRAINED}/; rerun one by hand with python pipelines/train.py --params params.yaml variant=<v> "
            "seed=<s> trainer.num_threads=1)"
        )
    return summary


def publish_run(cfg: DictConfig) -> dict:
    """Copies the pool's run of cfg.variant / cfg.seed into its run folder (models/<variant>/s<seed>/)."""
    paths = run_paths(cfg)
    source = TRAINED / paths.variant / f"s{paths.seed}"
    missing = [f for f in PUBLISHED if not (source / f).is_file()]
    if missing:
        raise UserError(
            f"{source}: {', '.join(missing)} missing; train the runs first with `dvc repro train_runs` "
            f"(or python pipelines/train_runs.py --params params.yaml)"
        )
    for name in PUBLISHED:
        target = paths.model_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source / name, tmp)
    metrics = json.loads((source / "train_metrics.json").read_text(encoding="utf-8"))
    print(f"{source} -> {paths.model_dir}")
    return metrics
