"""Config loading shared by the stage entry points.

Two ways in, one config: `python pipelines/<stage>.py key=value ...` composes conf/ with Hydra (multirun
included), while DVC stages run `python pipelines/<stage>.py --params params.yaml`, reading the composed
params.yaml that DVC tracks (DVC does not feed `@hydra.main`); extra `key=value` overrides apply on top.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config a stage would see for these overrides (used by tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def load_params(path: str | Path, overrides: list[str]) -> DictConfig:
    cfg = OmegaConf.load(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"overrides must be key=value, got {bad}")
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    assert isinstance(merged, DictConfig)
    return merged


def run_stage(stage: Callable[[DictConfig], object], config_name: str = "config") -> None:
    """Entry point body: `--params FILE` reads a composed file, otherwise Hydra composes conf/."""
    argv = sys.argv[1:]
    if "--params" in argv:
        i = argv.index("--params")
        cfg = load_params(argv[i + 1], argv[:i] + argv[i + 2:])
        _call(stage, cfg)
        return
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg: DictConfig):
        return _call(stage, cfg)

    _main()


def _call(stage: Callable[[DictConfig], object], cfg: DictConfig):
    from edgeconformer.errors import UserError

    try:
        return stage(cfg)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
