"""Human-readable results: reports/summary.md and PNG plots from metrics/<variant>.json and the FP16 audits.

Inputs (edgeconformer.metrics is the schema, docs/evaluation.md describes it): metrics/<variant>.json, one per
evaluated variant, and optionally the first seed's reports/runs/<variant>/s<seed>/fp16_audit.json (per-module
records; read defensively: a missing or odd audit costs its section, not the report). Outputs, all written
atomically: the summary and, next to it in plots/, flop_shares.png, wer_vs_flops.png, rtf.png and fp16_audit.png
(a plot without data is skipped and the summary says so). Missing or null values print as "n/a".

    python -m edgeconformer.report [metrics_dir] [reports_dir]
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

from edgeconformer.claims import claims_table
from edgeconformer.config import REPO
from edgeconformer.errors import UserError
from edgeconformer.evidence import blocks, stale_blocks, update_docs
from edgeconformer.files import atomic_path, write_text_atomic
from edgeconformer.metrics import OPTIONAL as OPTIONAL  # re-exported: the notebook and tests read the schema here
from edgeconformer.metrics import SCHEMA as SCHEMA
from edgeconformer.metrics import is_count, is_number, problems

FP16_MAX = 65504.0
PAPER = {"vanilla_share": 0.328, "dws_share": 0.040, "watch_rtf": 0.19}  # Xu et al. 2023
ORDER = ("vanilla", "dws", "practical")  # shown first, the rest alphabetically


# ------------------------------------------------------------------------------------------------ schema
def validate_metrics(d) -> list[str]:
    """Problems of one run's metrics dict against the schema (edgeconformer.metrics; empty list: valid)."""
    return problems(d)


# ------------------------------------------------------------------------------------------------ reading
def _order(variant: str):
    return (ORDER.index(variant), "") if variant in ORDER else (len(ORDER), variant)


