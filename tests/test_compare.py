"""The compare stage and what reads it: per-variant mean +- sd over seeds, paired comparisons on the same utterances,
the report's headline/claims tables and the generated documentation blocks, on synthetic runs."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from edgeconformer.artifacts import chain_run
from edgeconformer.config import runs_table
from edgeconformer.errors import UserError
from edgeconformer.stages.compare import compare

MODES = (
    "fp32",
    "fp16",
    "fp16_unstabilized",
    "acc16_none",
    "acc16_prenorm",
    "acc16_lut",
    "acc16_both",
    "acc16_both_uncapped",
)
N, SIM = 40, 10  # utterances; the Core ML simulation's subset


def write_run(root, variant, seed, rate, rng, frontend_peak=10.0):
    """A run's evaluation.json and utterances.jsonl as the evaluate stage writes them (the keys compare reads)."""
    paths = chain_run(variant, seed, root)
    paths.report_dir.mkdir(parents=True, exist_ok=True)
    words = np.random.default_rng(0).poisson(12, N) + 1  # the same test set for every run
    extra = {"fp16_unstabilized": 0.3, "acc16_none": 0.4, "acc16_lut": 0.4}
    rows, totals = [], {}
    for i in range(N):
        row = {"id": f"u{i}", "reference": "x", "seconds": 2.0}
        for mode in MODES + ("coreml_sim",):
            if mode == "coreml_sim" and i >= SIM:
                continue
            p = min(rate + extra.get(mode, 0.0), 1.0)
            row[mode] = {"hypothesis": "x", "errors": int(rng.binomial(words[i], p)), "ref_words": int(words[i])}
            totals.setdefault(mode, [0, 0])
            totals[mode][0] += row[mode]["errors"]
            totals[mode][1] += words[i]
        rows.append(row)
    wer = {m: 100 * e / w for m, (e, w) in totals.items()}
    evaluation = {
        "variant": variant,
        "seed": seed,
        "wer_fp32": wer["fp32"],
        "wer_fp16": wer["fp16"],
        "wer_fp16_unstabilized": wer["fp16_unstabilized"],
        "cer_fp32": wer["fp32"] / 2,
        "cer_fp16": wer["fp16"] / 2,
        "wer_coreml_sim": wer["coreml_sim"],
        "wer_coreml": None,
        "n_utterances": N,
        "gflops_per_audio_second": 0.15 if variant == "dws" else 0.18,
        "flops_subsampling_share": 0.10 if variant == "dws" else 0.25,
        "params_millions": 2.6,
        "rtf_cpu": 0.004 + 0.001 * seed,
        "audit_frontend_peak": frontend_peak,
        **{f"wer_{m}": wer[m] for m in MODES if m.startswith("acc16_")},
    }
    paths.evaluation.write_text(json.dumps(evaluation))
    paths.utterances.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return evaluation


@pytest.fixture
def chain_root(tmp_path):
    rng = np.random.default_rng(1)
    evals = {}
    for seed in (1, 2, 3):
        evals[("vanilla", seed)] = write_run(tmp_path, "vanilla", seed, 0.30, rng, frontend_peak=25.0)
        evals[("dws", seed)] = write_run(tmp_path, "dws", seed, 0.10, rng, frontend_peak=10.0)
    cfg = OmegaConf.create(
        {
            "runs": runs_table(["vanilla", "dws"], ["vanilla", "dws"], [1, 2, 3], [1]),
            "compared": ["vanilla", "dws"],
            "compare": {
                "resamples": 2000,
                "confidence": 0.95,
                "seed": 0,
                "streaming_baseline": "streaming",
                "ablations": ["conv_only"],
            },
        }
    )
    return tmp_path, cfg, evals


def test_runs_table_crosses_compared_variants_with_seeds_and_the_rest_with_ablation_seeds():
    table = runs_table(["vanilla", "dws", "practical"], ["vanilla", "dws"], [1, 2, 3], [7])
    assert list(table) == ["vanilla-s1", "vanilla-s2", "vanilla-s3", "dws-s1", "dws-s2", "dws-s3", "practical-s7"]
    assert table["dws-s2"] == {"variant": "dws", "seed": 2, "dir": "dws/s2"}
    with pytest.raises(UserError, match="distinct"):
        runs_table(["vanilla"], ["vanilla"], [1, 1], [1])
    with pytest.raises(UserError, match="not in variants"):
        runs_table(["vanilla"], ["dws"], [1], [1])


