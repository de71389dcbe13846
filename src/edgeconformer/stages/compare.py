"""Stage `compare`: every run's evaluation -> metrics/<variant>.json (mean +- sd over seeds, the per-seed figures)
and metrics/comparisons.json (paired differences with 95% bootstrap CIs over utterances and seeds, and a verdict).

Inputs, per run of `runs` (artifacts.chain_run): reports/runs/<variant>/s<seed>/evaluation.json (every figure of
the run) and utterances.jsonl (errors and reference words per utterance and precision mode). Every number of a
comparison is computed on the same utterances on both sides: the rows are matched by id, and a comparison whose
sides cover different utterances (the Core ML simulation runs on a subset) is made on the utterances both have,
with that n beside it.

A side is `<variant>/<mode>`: fp32, fp16, fp16_unstabilized (PyTorch), coreml_sim (the exported program,
simulated), fp32_first_pass (a cascade's streaming pass), and the stabilization arms with FP16 accumulation
emulated (stabilize.ablation: acc16_none, acc16_prenorm, acc16_lut, acc16_both, acc16_both_uncapped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from edgeconformer.artifacts import chain_run, variant_metrics_path, write_json_atomic
from edgeconformer.errors import UserError
from edgeconformer.files import read_jsonl
from edgeconformer.metrics import FIXED, HEADLINE, RATES, STABILIZATION_ARMS, RateStats, RunMetrics, VariantMetrics
from edgeconformer.stats import compare as paired
from edgeconformer.stats import mean_sd
from edgeconformer.wandb_report import log_chain

HEADLINE_DIR = "reports/headline"  # DVC metrics (git-tracked: .gitignore lets this folder of reports/ through)


@dataclass
class Run:
    variant: str
    seed: int
    evaluation: RunMetrics
    rows: list[dict] = field(repr=False)


def load_run(variant: str, seed: int, root=".") -> Run:
    """A run's evaluation.json (read into the schema's record, not validated: the report lists its problems) and
    utterances.jsonl."""
    paths = chain_run(variant, seed, root)
    try:
        evaluation = json.loads(paths.evaluation.read_text(encoding="utf-8"))
        rows = read_jsonl(paths.utterances)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename}: not found; run `dvc repro evaluate@{paths.name}` first") from None
    if not isinstance(evaluation, dict):
        raise UserError(
            f"{paths.evaluation}: expected a JSON object of metrics; re-run `dvc repro evaluate@{paths.name}`"
        )
    return Run(variant, int(seed), RunMetrics.parse(evaluation), rows)


def variant_summary(runs: list[Run]) -> VariantMetrics:
    """metrics/<variant>.json: headline mean/sd at the top (what `dvc metrics show` lists), every per-seed figure in
    `seeds` and every rate's mean/sd in `stats` (lists: DVC leaves them out of its tables)."""
    first = runs[0].evaluation
    stats, headline_keys = [], {}
    for key in RATES:
        values = [r.evaluation.get(key) for r in runs]
        mean, sd = mean_sd(values)
        if mean is None:
            continue
        stats.append(RateStats(metric=key, mean=mean, sd=sd, n=sum(v is not None for v in values)))
        if key in HEADLINE:
            headline_keys.update({f"{key}_mean": mean, f"{key}_sd": sd})
    rtf = [r.evaluation.get("rtf_cpu") for r in runs if r.evaluation.get("rtf_cpu") is not None]
    return VariantMetrics(
        variant=runs[0].variant,
        n_seeds=len(runs),
        n_utterances=first.get("n_utterances"),
        **headline_keys,
        **{key: first.get(key) for key in FIXED},
        rtf_cpu=float(np.median(rtf)) if rtf else None,  # median over seeds: timing noise, not a model effect
        stats=stats,
        seeds=[replace(r.evaluation, seed=r.seed) for r in runs],
    )


def headline(summary: dict, comparisons: list[dict], variant: str, base: str | None) -> dict:
    """reports/headline/<variant>.json, the only file DVC registers as metrics: a few short keys so that `dvc
    metrics show` and `dvc exp show --only-metrics` fit a 120-column terminal (one row per variant). Everything
    else is in metrics/<variant>.json and metrics/comparisons.json."""

    def r(v, digits):
        return None if v is None else round(float(v), digits)

    vs = next((c for c in comparisons if c["a"] == f"{variant}/fp32" and c["b"] == f"{base}/fp32"), None)
    return {
        "seeds": summary["n_seeds"],
        "wer": r(summary.get("wer_fp32_mean"), 2),
        "wer_sd": r(summary.get("wer_fp32_sd"), 2),
        "vs_base": r(vs["diff"], 2) if vs else None,
        "ci95": f"[{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}]" if vs else None,
        "gflops": r(summary.get("gflops_per_audio_second"), 3),
        "params_m": r(summary.get("params_millions"), 2),
        "rtf": r(summary.get("rtf_cpu"), 4),
    }


def side(runs: list[Run], mode: str, ids: list[str]) -> np.ndarray:
    """(k, n) errors of `mode` for every seed of a variant, on utterances `ids` in that order."""
    out = []
    for r in runs:
        by_id = {row["id"]: row for row in r.rows}
        out.append([by_id[i][mode]["errors"] for i in ids])
    return np.asarray(out, dtype=np.float64)


def common_ids(runs_a: list[Run], mode_a: str, runs_b: list[Run], mode_b: str) -> list[str]:
    """Utterance ids that every run of both sides has a `mode` row for, in the first run's order."""
    order = [row["id"] for row in runs_a[0].rows]
    have = set(order)
    for runs, mode in ((runs_a, mode_a), (runs_b, mode_b)):
        for r in runs:
            have &= {row["id"] for row in r.rows if isinstance(row.get(mode), dict)}
    return [i for i in order if i in have]