def variant_view(d: dict) -> dict:
    """One metrics/<variant>.json (the compare stage's: per-seed runs in `seeds`) -> the flat per-variant figures
    the tables and plots read: every per-seed number averaged over seeds (RTFs: the median; byte counts and
    FLOPs do not depend on the seed), nested objects from the first seed, `n_seeds`, and the summary's own keys.
    A single run's evaluation.json (no `seeds`, e.g. an ablation job's) is a variant of one seed."""
    seeds = d.get("seeds") if isinstance(d.get("seeds"), list) and d["seeds"] else None
    if seeds is None:
        return dict(d, n_seeds=d.get("n_seeds", 1), seeds=[d])
    view = dict(seeds[0])
    for key, first in seeds[0].items():
        values = [s.get(key) for s in seeds]
        if key != "seed" and is_number(first) and all(is_number(v) for v in values):
            view[key] = (
                sorted(values)[len(values) // 2]
                if key.startswith("rtf") and len(values) % 2
                else sum(values) / len(values)
            )
    view.update({k: v for k, v in d.items() if k != "seeds"})
    view["seeds"] = seeds
    return view


def _read_json(path: Path, kind: type, what: str, fix: str):
    """A JSON file holding a `kind` (dict or list); UserError naming the file and the fix otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); {fix}") from e
    if not isinstance(data, kind):
        raise UserError(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def load_comparisons(metrics_dir: str | Path) -> list[dict]:
    """metrics/comparisons.json (the compare stage's paired differences), [] when absent."""
    path = Path(metrics_dir) / "comparisons.json"
    if not path.exists():
        return []
    return _read_json(path, list, "a list of comparisons", "re-run `dvc repro compare`")


def load_metrics(metrics_dir: str | Path) -> list[dict]:
    """Every metrics/<variant>.json (variant_view of it), vanilla and dws first; a file without "variant" is named
    by its stem. Adds "_problems" (validate_metrics of every seed's figures) and "_path" to each dict."""
    metrics_dir = Path(metrics_dir)
    paths = sorted(p for p in metrics_dir.glob("*.json") if p.name != "comparisons.json")
    if not paths:
        raise UserError(f"{metrics_dir}: no metrics files (<variant>.json); run `dvc repro compare` first")
    out = []
    for path in paths:
        d = variant_view(
            _read_json(path, dict, "a JSON object of metrics", "re-run the evaluate stage for this variant")
        )
        d.setdefault("variant", path.stem)
        many = len(d["seeds"]) > 1
        d["_problems"] = [
            f"seed {s.get('seed')}: {p}" if many else p
            for s in d["seeds"]
            for p in validate_metrics(dict(s, variant=d["variant"]))
        ]
        d["_path"] = str(path)
        out.append(d)
    return sorted(out, key=lambda d: _order(str(d["variant"])))


def _record_values(name: str, rec: dict) -> dict | None:
    # One audit record -> {name, max_abs, sumsq_peak | None}; None when it has no usable peak.
    if not isinstance(rec, dict):
        return None
    peaks = [rec.get(k) for k in ("max_abs", "out_max_abs", "in_max_abs")]
    peaks = [v for v in peaks if is_number(v)]
    if not peaks:
        return None
    sumsq = rec.get("sumsq_peak", rec.get("ln_sumsq_peak"))
    return {
        "name": str(rec.get("name", rec.get("module", name))),
        "max_abs": max(peaks),
        "sumsq_peak": sumsq if is_number(sumsq) else None,
    }


def _records(obj) -> list[dict] | None:
    # A container of records: {"modules": ...}, {name: record} or [record, ...]; None when obj is none of these.
    if isinstance(obj, dict) and isinstance(obj.get("modules"), (dict, list)):
        obj = obj["modules"]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    recs = [r for r in (_record_values(str(k), v) for k, v in items) if r is not None]
    return recs or None


def read_audit(path: str | Path) -> tuple[dict[str, list[dict]], str | None]:
    """An fp16_audit.json -> ({stage: [records]}, problem or None). A single audit is stage ""; an object of
    audits (e.g. {"unstabilized": ..., "stabilized": ...}) gives one stage per key. Parent modules repeat their
    last child's output, so only leaf modules are kept."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, json.JSONDecodeError) as e:
        return {}, f"{path}: unreadable ({e})"
    single = _records(obj)
    if single is not None:
        stages = {"": single}
    elif isinstance(obj, dict):
        stages = {str(k): r for k, r in ((k, _records(v)) for k, v in obj.items()) if r is not None}
    else:
        stages = {}
    if not stages:
        return {}, f"{path}: no per-module records with a max_abs peak"
    for stage, recs in stages.items():
        names = [r["name"] for r in recs]
        stages[stage] = [
            r for r in recs if not any(n.startswith(r["name"] + ".") for n in names) and r["name"] not in ("", "<root>")
        ]
    return stages, None


def audit_path(reports_dir: str | Path, variant: str, seed=None) -> Path:
    """A variant's FP16 audit: the DVC chain's reports/runs/<variant>/s<seed>/fp16_audit.json (its first seed), or
    reports/<variant>/fp16_audit.json (a folder of single runs)."""
    chain = Path(reports_dir) / "runs" / variant / f"s{seed}" / "fp16_audit.json"
    return chain if seed is not None and chain.exists() else Path(reports_dir) / variant / "fp16_audit.json"


def load_audits(reports_dir: str | Path, variants: list[str], seeds: dict | None = None) -> tuple[dict, list[str]]:
    """{variant: {stage: [records]}} for the variants that have an FP16 audit (audit_path), and problems."""
    audits, problems = {}, []
    for v in variants:
        stages, problem = read_audit(audit_path(reports_dir, v, (seeds or {}).get(v)))
        if problem:
            problems.append(problem)
        if stages:
            audits[v] = stages
    return audits, problems


# ------------------------------------------------------------------------------------------------ tables
def fmt(value, kind: str = "num") -> str:
    """A cell: "n/a" for missing/null/non-finite, else by kind (wer, rtf, share, gflops, params, num)."""
    if not is_number(value):
        return "n/a"
    if kind == "wer":
        return f"{value:.2f}"
    if kind == "rtf":
        return f"{value:.3g}"
    if kind == "share":
        return f"{100 * value:.1f}%"
    if kind == "delta":
        return f"{value:+.2f}"
    if kind == "gflops":
        return f"{value:.3f}"
    if kind == "params":
        return f"{value:.2f}"
    if kind == "bytes":
        return f"{int(value):,}"
    return f"{value:g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def sim_n(m: dict) -> str:
    # " (30)" when the Core ML simulation ran on fewer utterances than the other columns
    n = (m.get("coreml_sim") or {}).get("utterances") if isinstance(m.get("coreml_sim"), dict) else None
    return f" ({n})" if isinstance(n, int) and n != m.get("n_utterances") else ""


def state_cell(state) -> str:
    """attention_state_bytes -> "1,147,392 + 589,824 pos. @ 10 s" (key/value caches or Performer sums, plus the
    projected relative positions when there are any); "n/a" when missing."""
    if not isinstance(state, dict) or not is_count(state.get("attention")):
        return "n/a"
    cell = fmt(state["attention"], "bytes")
    if is_count(state.get("positions")) and state["positions"]:
        cell += f" + {fmt(state['positions'], 'bytes')} pos."
    return cell + (f" @ {state['seconds']:g} s" if is_number(state.get("seconds")) else "")


def ablation_table(metrics: list[dict]) -> str:
    """Markdown: one row per variant, WER per precision, RTFs, FLOPs, params, then the Practical-Conformer
    columns: GFLOPs of the streamed part, the attention state a streaming step reads, and a cascade's first pass
    alone (WER fp32, CPU RTF; n/a without a cascade)."""
    header = [
        "variant",
        "WER fp32 %",
        "WER fp16 %",
        "WER fp16 unstab. %",
        "WER Core ML-sim % (n)",
        "WER Core ML %",
        "CER fp32 %",
        "RTF cpu",
        "RTF Core ML",
        "RTF device (est.)",
        "subsampling FLOP share",
        "GFLOPs / audio s",
        "params (M)",
        "GFLOPs / audio s streamed",
        "attention state B / step",
        "WER fp32 % first pass",
        "RTF cpu first pass",
    ]
    rows = []
    for m in metrics:
        device = f" ({m['device']})" if m.get("device") and is_number(m.get("rtf_device_estimate")) else ""
        rows.append(
            [
                str(m["variant"]),
                fmt(m.get("wer_fp32"), "wer"),
                fmt(m.get("wer_fp16"), "wer"),
                fmt(m.get("wer_fp16_unstabilized"), "wer"),
                fmt(m.get("wer_coreml_sim"), "wer") + sim_n(m),
                fmt(m.get("wer_coreml"), "wer"),
                fmt(m.get("cer_fp32"), "wer"),
                fmt(m.get("rtf_cpu"), "rtf"),
                fmt(m.get("rtf_coreml"), "rtf"),
                fmt(m.get("rtf_device_estimate"), "rtf") + device,
                fmt(m.get("flops_subsampling_share"), "share"),
                fmt(m.get("gflops_per_audio_second"), "gflops"),
                fmt(m.get("params_millions"), "params"),
                fmt(m.get("gflops_per_audio_second_streamed"), "gflops"),
                state_cell(m.get("attention_state_bytes")),
                fmt(m.get("wer_first_pass_fp32"), "wer"),
                fmt(m.get("rtf_cpu_first_pass"), "rtf"),
            ]
        )
    return markdown_table(header, rows)


def device_table(metrics: list[dict]) -> str | None:
    """Markdown: variant x device estimated RTF, or None when no variant has estimates."""
    estimates = {
        str(m["variant"]): m["rtf_device_estimates"] for m in metrics if isinstance(m.get("rtf_device_estimates"), dict)
    }
    devices = []
    for per_device in estimates.values():
        devices += [d for d in per_device if d not in devices]
    if not devices:
        return None
    rows = [[v] + [fmt(per_device.get(d), "rtf") for d in devices] for v, per_device in estimates.items()]
    return markdown_table(["variant"] + devices, rows)


def _diff(a, b):
    return a - b if is_number(a) and is_number(b) else None


def claims(metrics: list[dict]) -> list[str]:
    """Bullet lines comparing the measured figures with what Xu et al. 2023 report."""
    by = {m["variant"]: m for m in metrics}
    lines = []
    v, d = by.get("vanilla", {}), by.get("dws", {})
    lines.append(
        f"- Subsampling share of FLOPs: vanilla {fmt(v.get('flops_subsampling_share'), 'share')} "
        f"(paper {PAPER['vanilla_share']:.1%}), DWS {fmt(d.get('flops_subsampling_share'), 'share')} "
        f"(paper {PAPER['dws_share']:.1%})."
    )
    if v and d:
        lines.append(
            f"- DWS - vanilla WER (fp32): {fmt(_diff(d.get('wer_fp32'), v.get('wer_fp32')), 'delta')} "
            "points (paper: accuracy unchanged)."
        )
    for m in metrics:
        base = m.get("wer_fp32")
        line = (
            f"- {m['variant']}: FP16 - FP32 WER {fmt(_diff(m.get('wer_fp16'), base), 'delta')} points, "
            f"unstabilized FP16 - FP32 {fmt(_diff(m.get('wer_fp16_unstabilized'), base), 'delta')} points"
        )
        sim = m.get("coreml_sim") if isinstance(m.get("coreml_sim"), dict) else {}
        if is_number(sim.get("wer_pytorch_fp16_same_utterances")):
            # The program simulator may run on a subset: compare it with PyTorch FP16 on the same utterances.
            line += (
                f", Core ML-sim - PyTorch FP16 on the same {sim.get('utterances')} utterances "
                f"{fmt(_diff(m.get('wer_coreml_sim'), sim['wer_pytorch_fp16_same_utterances']), 'delta')} "
                f"points ({sim.get('identical_transcripts')} identical transcripts)"
            )
        else:
            line += f", Core ML-sim - FP32 {fmt(_diff(m.get('wer_coreml_sim'), base), 'delta')} points"
        lines.append(line + ".")
    watch = [
        (m["variant"], (m.get("rtf_device_estimates") or {}).get("apple-watch-s7"))
        for m in metrics
        if isinstance(m.get("rtf_device_estimates"), dict)
    ]
    watch = [(name, r) for name, r in watch if is_number(r)]
    if watch:
        lines.append(
            "- Apple Watch Series 7 RTF: paper measured {}; our estimate {} (an idealised lower bound for "
            "the counted graph, see docs/evaluation.md).".format(
                PAPER["watch_rtf"], ", ".join(f"{n} {fmt(r, 'rtf')}" for n, r in watch)
            )
        )
    return lines


def audit_table(audits: dict) -> str | None:
    rows = []
    for variant, stages in audits.items():
        for stage, recs in stages.items():
            norms = [r["sumsq_peak"] for r in recs if r["sumsq_peak"] is not None]
            worst = max(recs, key=lambda r: r["max_abs"])
            rows.append(
                [
                    variant,
                    stage or "-",
                    str(len(recs)),
                    f"{worst['max_abs']:.4g} ({worst['name']})",
                    str(sum(r["max_abs"] > FP16_MAX for r in recs)),
                    f"{max(norms):.4g}" if norms else "n/a",
                    str(sum(s > FP16_MAX for s in norms)) if norms else "n/a",
                ]
            )
    if not rows:
        return None
    return markdown_table(
        [
            "variant",
            "stage",
            "modules",
            "max abs (module)",
            "modules > 65504",
            "max LayerNorm sum of squares",
            "LayerNorms > 65504",
        ],
        rows,
    )


# ------------------------------------------------------------------------------------------------ plots
def _figure(width=7.0, height=4.0):
    # A bare Figure (no pyplot): no global state, rendered by the Agg canvas whatever the backend.

    return Figure(figsize=(width, height), dpi=110)


def fig_flop_shares(metrics: list[dict]):
    """Grouped bars: FLOP share per module group, one bar per variant. None without flops_shares."""
    have = [m for m in metrics if isinstance(m.get("flops_shares"), dict) and m["flops_shares"]]
    if not have:
        return None
    parts = []
    for m in have:
        parts += [p for p in m["flops_shares"] if p not in parts]
    fig = _figure(8, 4)
    ax = fig.subplots()
    width = 0.8 / len(have)
    for i, m in enumerate(have):
        ys = [100 * m["flops_shares"].get(p, 0.0) if is_number(m["flops_shares"].get(p)) else 0.0 for p in parts]
        ax.bar([j + i * width for j in range(len(parts))], ys, width, label=str(m["variant"]))
    ax.set_xticks([j + width * (len(have) - 1) / 2 for j in range(len(parts))])
    ax.set_xticklabels(parts, rotation=30, ha="right")
    ax.set_ylabel("share of FLOPs (%)")
    ax.set_title("FLOP share by module group")
    ax.legend()
    fig.tight_layout()
    return fig


def fig_wer_vs_flops(metrics: list[dict]):
    """Scatter: WER (fp32 and fp16) against GFLOPs per audio second, one point per variant."""
    pts = [
        m
        for m in metrics
        if is_number(m.get("gflops_per_audio_second"))
        and (is_number(m.get("wer_fp32")) or is_number(m.get("wer_fp16")))
    ]
    if not pts:
        return None
    fig = _figure()
    ax = fig.subplots()
    for key, marker in (("wer_fp32", "o"), ("wer_fp16", "x")):
        xs = [m["gflops_per_audio_second"] for m in pts if is_number(m.get(key))]
        ys = [m[key] for m in pts if is_number(m.get(key))]
        if xs:
            ax.scatter(xs, ys, marker=marker, label=key.replace("wer_", "WER "))
    for m in pts:
        y = m.get("wer_fp32") if is_number(m.get("wer_fp32")) else m.get("wer_fp16")
        ax.annotate(str(m["variant"]), (m["gflops_per_audio_second"], y), textcoords="offset points", xytext=(5, 5))
    ax.margins(x=0.2, y=0.15)  # room for the variant labels
    ax.set_xlabel("GFLOPs per audio second")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER vs compute")
    ax.legend()
    fig.tight_layout()
    return fig


def fig_rtf(metrics: list[dict]):
    """Grouped bars (log scale): measured CPU RTF, Core ML RTF and the device estimate per variant."""
    keys = [
        ("rtf_cpu", "CPU (measured)"),
        ("rtf_cpu_first_pass", "CPU first pass (measured)"),
        ("rtf_coreml", "Core ML (measured)"),
        ("rtf_device_estimate", "device (estimate)"),
    ]
    keys = [(k, label) for k, label in keys if any(is_number(m.get(k)) for m in metrics)]
    if not keys:
        return None
    fig = _figure()
    ax = fig.subplots()
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        xs = [j + i * width for j, m in enumerate(metrics) if is_number(m.get(k))]
        ys = [m[k] for m in metrics if is_number(m.get(k))]
        ax.bar(xs, ys, width, label=label)
    ax.axhline(1.0, color="red", linestyle="--", label="real time (RTF 1)")
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([str(m["variant"]) for m in metrics])
    ax.set_ylabel("real-time factor (lower is faster)")
    ax.set_title("RTF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_comparisons(comparisons: list[dict]):
    """Forest plot: every paired difference (a - b, WER points) with its 95% CI; None without comparisons."""
    have = [c for c in comparisons if is_number(c.get("diff")) and len(c.get("ci95") or []) == 2]
    if not have:
        return None
    fig = _figure(8, 0.35 * len(have) + 1.2)
    ax = fig.subplots()
    ys = list(range(len(have)))[::-1]
    colors = {"better": "tab:green", "worse": "tab:red"}
    for y, c in zip(ys, have):
        lo, hi = c["ci95"]
        ax.errorbar(
            [c["diff"]],
            [y],
            xerr=[[c["diff"] - lo], [hi - c["diff"]]],
            fmt="o",
            capsize=3,
            color=colors.get(c.get("verdict"), "tab:gray"),
        )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(
        [f"{c['a']} − {c['b']} (n={c.get('n_utterances')}, seeds={c.get('n_seeds')})" for c in have], fontsize=7
    )
    ax.set_xlabel("WER difference, points (95% CI over utterances and seeds)")
    ax.set_title("Paired comparisons (green: a better, red: a worse, gray: not distinguishable)")
    fig.tight_layout()
    return fig


def fig_fp16_audit(audits: dict):
    """Per variant: max |activation| per leaf module (log scale) for each audit stage, LayerNorm sum-of-squares
    peaks as markers, the FP16 maximum as a line. None without audits."""
    if not audits:
        return None
    fig = _figure(9, 3.2 * len(audits))
    axes = fig.subplots(len(audits), 1, squeeze=False)[:, 0]
    for ax, (variant, stages) in zip(axes, audits.items()):
        for stage, recs in stages.items():
            label = f"{stage} " if stage else ""
            ax.plot(
                range(len(recs)),
                [max(r["max_abs"], 1e-12) for r in recs],
                marker=".",
                linewidth=0.8,
                label=f"{label}max |x|",
            )
            norms = [(i, r["sumsq_peak"]) for i, r in enumerate(recs) if r["sumsq_peak"] is not None]
            if norms:
                ax.scatter(
                    [i for i, _ in norms],
                    [max(s, 1e-12) for _, s in norms],
                    marker="^",
                    s=18,
                    label=f"{label}LayerNorm sum of squares",
                )
        ax.axhline(FP16_MAX, color="red", linestyle="--", label="FP16 max 65504")
        ax.set_yscale("log")
        ax.set_title(f"{variant}: FP16 range audit (leaf modules in execution order)")
        ax.set_xlabel("module index")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ writing
def save_figure(fig, path: str | Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _machine_lines(metrics: list[dict]) -> list[str]:
    lines = []
    for m in metrics:
        mach = m.get("machine") if isinstance(m.get("machine"), dict) else {}
        lines.append(
            f"- {m['variant']}: {fmt(m.get('n_utterances'))} utterances, "
            f"{fmt(m.get('audio_hours'))} h of audio; CPU {mach.get('cpu_model', 'n/a')}, "
            f"{mach.get('torch_threads', 'n/a')} torch thread(s), torch {mach.get('torch_version', 'n/a')}, "
            f"Python {mach.get('python_version', 'n/a')}, {mach.get('platform', 'n/a')}"
        )
    return lines


def write_plot_data(metrics: list[dict], folder: str | Path) -> dict[str, Path]:
    """CSV files for `dvc plots show` (dvc.yaml `plots:`): FLOP share per variant and part, WER vs GFLOPs per
    variant and precision, RTF per variant and where it was measured or estimated. Written atomically."""

    def table(rows, header):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    shares, wer, rtf = [], [], []
    for m in metrics:
        v = str(m["variant"])
        for part, share in (m.get("flops_shares") or {}).items():
            shares.append({"label": f"{v}/{part}", "variant": v, "part": part, "share": share})
        for key in ("wer_fp32", "wer_fp16", "wer_fp16_unstabilized", "wer_coreml_sim", "wer_coreml"):
            if is_number(m.get(key)) and is_number(m.get("gflops_per_audio_second")):
                wer.append(
                    {
                        "variant": v,
                        "precision": key[4:],
                        "gflops_per_audio_second": m["gflops_per_audio_second"],
                        "wer": m[key],
                    }
                )
        for where, value in [
            ("cpu", m.get("rtf_cpu")),
            ("cpu first pass", m.get("rtf_cpu_first_pass")),
            ("coreml", m.get("rtf_coreml")),
        ] + [(f"{d} (estimate)", r) for d, r in (m.get("rtf_device_estimates") or {}).items()]:
            if is_number(value):
                rtf.append({"label": f"{v}/{where}", "variant": v, "where": where, "rtf": value})
    folder = Path(folder)
    files = {
        "flop_shares": (shares, ["label", "variant", "part", "share"]),
        "wer_vs_flops": (wer, ["variant", "precision", "gflops_per_audio_second", "wer"]),
        "rtf": (rtf, ["label", "variant", "where", "rtf"]),
    }
    return {
        name: write_text_atomic(folder / f"{name}.csv", table(rows, header)) for name, (rows, header) in files.items()
    }


def generated_blocks(metrics: list[dict], comparisons: list[dict]) -> dict[str, str]:
    """The results blocks of the docs and README (evidence.blocks), claims table included."""

    return blocks(metrics, comparisons, claims_table(metrics, comparisons))


def _image(plots: dict, name: str, title: str, out_md: Path) -> str:
    # A plot's markdown image, relative to the summary; a note when the plot had no data.
    if name not in plots:
        return f"*{title}: no data.*"
    return f"![{title}]({os.path.relpath(plots[name], out_md.parent)})"


def _decisive_sections(metrics: list[dict], generated: dict, metrics_dir) -> list[str]:
    # The summary's opening: what it reads, then the tables that decide (also the docs' results blocks).
    variants = ", ".join(str(m["variant"]) for m in metrics)
    return [
        "# edgeconformer results",
        "",
        f"From {len(metrics)} metrics file(s) in `{metrics_dir}` ({variants}). WER/CER in percent; "
        "RTF = compute seconds / audio seconds (lower is faster); n/a = not measured here (Core ML needs "
        "macOS) or not present in the metrics. A difference is a minus b in WER points with its 95% CI from a "
        "bootstrap over test utterances (paired) and seeds; n.d. = not distinguishable at this budget.",
        "",
        "## Headline",
        "",
        generated["headline"],
        "",
        "## FP16 against FP32 (same models, same utterances)",
        "",
        generated["fp16"],
        "",
        "## Stabilization ablation (FP16 accumulation emulated, whole test split)",
        "",
        generated["stabilization"],
        "",
        "## Practical Conformer ablations against paper 2's streaming baseline",
        "",
        generated["practical"],
        "",
        "## The papers' claims",
        "",
        generated["claims"],
        "",
        "## Ablation: all figures (means over seeds)",
        "",
        ablation_table(metrics),
        "",
    ]


def _detail_sections(metrics: list[dict], audits: dict, plots: dict, out_md: Path, reports_dir) -> list[str]:
    # Device estimates, the paper's single figures, the FP16 audit, the plots and the measurement setup.
    table = device_table(metrics)
    md = [
        "## Device RTF estimates (idealised roofline, not measurements; kept out of the tables above)",
        "",
        table if table else "*No device estimates in the metrics.*",
        "",
        "Per-op roofline from counted FLOPs and bytes against published or estimated device figures "
        "(src/edgeconformer/evaluate/devices/*.yaml). It is 40-300x below the paper's measured 0.19 RTF on an "
        "Apple Watch Series 7 and is not anchored to any measurement, so no claim rests on it "
        "(docs/evaluation.md).",
        "",
    ]
    md += ["## Against the paper (Xu et al. 2023), single figures", ""] + claims(metrics) + [""]
    table = audit_table(audits)
    md += [
        "## FP16 range audit",
        "",
        table if table else f"*No FP16 audits found in `{reports_dir}/<variant>/fp16_audit.json`.*",
        "",
    ]
    images = (
        ("comparisons", "Paired comparisons with 95% CIs"),
        ("flop_shares", "FLOP share by module group"),
        ("wer_vs_flops", "WER vs GFLOPs per audio second"),
        ("rtf", "RTF"),
        ("fp16_audit", "FP16 audit"),
    )
    md += ["## Plots", ""] + [line for name, title in images for line in (_image(plots, name, title, out_md), "")]
    return md + ["## Measurement setup", ""] + _machine_lines(metrics) + [""]


def _problem_section(by_variant: dict, audit_problems: list[str]) -> list[str]:
    if not (by_variant or audit_problems):
        return []
    return (
        ["## Problems found in the inputs", ""]
        + [f"- `{v}`: {p}" for v, ps in by_variant.items() for p in ps]
        + [f"- {p}" for p in audit_problems]
        + [""]
    )


def build_report(
    metrics_dir: str | Path = "metrics",
    reports_dir: str | Path = "reports",
    out_md: str | Path = "reports/summary.md",
    plots_dir: str | Path | None = None,
    docs_root: str | Path | None = None,
) -> dict:
    """Reads every metrics/<variant>.json, metrics/comparisons.json and the FP16 audits; writes `out_md` and the
    plots (default: a plots/ folder next to it); with `docs_root`, rewrites the results blocks of its README and
    docs (evidence.update_docs). Returns {"summary", "plots": {name: path}, "variants", "problems", "docs"}."""

    out_md = Path(out_md)
    plots_dir = Path(plots_dir) if plots_dir is not None else out_md.parent / "plots"
    metrics = load_metrics(metrics_dir)
    comparisons = load_comparisons(metrics_dir)
    variants = [str(m["variant"]) for m in metrics]
    audits, audit_problems = load_audits(
        reports_dir, variants, {str(m["variant"]): m["seeds"][0].get("seed") for m in metrics}
    )
    generated = generated_blocks(metrics, comparisons)

    figures = {
        "flop_shares": fig_flop_shares(metrics),
        "wer_vs_flops": fig_wer_vs_flops(metrics),
        "rtf": fig_rtf(metrics),
        "fp16_audit": fig_fp16_audit(audits),
        "comparisons": fig_comparisons(comparisons),
    }
    plots = {name: save_figure(fig, plots_dir / f"{name}.png") for name, fig in figures.items() if fig is not None}
    write_plot_data(metrics, out_md.parent / "plot_data")

    found = {m["variant"]: m["_problems"] for m in metrics if m["_problems"]}
    md = (
        _decisive_sections(metrics, generated, metrics_dir)
        + _detail_sections(metrics, audits, plots, out_md, reports_dir)
        + _problem_section(found, audit_problems)
    )
    write_text_atomic(out_md, "\n".join(md))
    docs = update_docs(Path(docs_root), generated) if docs_root is not None else []
    return {
        "summary": out_md,
        "plots": plots,
        "variants": variants,
        "docs": docs,
        "problems": {**found, **({"audits": audit_problems} if audit_problems else {})},
    }


def main(argv: list[str] | None = None) -> int:
    """python -m edgeconformer.report [metrics_dir] [reports_dir] [--docs | --check-docs]: the summary and plots;
    --docs also rewrites the results blocks of README.md and docs/*.md (as the report stage does); --check-docs
    only says which blocks differ from what the metrics generate (exit 1 when any do)."""

    args = sys.argv[1:] if argv is None else argv
    flags = {a for a in args if a.startswith("--")}
    args = [a for a in args if not a.startswith("--")]
    metrics_dir = args[0] if args else "metrics"
    reports_dir = args[1] if len(args) > 1 else "reports"
    try:
        if "--check-docs" in flags:
            stale = stale_blocks(REPO, generated_blocks(load_metrics(metrics_dir), load_comparisons(metrics_dir)))
            for name in stale:
                print(
                    f"{name}: results blocks differ from {metrics_dir}; run `python -m edgeconformer.report "
                    "--docs` (or `dvc repro report`)",
                    file=sys.stderr,
                )
            return 1 if stale else 0
        result = build_report(
            metrics_dir, reports_dir, Path(reports_dir) / "summary.md", docs_root=REPO if "--docs" in flags else None
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {result['summary']} and {len(result['plots'])} plot(s)"
        + (
            f"; results blocks updated in {', '.join(result['docs']) or 'no file (already current)'}"
            if "--docs" in flags
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
