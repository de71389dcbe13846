"""The tables that decide: headline (mean +- sd over seeds, paired CIs), FP16 deltas, the isolated stabilization
ablation, paper 2's ablations against their streaming baseline; and the generated blocks of README/docs.

Every number comes from metrics/<variant>.json (report.variant_view) and metrics/comparisons.json (the compare
stage). Documentation tables sit between markers and are rewritten by the report stage:

    <!-- results:headline -->
    ...generated...
    <!-- /results:headline -->

`python -m edgeconformer.report --check-docs` (and a test) fails when a committed block differs from what the
committed metrics generate, so no table in the docs can go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeconformer.files import write_text_atomic

BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
DOC_FILES = ("README.md", "docs/training.md", "docs/practical.md", "docs/stabilization.md", "docs/evaluation.md")
ARMS = {
    "acc16_none": "none (plain LayerNorm, exact softmax)",
    "acc16_prenorm": "pre-normalized LayerNorm only",
    "acc16_lut": "LUT softmax only",
    "acc16_both": "both (the stabilized graph)",
    "acc16_both_uncapped": "both, re-scaling uncapped (k from the row's range)",
}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def mean_sd_cell(m: dict, key: str) -> str:
    mean, sd = m.get(f"{key}_mean"), m.get(f"{key}_sd")
    if not _num(mean):  # a single run's file: the value itself
        mean = m.get(key)
    if not _num(mean):
        return "n/a"
    return f"{mean:.2f} ± {sd:.2f}" if _num(sd) else f"{mean:.2f}"


def find(comparisons: list[dict], a: str, b: str) -> dict | None:
    return next((c for c in comparisons if c.get("a") == a and c.get("b") == b), None)


def diff_cell(c: dict | None, with_n: bool = False) -> str:
    """ "+1.23 [+0.40, +2.10] worse" (percentage points, 95% CI over utterances and seeds)."""
    if not c:
        return "n/a"
    lo, hi = c["ci95"]
    verdict = {"not distinguishable at this budget": "n.d."}.get(c["verdict"], c["verdict"])
    cell = f"{c['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}] {verdict}"
    return cell + (f" (n={c['n_utterances']})" if with_n else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def headline_table(metrics: list[dict], comparisons: list[dict], base: str = "vanilla") -> str:
    rows = []
    for m in metrics:
        v = str(m["variant"])
        vs = "(baseline)" if v == base else diff_cell(find(comparisons, f"{v}/fp32", f"{base}/fp32"))
        rows.append(
            [
                v,
                str(m.get("n_seeds", 1)),
                mean_sd_cell(m, "wer_fp32"),
                mean_sd_cell(m, "wer_fp16"),
                vs,
                f"{m['gflops_per_audio_second']:.3f}" if _num(m.get("gflops_per_audio_second")) else "n/a",
                f"{m['params_millions']:.2f}" if _num(m.get("params_millions")) else "n/a",
                f"{m['rtf_cpu']:.4f}" if _num(m.get("rtf_cpu")) else "n/a",
            ]
        )
    return table(
        [
            "variant",
            "seeds",
            "WER fp32 % (mean ± sd)",
            "WER fp16 %",
            f"fp32 − {base} [95% CI]",
            "GFLOPs / audio s",
            "params M",
            "RTF cpu",
        ],
        rows,
    )


def fp16_table(metrics: list[dict], comparisons: list[dict]) -> str:
    rows = []
    for m in metrics:
        v = str(m["variant"])
        rows.append(
            [
                v,
                str(m.get("n_seeds", 1)),
                diff_cell(find(comparisons, f"{v}/fp16", f"{v}/fp32")),
                diff_cell(find(comparisons, f"{v}/fp16_unstabilized", f"{v}/fp32")),
                diff_cell(find(comparisons, f"{v}/coreml_sim", f"{v}/fp16"), with_n=True),
            ]
        )
    return table(
        ["variant", "seeds", "FP16 − FP32", "FP16 unstabilized − FP32", "Core ML-sim − PyTorch FP16 (its subset)"], rows
    )


def stabilization_table(metrics: list[dict], comparisons: list[dict]) -> str:
    rows = []
    for m in metrics:
        v = str(m["variant"])
        stats = {s["metric"]: s for s in m.get("stats", []) if isinstance(s, dict)}
        for arm, label in ARMS.items():
            c = find(comparisons, f"{v}/{arm}", f"{v}/fp32")
            if not c:
                continue
            s = stats.get(f"wer_{arm}", {})
            wer = (f"{s['mean']:.2f}" + (f" ± {s['sd']:.2f}" if _num(s.get("sd")) else "")) if s else "n/a"
            rows.append([v, label, wer, diff_cell(c)])
    if not rows:
        return "*No stabilization ablation in the metrics (stabilize.ablation.enabled=false).*"
    return table(["variant", "arm (FP16 accumulation emulated)", "WER %", "arm − FP32 [95% CI]"], rows)


def dependence(metrics: list[dict], comparisons: list[dict]) -> list[str]:
    """One generated sentence per variant: which component the FP16 result depends on."""
    lines = []
    for m in metrics:
        v = str(m["variant"])
        got = {arm: find(comparisons, f"{v}/{arm}", f"{v}/fp32") for arm in ARMS}
        if not all(got[a] for a in ("acc16_none", "acc16_prenorm", "acc16_lut", "acc16_both")):
            continue
        ok = {a: c["verdict"] != "worse" for a, c in got.items() if c}
        if ok["acc16_none"]:
            why = "the unstabilized graph already matches FP32 under FP16 accumulation: neither component is needed"
        elif ok["acc16_prenorm"] and not ok["acc16_lut"]:
            why = "it depends on the pre-normalized LayerNorm; the LUT softmax alone does not recover FP32"
        elif ok["acc16_lut"] and not ok["acc16_prenorm"]:
            why = "it depends on the LUT softmax; the pre-normalizer alone does not recover FP32"
        elif ok["acc16_prenorm"] and ok["acc16_lut"]:
            why = "either component alone recovers FP32"
        elif ok["acc16_both"]:
            why = "it needs both components together"
        else:
            why = "no arm recovers FP32"
        lines.append(
            f"- {v}: {why} (verdicts of arm − FP32 over {got['acc16_none']['n_seeds']} seed(s) and "
            f"{got['acc16_none']['n_utterances']} utterances)."
        )
    return lines


def softmax_k_lines(metrics: list[dict]) -> list[str]:
    lines = []
    for m in metrics:
        k = m.get("softmax_k")
        if not isinstance(k, dict) or not k.get("rows"):
            continue
        share = k["rows_needing_rescaling"] / k["rows"]
        dist = ", ".join(f"k={key}: {n:,}" for key, n in k["uncapped"].items())
        seed = (m.get("seeds") or [m])[0].get("seed", "n/a")  # the k counts are the first seed's
        lines.append(
            f"- {m['variant']} (seed {seed}): {k['rows']:,} attention rows; the row's range "
            f"exceeds R={k['range']:g} in {share:.2%} of them (uncapped k: {dist}); the capped rule "
            f"(max_squarings={k['setting']}) allows k <= {k['cap']}."
        )
    return lines


def practical_table(metrics: list[dict], comparisons: list[dict], base: str = "streaming") -> str | None:
    rows = [
        [c["a"].split("/")[0], str(c["n_seeds"]), diff_cell(c)]
        for c in comparisons
        if c.get("b") == f"{base}/fp32" and c.get("a", "").endswith("/fp32")
    ]
    if not rows:
        return None
    return table(["variant", "seeds", f"WER fp32 − {base} [95% CI]"], rows)


def blocks(metrics: list[dict], comparisons: list[dict], claims_table: str) -> dict[str, str]:
    """name -> markdown of every generated documentation block."""
    practical = practical_table(metrics, comparisons)
    return {
        "headline": headline_table(metrics, comparisons),
        "fp16": fp16_table(metrics, comparisons),
        "stabilization": "\n".join(
            [stabilization_table(metrics, comparisons), ""]
            + dependence(metrics, comparisons)
            + softmax_k_lines(metrics)
        ).rstrip(),
        "practical": practical
        or (
            "*paper 2's streaming baseline was not run: `dvc exp run -S "
            "'variants=[vanilla,dws,practical,streaming,conv_only,downsized,performer]'`*"
        ),
        "claims": claims_table,
    }


def fill(text: str, generated: dict[str, str], where: str = "") -> str:
    """text with every results block replaced by its generated content; an unknown block name is an error."""

    def sub(m):
        name = m.group("name")
        if name not in generated:
            raise KeyError(f"{where}: unknown results block {name!r} (known: {', '.join(generated)})")
        return f"{m.group(1)}{generated[name].rstrip()}\n{m.group(4)}"

    opened = len(re.findall(r"^<!-- results:", text, re.M))
    if opened != len(BLOCK.findall(text)):
        raise KeyError(
            f"{where}: {opened} results markers, not all of them a well-formed block "
            "(<!-- results:NAME --> ... <!-- /results:NAME -->, NAME in a-z, 0-9, _)"
        )
    return BLOCK.sub(sub, text)


def stale_blocks(repo: Path, generated: dict[str, str]) -> list[str]:
    """Files under `repo` (DOC_FILES) whose results blocks differ from `generated`."""
    stale = []
    for name in DOC_FILES:
        path = repo / name
        if path.exists() and fill(path.read_text(encoding="utf-8"), generated, name) != path.read_text("utf-8"):
            stale.append(name)
    return stale


def update_docs(repo: Path, generated: dict[str, str]) -> list[str]:
    """Rewrites the results blocks of DOC_FILES (atomically); returns the files changed."""

    changed = []
    for name in DOC_FILES:
        path = repo / name
        if not path.exists():
            continue
        old = path.read_text(encoding="utf-8")
        new = fill(old, generated, name)
        if new != old:
            write_text_atomic(path, new)
            changed.append(name)
    return changed