def comparison_specs(by_variant: dict[str, list[Run]], compared: list[str], c: DictConfig) -> list[tuple]:
    """(a_variant, a_mode, b_variant, b_mode) for every comparison the runs allow."""
    specs = []
    present = [v for v in compared if v in by_variant]
    for v in present[1:]:  # every compared variant against the first (dws - vanilla), in FP32 and FP16
        specs += [(v, "fp32", present[0], "fp32"), (v, "fp16", present[0], "fp16")]
    base = c.get("streaming_baseline")
    if base in by_variant:  # paper 2: each Practical Conformer change against its streaming baseline
        specs += [(v, "fp32", base, "fp32") for v in c.get("ablations", []) if v in by_variant and v != base]
    for v, runs in by_variant.items():
        modes = {k for row in runs[0].rows for k, val in row.items() if isinstance(val, dict)}
        specs += [(v, "fp16", v, "fp32"), (v, "fp16_unstabilized", v, "fp32")]
        if "coreml_sim" in modes:  # on its subset of utterances (common_ids), n beside it
            specs.append((v, "coreml_sim", v, "fp16"))
        arms = [a for a in STABILIZATION_ARMS if a in modes]
        specs += [(v, arm, v, "fp32") for arm in arms]
        if "fp32_first_pass" in modes:  # a cascade: second pass against its own streaming first pass
            specs.append((v, "fp32", v, "fp32_first_pass"))
        if {"acc16_both_uncapped", "acc16_both"} <= set(arms):
            specs.append((v, "acc16_both_uncapped", v, "acc16_both"))
    return specs


def run_comparison(by_variant, spec, c: DictConfig) -> dict:
    va, ma, vb, mb = spec
    ra, rb = by_variant[va], by_variant[vb]
    ids = common_ids(ra, ma, rb, mb)
    if not ids:
        raise UserError(f"{va}/{ma} vs {vb}/{mb}: no utterance has both; re-run their evaluate stages")
    words = np.asarray([{row["id"]: row for row in ra[0].rows}[i][ma]["ref_words"] for i in ids], dtype=np.float64)
    same_models = va == vb
    same_seeds = [r.seed for r in ra] == [r.seed for r in rb]
    result = paired(
        f"{va}/{ma}",
        f"{vb}/{mb}",
        "wer",
        side(ra, ma, ids),
        side(rb, mb, ids),
        words,
        paired_seeds=same_models or same_seeds,
        resamples=int(c.resamples),
        confidence=float(c.confidence),
        seed=int(c.seed),
    )
    d = result.to_dict()
    d["seeds"] = [[r.seed for r in ra], [r.seed for r in rb]]
    return d


def compare(cfg: DictConfig, root=".") -> dict:
    runs = [load_run(item.variant, item.seed, root) for item in cfg.runs.values()]
    if not runs:
        raise UserError("runs is empty: set `variants` and `seeds` (conf/config.yaml)")
    by_variant: dict[str, list[Run]] = {}
    for r in runs:
        by_variant.setdefault(r.variant, []).append(r)
    metrics_dir = Path(root) / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for variant, vruns in by_variant.items():
        summaries[variant] = variant_summary(vruns).to_dict()
        write_json_atomic(variant_metrics_path(variant, metrics_dir), summaries[variant])
    comparisons = [
        run_comparison(by_variant, spec, cfg.compare)
        for spec in comparison_specs(by_variant, list(cfg.get("compared") or []), cfg.compare)
    ]
    write_json_atomic(metrics_dir / "comparisons.json", comparisons)
    base = next((v for v in cfg.get("compared") or [] if v in by_variant), None)
    for variant, summary in summaries.items():
        write_json_atomic(Path(root) / HEADLINE_DIR / f"{variant}.json", headline(summary, comparisons, variant, base))
    print(format_comparisons(summaries, comparisons))
    lg = cfg.get("logger") or {}
    if lg.get("wandb"):  # one W&B run per seed grouped per variant, and the comparisons (offline by default)
        log_chain(
            summaries,
            comparisons,
            {"seeds": list(cfg.get("seeds") or []), "compared": list(cfg.compared)},
            project=lg.project,
            entity=lg.get("entity"),
            mode=lg.get("wandb_mode", "offline"),
        )
    return {"variants": summaries, "comparisons": comparisons}


def format_comparisons(summaries: dict, comparisons: list[dict]) -> str:
    lines = ["variant      seeds  WER fp32 % (mean +- sd)  WER fp16 %      WER fp16 unstab. %"]
    for v, s in summaries.items():

        def cell(key, s=s):
            mean, sd = s.get(f"{key}_mean"), s.get(f"{key}_sd")
            return "n/a" if mean is None else f"{mean:.2f}" + (f" +- {sd:.2f}" if sd is not None else "")

        lines.append(
            f"{v:<12} {s['n_seeds']:>5}  {cell('wer_fp32'):<24} {cell('wer_fp16'):<15} {cell('wer_fp16_unstabilized')}"
        )
    lines.append("paired differences (a - b, WER points, 95% CI over utterances and seeds):")
    for c in comparisons:
        lines.append(
            f"  {c['a']:<28} - {c['b']:<22} {c['diff']:+7.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
            f"  n={c['n_utterances']}  seeds={c['n_seeds']}  {c['verdict']}"
        )
    return "\n".join(lines)
