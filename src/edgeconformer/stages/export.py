"""Stage `export@<variant>-s<seed>`: the stabilized ANE-layout graph -> models/<variant>/s<seed>/model.mlpackage +
conversion report.

The package is built from the same weights and options that stabilize checked (<run>/stabilized.pt), so
what is exported is exactly the graph whose FP32 equivalence and FP16 behaviour were verified.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from edgeconformer.artifacts import load_stabilized, run_paths
from edgeconformer.export.coreml import export_trained, write_report


def export(cfg: DictConfig) -> dict:
    paths = run_paths(cfg)
    module, _, options = load_stabilized(paths.model_dir)
    export_cfg = OmegaConf.to_container(cfg.export, resolve=True)
    report = export_trained(
        module, paths.package, export_cfg, stabilize=options, tokenizer_model=paths.model_dir / "tokenizer.model"
    )
    report["variant"], report["seed"] = paths.variant, paths.seed
    paths.report_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, paths.report_dir / "conversion.json")
    flagged = len(report["ane_fallback"]["ops"]) + len(report["ane_fallback"]["inputs"])
    print(
        f"export@{paths.name}: {paths.package} ({report['precision']}, {report['n_ops']} ops, "
        f"{report['weight_bytes'] / 1e6:.2f} MB of weights, {flagged} ops/inputs flagged as possible ANE "
        f"fallbacks, converted in {report['conversion_seconds']} s)"
    )
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}))
    return report
