"""Where every stage's artifacts live, per variant and seed, and how a trained model is found and loaded.

A *run* is one trained model: a variant (conf/variant_overrides/<variant>.yaml) trained with one seed. The DVC
chain's fixed layout (dvc.yaml's foreach over `runs`, e.g. `train@dws-s2`):

    models/<variant>/s<seed>/           checkpoints, tokenizer, config (train), stabilized.pt, model.mlpackage
    reports/runs/<variant>/s<seed>/     audits, stabilize.json, conversion report, evaluation.json (every figure
                                        of the run), utterances.jsonl (per-utterance errors of every mode)
    metrics/<variant>.json              per variant over its seeds: headline mean/sd, a `seeds` list (compare)
    metrics/comparisons.json            paired differences with bootstrap CIs (compare)

Per-run reports sit under reports/runs/ so that the compare stage can depend on all of them while the report
stage writes reports/summary.md without a dependency cycle. A run folder given as `out_dir` (an ablation job)
holds everything of its run instead: checkpoints, reports/ and metrics.json (its evaluation).

`models/<variant>` without a seed resolves to the run of the default seed (the lowest seed trained there: seed 1
in the default chain), so `edgeconformer transcribe --model models/dws` keeps working; `--seed N` picks another.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from edgeconformer.config import variant_name
from edgeconformer.data.manifest import write_json_atomic, write_jsonl_atomic  # noqa: F401  (the one atomic writer)
from edgeconformer.errors import UserError

SEED_DIR = re.compile(r"^s(\d+)$")


@dataclass(frozen=True)
class RunPaths:
    variant: str
    seed: int
    model_dir: Path      # models/<variant>/s<seed>: checkpoints (train), stabilized.pt, .mlpackage
    report_dir: Path     # reports/runs/<variant>/s<seed>: audits, conversion report, per-utterance results
    evaluation: Path     # every figure of the run (evaluate); the compare stage aggregates the chain's runs

    @property
    def utterances(self) -> Path:
        return self.report_dir / "utterances.jsonl"

    @property
    def name(self) -> str:
        """The run's DVC item name, e.g. "dws-s2" (stages train@dws-s2, stabilize@dws-s2, ...)."""
        return run_name(self.variant, self.seed)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes a text file through a temporary file in the same folder and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{int(seed)}"


def run_label(model_dir: str | Path) -> str:
    """models/dws/s2 -> "dws-s2" (the DVC item name of the run in that folder); other folders: their name."""
    model_dir = Path(model_dir)
    m = SEED_DIR.match(model_dir.name)
    return run_name(model_dir.parent.name, int(m.group(1))) if m else model_dir.name


def run_paths(cfg: DictConfig) -> RunPaths:
    """The run of this config: `variant` (or the front end's name) and `seed`; `out_dir` names one run folder."""
    variant, seed = variant_name(cfg), int(cfg.seed)
    if cfg.get("out_dir"):
        root = Path(cfg.out_dir)
        return RunPaths(variant, seed, root, root / "reports", root / "metrics.json")
    return chain_run(variant, seed)


def chain_run(variant: str, seed: int, root: str | Path = ".") -> RunPaths:
    """The DVC chain's folders of one run (under `root`, the repository)."""
    reports = Path(root) / "reports" / "runs" / variant / f"s{int(seed)}"
    return RunPaths(variant, int(seed), Path(root) / "models" / variant / f"s{int(seed)}", reports,
                    reports / "evaluation.json")


def variant_metrics_path(variant: str, metrics_dir: str | Path = "metrics") -> Path:
    return Path(metrics_dir) / f"{variant}.json"