def test_variant_files_hold_mean_sd_over_seeds_and_every_seed(chain_root):
    root, cfg, evals = chain_root
    compare(cfg, root)
    for variant in ("vanilla", "dws"):
        m = json.loads((root / "metrics" / f"{variant}.json").read_text())
        per_seed = [evals[(variant, s)]["wer_fp32"] for s in (1, 2, 3)]
        assert m["n_seeds"] == 3 and [s["seed"] for s in m["seeds"]] == [1, 2, 3]
        assert m["wer_fp32_mean"] == pytest.approx(np.mean(per_seed))
        assert m["wer_fp32_sd"] == pytest.approx(np.std(per_seed, ddof=1))
        assert m["seeds"][1]["wer_fp16_unstabilized"] == evals[(variant, 2)]["wer_fp16_unstabilized"]
        assert m["rtf_cpu"] == pytest.approx(0.006)  # the median over seeds
        stats = {s["metric"]: s for s in m["stats"]}
        assert stats["cer_fp32"]["mean"] == pytest.approx(np.mean(per_seed) / 2)
        assert "wer_acc16_both_uncapped" in stats
        # What DVC registers: a few short keys per variant, so `dvc metrics show` fits 120 columns
        head = json.loads((root / "reports" / "headline" / f"{variant}.json").read_text())
        assert head["seeds"] == 3 and head["wer"] == round(m["wer_fp32_mean"], 2)
        assert len(json.dumps(head)) < 150 and all(not isinstance(v, (list, dict)) for v in head.values())
    dws = json.loads((root / "reports" / "headline" / "dws.json").read_text())
    assert dws["vs_base"] < 0 and dws["ci95"].startswith("[-")


def test_comparisons_are_paired_on_the_same_utterances_with_cis_and_verdicts(chain_root):
    root, cfg, evals = chain_root
    compare(cfg, root)
    comps = json.loads((root / "metrics" / "comparisons.json").read_text())
    by = {(c["a"], c["b"]): c for c in comps}
    dws = by[("dws/fp32", "vanilla/fp32")]
    expect = np.mean([evals[("dws", s)]["wer_fp32"] - evals[("vanilla", s)]["wer_fp32"] for s in (1, 2, 3)])
    assert dws["diff"] == pytest.approx(expect) and dws["verdict"] == "better" and dws["ci95"][1] < 0
    assert (
        dws["n_seeds"] == 3
        and dws["n_utterances"] == N
        and set(dws) >= {"a", "b", "metric", "diff", "ci95", "n_seeds", "n_utterances", "verdict"}
    )
    assert ("dws/fp16", "vanilla/fp16") in by
    assert by[("vanilla/fp16_unstabilized", "vanilla/fp32")]["verdict"] == "worse"
    sim = by[("dws/coreml_sim", "dws/fp16")]
    assert sim["n_utterances"] == SIM  # its subset, n beside it
    assert by[("dws/acc16_none", "dws/fp32")]["verdict"] == "worse"
    assert by[("dws/acc16_prenorm", "dws/fp32")]["verdict"] != "worse"
    assert ("dws/acc16_both_uncapped", "dws/acc16_both") in by


def test_report_opens_with_the_headline_and_generates_the_doc_blocks(chain_root):
    from edgeconformer.evidence import BLOCK, stale_blocks
    from edgeconformer.report import build_report

    root, cfg, _ = chain_root
    compare(cfg, root)
    doc = root / "README.md"
    doc.write_text(
        "intro\n<!-- results:headline -->\nold numbers\n<!-- /results:headline -->\n"
        "<!-- results:claims -->\n<!-- /results:claims -->\nend\n"
    )
    out = build_report(root / "metrics", root / "reports", root / "reports" / "summary.md", docs_root=root)
    md = out["summary"].read_text()
    assert md.index("## Headline") < md.index("## Ablation: all figures")
    headline = md.split("## Headline", 1)[1].split("\n\n")[1]
    assert "| dws | 3 |" in headline and "] better |" in headline and "(baseline)" in headline
    assert "it depends on the pre-normalized LayerNorm" in md
    text = doc.read_text()
    assert out["docs"] == ["README.md"] and "old numbers" not in text and text.endswith("end\n")
    blocks = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    assert "| dws | 3 |" in blocks["headline"]
    assert "**reproduced**" in blocks["claims"] and "**not measurable here**" in blocks["claims"]
    assert "DWS − vanilla" in blocks["claims"]
    # a hand edit of a generated table is stale against the metrics
    doc.write_text(text.replace("| dws | 3 |", "| dws | 4 |"))
    from edgeconformer.report import generated_blocks, load_comparisons, load_metrics

    gen = generated_blocks(load_metrics(root / "metrics"), load_comparisons(root / "metrics"))
    assert stale_blocks(root, gen) == ["README.md"]
    doc.write_text(text + "<!-- results:fp16 -->\nno closing marker\n")  # a broken block is an error, not skipped
    with pytest.raises(KeyError, match="README.md: 3 results markers"):
        stale_blocks(root, gen)


