"""One ablation job end to end: train -> stabilize -> export -> evaluate, then one W&B run with the job's config
and metrics (grouped per sweep). Under Hydra multirun every job writes into its own job folder:

    python pipelines/ablate.py -m model.subsampling=vanilla,dws stabilize.prenorm=none,mad
    python pipelines/ablate.py -m hydra/launcher=local_parallel trainer.num_threads=1 model.subsampling=vanilla,dws
    python pipelines/ablate.py -m hydra/launcher=slurm trainer=gpu model=conformer_m data=librispeech ...

The DVC chain (dvc.yaml) runs the same stage functions on the fixed paths models/<variant>/s<seed> and
reports/runs/<variant>/s<seed> (artifacts.py); seeds are a sweep axis here too: `-m seed=1,2,3`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from edgeconformer.config import variant_name
from edgeconformer.errors import UserError
from edgeconformer.stages.evaluate import evaluate
from edgeconformer.stages.export import export
from edgeconformer.stages.stabilize import stabilize
from edgeconformer.stages.train import sweep_group, train
from edgeconformer.wandb_report import SUMMARY_KEYS, log_job


def _is_sweep(value: str) -> bool:
    # "a,b" (outside brackets), range(...), choice(...), glob(...): Hydra's sweep syntax
    depth = 0
    for ch in value:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            return True
    return value.startswith(("range(", "choice(", "glob(", "interval("))


def job_name(cfg: DictConfig, argv: list[str] | None = None) -> str:
    """The job's values of the swept keys (e.g. "model.subsampling=dws,stabilize.prenorm=mad"): the keys given a
    sweep on the command line; every override of the job when those are not known (e.g. in a launcher's worker
    process); model-variant outside Hydra."""

    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job
        return f"{cfg.model.name}-{variant_name(cfg)}"
    swept = {
        a.split("=", 1)[0].lstrip("+~")
        for a in (sys.argv[1:] if argv is None else argv)
        if "=" in a and _is_sweep(a.split("=", 1)[1])
    }
    mine = [o for o in task if o.split("=", 1)[0].lstrip("+~") in swept] or task
    return ",".join(mine) or f"{cfg.model.name}-{variant_name(cfg)}"


def job_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not inside a Hydra job
        raise UserError(
            "ablate needs out_dir=<folder> when it is not run through Hydra (it must not overwrite "
            "the DVC outputs in models/)"
        ) from None


def ablate(cfg: DictConfig) -> dict:
    out = job_dir(cfg)
    with open_dict(cfg):
        cfg.out_dir = str(out)
        cfg.variant = variant_name(cfg)
    train(cfg)
    stabilize(cfg)
    export(cfg)
    metrics = evaluate(cfg)
    lg = cfg.logger
    if lg.get("wandb"):
        log_job(
            metrics,
            OmegaConf.to_container(cfg, resolve=True),
            project=lg.project,
            entity=lg.entity,
            group=lg.group or sweep_group() or "ablate",
            name=job_name(cfg),
            mode=lg.get("wandb_mode", "offline"),
            job_type="ablate",
        )
    return {k: metrics.get(k) for k in SUMMARY_KEYS}
