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

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from edgeconformer.config import run_name, variant_name  # noqa: F401  (run_name: re-exported)
from edgeconformer.data.tokenizer import Tokenizer
from edgeconformer.errors import UserError

# The writers and loaders of files.py are re-exported: stages write through the artifacts layer.
from edgeconformer.files import (  # noqa: F401
    load_weights,
    read_jsonl,
    refused,
    save_torch_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from edgeconformer.models.lightning import ASRModule
from edgeconformer.stabilize.ane import ANEConformer

SEED_DIR = re.compile(r"^s(\d+)$")


@dataclass(frozen=True)
class RunPaths:
    variant: str
    seed: int
    model_dir: Path  # models/<variant>/s<seed>: checkpoints (train), stabilized.pt, .mlpackage
    report_dir: Path  # reports/runs/<variant>/s<seed>: audits, conversion report, per-utterance results
    evaluation: Path  # every figure of the run (evaluate); the compare stage aggregates the chain's runs

    @property
    def utterances(self) -> Path:
        return self.report_dir / "utterances.jsonl"

    @property
    def stabilized(self) -> Path:
        return self.model_dir / "stabilized.pt"

    @property
    def package(self) -> Path:
        """The Core ML program (export); a folder."""
        return self.model_dir / "model.mlpackage"

    @property
    def name(self) -> str:
        """The run's DVC item name, e.g. "dws-s2" (stages train@dws-s2, stabilize@dws-s2, ...)."""
        return run_name(self.variant, self.seed)


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
    return RunPaths(
        variant, int(seed), Path(root) / "models" / variant / f"s{int(seed)}", reports, reports / "evaluation.json"
    )


def variant_metrics_path(variant: str, metrics_dir: str | Path = "metrics") -> Path:
    return Path(metrics_dir) / f"{variant}.json"


def seeds_in(variant_dir: str | Path) -> list[int]:
    """The seeds trained under models/<variant>/ (folders s<seed> holding a checkpoint), ascending."""
    variant_dir = Path(variant_dir)
    if not variant_dir.is_dir():
        return []
    found = [
        int(m.group(1))
        for p in variant_dir.iterdir()
        if (m := SEED_DIR.match(p.name)) and p.is_dir() and any(p.glob("*.ckpt"))
    ]
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
            raise UserError(
                f"{chosen}: no run of seed {seed} (trained seeds in {model_dir}: {seeds or 'none'}); "
                f"train it with `dvc repro train@{model_dir.name}-s{seed}` (add the seed to `seeds`)"
            )
        return chosen
    if any(model_dir.glob("*.ckpt")) or not seeds:
        return model_dir
    return model_dir / f"s{seeds[0]}"


def load_trained(model_dir: str | Path, checkpoint: str = "best", seed: int | None = None):
    """models/<variant>[/s<seed>] -> ASRModule in eval mode with its tokenizer attached."""
    model_dir = resolve_model_dir(model_dir, seed)
    ckpt = model_dir / f"{checkpoint}.ckpt"
    if not ckpt.exists():
        found = sorted(p.name for p in model_dir.glob("*.ckpt")) if model_dir.is_dir() else []
        raise UserError(
            f"{ckpt}: checkpoint not found (found: {found or 'none'}); train one with "
            "`dvc repro train@<variant>-s<seed>` or pass --checkpoint last"
        )
    try:  # Lightning loads with torch.load(weights_only=True): tensors and plain containers, no code
        module = ASRModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    except pickle.UnpicklingError as e:
        raise refused(ckpt, "the trained model", e) from None
    module.tokenizer = Tokenizer(model_dir / "tokenizer.model")
    return module.eval()


def save_stabilized(ane, options: dict, path: str | Path) -> Path:
    """The stabilized graph's weights and the options it was built with (RunPaths.stabilized)."""
    return save_torch_atomic({"options": options, "state_dict": ane.state_dict()}, path)


def load_stabilized(model_dir: str | Path, checkpoint: str = "best"):
    """A run's folder -> (ASRModule, stabilized ANEConformer in FP32, options); the weights are checked against
    what stabilize saved, so a retrained checkpoint without a re-run of stabilize is caught."""
    model_dir = Path(model_dir)
    path = model_dir / "stabilized.pt"
    if not path.exists():
        raise UserError(f"{path}: not found; run `dvc repro stabilize@{run_label(model_dir)}` first")
    saved = load_weights(path, "the stabilized model")
    module = load_trained(model_dir, checkpoint)
    ane = ANEConformer.from_asr(module.model, module.cmvn, **saved["options"]).eval()
    for name, value in ane.state_dict().items():
        if not torch.equal(value, saved["state_dict"][name]):
            raise UserError(
                f"{path}: weights differ from {model_dir / (checkpoint + '.ckpt')} ({name}); the model "
                f"was retrained after stabilization: run `dvc repro stabilize@{run_label(model_dir)}`"
            )
    return module, ane, saved["options"]
