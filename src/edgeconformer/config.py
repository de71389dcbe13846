"""Config loading shared by the stage entry points.

Two ways in, one config: `python pipelines/<stage>.py key=value ...` composes conf/ with Hydra (multirun
included), while DVC stages run `python pipelines/<stage>.py --params params.yaml`, reading the composed
params.yaml that DVC tracks (DVC does not feed `@hydra.main`); extra `key=value` overrides apply on top.
Either way, `variant=<name>` applies `variant_overrides.<name>` (conf/variant_overrides/<name>.yaml) under the
command line's own overrides: the DVC chain's `foreach` runs every stage once per name in `variants`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from edgeconformer.errors import UserError
from edgeconformer.models.config import register_schema

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"


def register_resolvers() -> None:
    """`${edgeconformer.runs:variants,compared,seeds,ablation_seeds}`: the chain's runs (runs_table).
    Registered on import of this module and by hydra_plugins/edgeconformer_resolvers.py (DVC's composition)."""
    if not OmegaConf.has_resolver("edgeconformer.runs"):

        def runs(variants, compared, seeds, ablation_seeds):
            # a DictConfig: OmegaConf.resolve (DVC's composition) cannot store a plain dict in the node
            return OmegaConf.create(runs_table(variants, compared, seeds, ablation_seeds))

        OmegaConf.register_new_resolver("edgeconformer.runs", runs)


register_resolvers()
register_schema()


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{int(seed)}"


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
        for seed in seeds if variant in compared else ablation_seeds:
            table[run_name(variant, seed)] = {"variant": str(variant), "seed": seed, "dir": f"{variant}/s{seed}"}
    return table


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config a stage would see for these overrides (used by tests and notebooks)."""

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def load_params(path: str | Path, overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """(params file + overrides, the overrides alone); apply_variant makes the stage's config of the two."""
    cfg = OmegaConf.load(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"overrides must be key=value, got {bad}")
    given = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
    merged = OmegaConf.merge(cfg, given)
    assert isinstance(merged, DictConfig)
    return merged, given


def variant_name(cfg: DictConfig) -> str:
    """The run's variant: `variant` when set (DVC's foreach), else named by the front end (vanilla, dws)."""
    return cfg.get("variant") or cfg.model.subsampling


def apply_variant(cfg: DictConfig, given: DictConfig | None = None) -> DictConfig:
    """The config of `cfg.variant`: its `variant_overrides.<variant>` merged on top, then `given` (the command
    line's own overrides) again, so `variant=practical model.encoder.performer_features=128` keeps the 128.
    No variant, or a variant without overrides of its own while `model.subsampling` names it (older params
    files), leaves cfg as it is."""
    variant = cfg.get("variant")
    table = cfg.get("variant_overrides") or {}
    if not variant or (variant not in table and variant == cfg.model.get("subsampling")):
        return cfg
    if variant not in table:
        raise UserError(
            f"variant={variant!r} is not one of variant_overrides ({', '.join(table) or 'none'}); add "
            f"conf/variant_overrides/{variant}.yaml and its line in conf/config.yaml's defaults, then "
            "run `python -m edgeconformer.params`"
        )
    merged = OmegaConf.merge(cfg, table[variant], given if given is not None else {})
    assert isinstance(merged, DictConfig)
    return merged


def _hydra_given(cfg: DictConfig) -> DictConfig:
    # The keys a Hydra job's command line set (key=value, not config-group choices or deletions), with the values
    # Hydra composed for them, to re-apply after the variant's overrides.

    given, absent = OmegaConf.create({}), object()
    for o in HydraConfig.get().overrides.task:
        key, sep, _ = o.partition("=")
        key = key.lstrip("+")
        if not sep or key.startswith(("~", "hydra.")) or "@" in key or (CONF_DIR / key).is_dir():
            continue
        value = OmegaConf.select(cfg, key, default=absent)
        if value is not absent:
            OmegaConf.update(given, key, value, force_add=True)
    return given


def params_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """A stage's command line -> (the file after `--params`, or None) and the key=value overrides around it."""
    if "--params" not in argv:
        return None, list(argv)
    i = argv.index("--params")
    if i + 1 == len(argv):
        raise UserError("--params needs a file: --params params.yaml")
    return argv[i + 1], argv[:i] + argv[i + 2 :]


def run_stage(stage: Callable[[DictConfig], object], config_name: str = "config") -> None:
    """Entry point body: `--params FILE` reads a composed file, otherwise Hydra composes conf/."""
    params, overrides = params_argument(sys.argv[1:])
    if params is not None:
        cfg, given = load_params(params, overrides)
        _call(stage, cfg, given)
        return

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg: DictConfig):
        return _call(stage, cfg, _hydra_given(cfg) if cfg.get("variant") else None)

    _main()


def check(cfg: DictConfig) -> DictConfig:
    """Settings a stage would only trip over late, checked before any work starts."""

    max_time = (cfg.get("train") or {}).get("max_time")
    if max_time is not None and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", str(max_time)):
        raise UserError(f"train.max_time={max_time!r}: expected DD:HH:MM:SS, e.g. 00:02:00:00, or null for no guard")
    return cfg


def _call(stage: Callable[[DictConfig], object], cfg: DictConfig, given: DictConfig | None):
    try:
        return stage(check(apply_variant(cfg, given)))
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