def test_bf16_against_fp32_is_a_paired_comparison_over_the_same_seeds(tmp_path):
    # `variants=[vanilla,vanilla_bf16] compared=[vanilla,vanilla_bf16]` (docs/training.md, "Precision"): the bf16
    # variant against its fp32 base, seed by seed on the same utterances, and a report that names both.
    from edgeconformer.report import build_report

    rng = np.random.default_rng(2)
    evals = {}
    for seed in (1, 2, 3):
        evals[("vanilla", seed)] = write_run(tmp_path, "vanilla", seed, 0.30, rng)
        evals[("vanilla_bf16", seed)] = write_run(tmp_path, "vanilla_bf16", seed, 0.30, rng)
    names = ["vanilla", "vanilla_bf16"]
    cfg = OmegaConf.create(
        {
            "runs": runs_table(names, names, [1, 2, 3], [1]),
            "compared": names,
            "compare": {"resamples": 2000, "confidence": 0.95, "seed": 0},
        }
    )
    compare(cfg, tmp_path)
    by = {(c["a"], c["b"]): c for c in json.loads((tmp_path / "metrics" / "comparisons.json").read_text())}
    c = by[("vanilla_bf16/fp32", "vanilla/fp32")]
    expect = np.mean([evals[("vanilla_bf16", s)]["wer_fp32"] - evals[("vanilla", s)]["wer_fp32"] for s in (1, 2, 3)])
    assert c["diff"] == pytest.approx(expect) and c["n_seeds"] == 3 and c["seeds"] == [[1, 2, 3], [1, 2, 3]]
    assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and ("vanilla_bf16/fp16", "vanilla/fp16") in by
    out = build_report(tmp_path / "metrics", tmp_path / "reports", tmp_path / "reports" / "summary.md")
    assert "| vanilla_bf16 | 3 |" in out["summary"].read_text()


def test_compare_names_the_missing_run_and_the_stage_to_run(chain_root):
    root, cfg, _ = chain_root
    (chain_run("dws", 2, root).utterances).unlink()
    with pytest.raises(UserError, match=r"evaluate@dws-s2"):
        compare(cfg, root)


@pytest.mark.parametrize(
    "ci, status",
    [
        ([-0.4, 0.3], "reproduced"),
        ([-2.1, 0.99], "reproduced"),
        ([-2.1, 5.9], "inconclusive"),
        ([0.2, 1.4], "inconclusive"),
        ([1.2, 3.0], "not reproduced"),
    ],
)
def test_keeps_accuracy_is_non_inferiority_at_the_margin(ci, status):
    from edgeconformer.claims import MARGIN, kept

    assert MARGIN == 1.0
    assert kept({"ci95": ci, "diff": sum(ci) / 2, "verdict": "n.d."}) == status


def test_dws_accuracy_claim_needs_seeds_and_a_narrow_interval():
    from edgeconformer.claims import dws_wer

    by = {"vanilla": {"n_seeds": 3}, "dws": {"n_seeds": 3}}
    comp = {
        "a": "dws/fp32",
        "b": "vanilla/fp32",
        "metric": "wer",
        "diff": 1.56,
        "ci95": [-2.12, 5.89],
        "verdict": "not distinguishable",
        "n_seeds": 3,
        "n_utterances": 200,
    }
    assert dws_wer(by, [comp])[0] == "inconclusive"  # not distinguishable is not "kept"
    assert dws_wer(by, [{**comp, "diff": 0.1, "ci95": [-0.6, 0.8]}])[0] == "reproduced"
    one = {"vanilla": {"n_seeds": 1}, "dws": {"n_seeds": 1}}
    assert dws_wer(one, [{**comp, "ci95": [-0.6, 0.8]}])[0] == "inconclusive"


@pytest.mark.parametrize("variant", ["vanilla", "dws", "practical"])
def test_variant_files_regenerate_byte_identical_from_their_seeds(variant, tmp_path):
    # The committed metrics/<variant>.json, rebuilt by the compare stage from its own per-seed runs (the rows are
    # not needed for the per-variant figures) and written as compare writes it: the same bytes.
    from edgeconformer.artifacts import write_json_atomic
    from edgeconformer.config import REPO
    from edgeconformer.metrics import RunMetrics
    from edgeconformer.stages.compare import Run, variant_summary

    path = REPO / "metrics" / f"{variant}.json"
    committed = json.loads(path.read_text(encoding="utf-8"))
    runs = [Run(variant, s["seed"], RunMetrics.parse(s), []) for s in committed["seeds"]]
    out = write_json_atomic(tmp_path / f"{variant}.json", variant_summary(runs).to_dict())
    assert out.read_bytes() == path.read_bytes()