def runs_table(variants, compared, seeds, ablation_seeds) -> dict:
    """The DVC chain's runs: every variant in `compared` with every seed in `seeds`, every other variant with
    `ablation_seeds`. -> {"dws-s2": {"variant": "dws", "seed": 2, "dir": "dws/s2"}, ...} in variant order.
    Registered as the OmegaConf resolver `edgeconformer.runs` (conf/config.yaml's `runs`)."""
    def seed_list(name, values):
        out = [int(s) for s in values]
        if not out or len(set(out)) != len(out) or min(out) < 0:
            raise UserError(f"{name}={list(values)}: give distinct non-negative integer seeds, e.g. [1,2,3]")
        return out

    seeds, ablation_seeds = seed_list("seeds", seeds), seed_list("ablation_seeds", ablation_seeds)
    unknown = [v for v in compared if v not in variants]
    if unknown:
        raise UserError(f"compared={list(compared)} names variants not in variants={list(variants)}: {unknown}")
    table = {}
    for variant in variants:
        for seed in (seeds if variant in compared else ablation_seeds):
            table[run_name(variant, seed)] = {"variant": str(variant), "seed": seed, "dir": f"{variant}/s{seed}"}
    return table


def seeds_in(variant_dir: str | Path) -> list[int]:
    """The seeds trained under models/<variant>/ (folders s<seed> holding a checkpoint), ascending."""
    variant_dir = Path(variant_dir)
    if not variant_dir.is_dir():
        return []
    found = [int(m.group(1)) for p in variant_dir.iterdir() if (m := SEED_DIR.match(p.name)) and p.is_dir()
             and any(p.glob("*.ckpt"))]
    return sorted(found)


def resolve_model_dir(model_dir: str | Path, seed: int | None = None) -> Path:
    """A folder holding checkpoints. models/<variant> (seed folders inside) -> models/<variant>/s<seed>, the
    lowest seed trained when `seed` is None; a folder with checkpoints of its own is returned as it is."""
    model_dir = Path(model_dir)
    seeds = seeds_in(model_dir)
    if seed is not None:
        if not seeds and SEED_DIR.match(model_dir.name):
            raise UserError(f"{model_dir} is already one seed's run; drop --seed or give models/<variant>")
        chosen = model_dir / f"s{int(seed)}"
        if int(seed) not in seeds:
            raise UserError(f"{chosen}: no run of seed {seed} (trained seeds in {model_dir}: {seeds or 'none'}); "
                            f"train it with `dvc repro train@{model_dir.name}-s{seed}` (add the seed to `seeds`)")
        return chosen
    if any(model_dir.glob("*.ckpt")) or not seeds:
        return model_dir
    return model_dir / f"s{seeds[0]}"


def load_weights(path: str | Path, purpose: str):
    """torch.load of a checkpoint or weights file with weights_only=True: tensors and plain containers only, so a
    planted pickle cannot run code. `purpose` names what asked for it (e.g. "train.init_from") in the error."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load for {purpose}: the file holds objects other than tensors and "
                        f"plain containers, which could run code when unpickled ({str(e).splitlines()[-1][:200]}); "
                        "load only checkpoints written by edgeconformer's training") from None


def load_trained(model_dir: str | Path, checkpoint: str = "best", seed: int | None = None):
    """models/<variant>[/s<seed>] -> ASRModule in eval mode with its tokenizer attached."""
    from edgeconformer.data.tokenizer import Tokenizer
    from edgeconformer.models.lightning import ASRModule

    model_dir = resolve_model_dir(model_dir, seed)
    ckpt = model_dir / f"{checkpoint}.ckpt"
    if not ckpt.exists():
        found = sorted(p.name for p in model_dir.glob("*.ckpt")) if model_dir.is_dir() else []
        raise UserError(f"{ckpt}: checkpoint not found (found: {found or 'none'}); train one with "
                        "`dvc repro train@<variant>-s<seed>` or pass --checkpoint last")
    try:  # Lightning loads with torch.load(weights_only=True): tensors and plain containers, no code
        module = ASRModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UserError(f"{ckpt}: refused to load: the checkpoint holds objects other than tensors and plain "
                        f"containers, which could run code when unpickled ({str(e).splitlines()[-1][:200]}); "
                        "load only checkpoints written by edgeconformer's training") from None
    module.tokenizer = Tokenizer(model_dir / "tokenizer.model")
    return module.eval()
