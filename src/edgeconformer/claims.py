"""The papers' claims against our metrics: docs/claims.yaml lists them (id, claim, the paper's number, a `check`),
and one rule per check here gives a status, our number and its CI. The table goes into reports/summary.md and,
through the results blocks (evidence.py), into README.md."""

from __future__ import annotations

from pathlib import Path

import yaml

from edgeconformer.errors import UserError
from edgeconformer.evidence import diff_cell, find, table

CLAIMS_FILE = Path(__file__).resolve().parents[2] / "docs" / "claims.yaml"
STATUSES = ("reproduced", "not reproduced", "inconclusive", "not measurable here", "not run")
# "Keeps accuracy" is a non-inferiority claim: a difference that is not distinguishable from 0 only says the run
# cannot tell. Reproduced when the whole 95% CI of the WER difference lies below this margin (WER points, about 3%
# relative at the default's 35% WER); not reproduced when the whole CI lies above it; inconclusive in between
# (more seeds narrow the interval).
MARGIN = 1.0


def load_claims(path: str | Path = CLAIMS_FILE) -> list[dict]:
    try:
        claims = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the claims list ({e})") from e
    need = ("id", "paper", "claim", "paper_value", "check")
    for i, c in enumerate(claims or []):
        missing = [k for k in need if k not in c]
        if missing:
            raise UserError(f"{path}: entry {i + 1} lacks {missing}")
        if c["check"] not in CHECKS:
            raise UserError(f"{path}: entry {c['id']!r} has check {c['check']!r}; known: {', '.join(CHECKS)}")
    return claims or []


def kept(c: dict, margin: float = MARGIN) -> str:
    """Non-inferiority of one comparison (a − b in WER points, lower is better) at `margin`."""
    lo, hi = c["ci95"]
    return "reproduced" if hi <= margin else "not reproduced" if lo > margin else "inconclusive"


def _all_kept(cs: list[dict]) -> str:
    statuses = [kept(c) for c in cs]
    return next((s for s in ("not reproduced", "inconclusive") if s in statuses), "reproduced")


def dws_flop_share(by, comps):
    v, d = by.get("vanilla"), by.get("dws")
    if not (v and d and v.get("flops_subsampling_share") and d.get("flops_subsampling_share") is not None):
        return "not run", "n/a"
    a, b = v["flops_subsampling_share"], d["flops_subsampling_share"]
    return ("reproduced" if b <= a / 2 else "not reproduced"), f"{a:.1%} -> {b:.1%} (counted, our size)"


def dws_wer(by, comps):
    c = find(comps, "dws/fp32", "vanilla/fp32")
    if not c:
        return "not run", "n/a"
    if min(by["dws"].get("n_seeds", 1), by["vanilla"].get("n_seeds", 1)) < 2:  # no seed variation measured
        return "inconclusive", f"DWS − vanilla {diff_cell(c)}, one seed per side: needs seeds"
    return kept(c), f"DWS − vanilla {diff_cell(c)}"


def _no_variant_worse(mode):
    """Every variant's `mode` − FP32 within the margin (kept)."""

    def check(by, comps):
        cs = [(v, c) for v in by if (c := find(comps, f"{v}/{mode}", f"{v}/fp32"))]
        if not cs:
            return "not run", "n/a"
        return _all_kept([c for _, c in cs]), "; ".join(f"{v} {diff_cell(c)}" for v, c in cs)

    return check


def prenorm_needed(by, comps):
    cells, verdicts = [], []
    for v in by:
        none, pre = find(comps, f"{v}/acc16_none", f"{v}/fp32"), find(comps, f"{v}/acc16_prenorm", f"{v}/fp32")
        if none and pre:
            # plain LayerNorm fails (distinguishably worse) and the pre-normalizer alone keeps FP32 accuracy
            verdicts.append(kept(pre) if none["verdict"] == "worse" else "not reproduced")
            cells.append(f"{v}: plain {diff_cell(none)}, pre-normalized {diff_cell(pre)}")
    if not cells:
        return "not run", "n/a"
    return next((s for s in ("not reproduced", "inconclusive") if s in verdicts), "reproduced"), "; ".join(cells)


def dws_range(by, comps):
    v, d = by.get("vanilla", {}).get("audit_frontend_peak"), by.get("dws", {}).get("audit_frontend_peak")
    if v is None or d is None:
        return "not run", "n/a"
    return ("reproduced" if d < v else "not reproduced"), f"front-end peak {v:.3g} -> {d:.3g} (FP32 audit)"


def _ablation(name):
    def check(by, comps):
        c = find(comps, f"{name}/fp32", "streaming/fp32")
        if not c:
            return "not run", f"add {name} and streaming to `variants`"
        return kept(c), f"{name} − streaming {diff_cell(c)}"

    return check


def cascade(by, comps):
    c = find(comps, "practical/fp32", "practical/fp32_first_pass")
    if not c:
        return "not run", "n/a"
    base = find(comps, "practical/fp32", "streaming/fp32")
    ok = c["verdict"] == "better" and (base is None or base["verdict"] != "worse")
    cell = f"second − first pass {diff_cell(c)}" + (
        f"; − streaming {diff_cell(base)}" if base else "; streaming baseline not run"
    )
    return ("reproduced" if ok and base else "not reproduced" if not ok else "not run"), cell


def not_measurable(by, comps):
    return "not measurable here", "n/a"


CHECKS = {
    "dws_flop_share": dws_flop_share,
    "dws_wer": dws_wer,
    "fp16_wer": _no_variant_worse("fp16"),
    "prenorm_needed": prenorm_needed,
    "lut_softmax": _no_variant_worse("acc16_both"),
    "dws_range": dws_range,
    "ablation_conv_only": _ablation("conv_only"),
    "ablation_performer": _ablation("performer"),
    "cascade": cascade,
    "not_measurable": not_measurable,
}


def claims_table(metrics: list[dict], comparisons: list[dict], claims: list[dict] | None = None) -> str:
    by = {str(m["variant"]): m for m in metrics}
    rows = []
    for c in load_claims() if claims is None else claims:
        status, ours = CHECKS[c["check"]](by, comparisons)
        rows.append([c["paper"], c["claim"], str(c["paper_value"]), ours, f"**{status}**"])
    return table(["paper", "claim", "paper's number", "ours (95% CI over utterances and seeds)", "status"], rows)
