import json
import shutil
from pathlib import Path

import pytest
import torch

from edgeconformer.errors import UserError
from edgeconformer.report import (
    FP16_MAX,
    OPTIONAL,
    SCHEMA,
    build_report,
    fmt,
    load_metrics,
    read_audit,
    state_cell,
    validate_metrics,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "metrics"
PNG = b"\x89PNG\r\n\x1a\n"


def fixture(variant="dws") -> dict:
    return json.loads((FIXTURES / f"{variant}.json").read_text())


@pytest.fixture
def workdir(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "metrics")
    return tmp_path


def write_audit(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def list_audit(peaks: list[float], sumsq: dict[int, float]) -> list[dict]:
    return [
        {"name": f"encoder.blocks.{i}.x", "max_abs": p, **({"sumsq_peak": sumsq[i]} if i in sumsq else {})}
        for i, p in enumerate(peaks)
    ]


# ------------------------------------------------------------------------------------------------ schema
def test_fixtures_are_valid_and_cover_the_schema():
    for variant in ("vanilla", "dws"):
        d = fixture(variant)
        assert validate_metrics(d) == []
        assert set(SCHEMA) <= set(d)


def mutate(**changes):
    d = fixture()
    for key, value in changes.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return d


@pytest.mark.parametrize(
    "d,expected",
    [
        (mutate(wer_fp32=KeyError), "missing key 'wer_fp32'"),
        (mutate(rtf_cpu=None), "rtf_cpu is null"),
        (mutate(wer_fp16=-1.0), "wer_fp16 must be a WER/CER in percent"),
        (mutate(wer_fp16=float("nan")), "wer_fp16 must be a WER/CER in percent"),
        (mutate(params_millions=0), "params_millions must be a finite number > 0"),
        (mutate(n_utterances=True), "n_utterances must be an integer"),
        (mutate(n_utterances=2.5), "n_utterances must be an integer"),
        (mutate(flops_subsampling_share=1.5), "flops_subsampling_share must be a fraction"),
        (mutate(flops_subsampling_share=0.2), "differs from flops_shares['subsampling']"),
        (mutate(flops_shares={"subsampling": 0.099921, "ffn": 0.5}), "must sum to 1"),
        (mutate(flops_shares={"ffn": 1.0}), "no 'subsampling' part"),
        (mutate(rtf_device_estimate=0.5), "differs from rtf_device_estimates['apple-watch-s7']"),
        (mutate(device=None), "device (the profile it was estimated for) is null"),
        (mutate(rtf_device_estimates={"apple-watch-s7": -1}), "rtf_device_estimates must be an object"),
        (mutate(machine={"platform": "x"}), "machine lacks"),
        (mutate(variant=""), "variant must be a non-empty string"),
        ([1, 2], "metrics must be a JSON object"),
    ],
)
def test_schema_violations_are_reported(d, expected):
    problems = validate_metrics(d)
    assert any(expected in p for p in problems), problems


def test_nullable_keys_may_be_null():
    d = mutate(
        wer_coreml=None,
        rtf_coreml=None,
        wer_coreml_sim=None,
        rtf_device_estimate=None,
        device=None,
        rtf_device_estimates=None,
    )
    assert validate_metrics(d) == []


# Practical-Conformer keys (docs/practical.md): the figures of benchmarks/bench_practical.py's configurations at
# 10 s; WER/RTF values illustrative.
PRACTICAL_STATE = {
    "seconds": 10.0,
    "encoder_frames": 249,
    "chunk_size": 8,
    "left_chunks": -1,
    "streamable": True,
    "blocks": 4,
    "attention": 51_200,
    "positions": 0,
    "conv": 26_880,
}
SOFTMAX_STATE = dict(PRACTICAL_STATE, attention=1_147_392, positions=589_824, conv=32_256)


def practical(**changes) -> dict:
    d = fixture()
    d.update(
        variant="practical",
        gflops_per_audio_second=0.152,
        gflops_per_audio_second_streamed=0.0799,
        params_millions=2.85,
        attention_state_bytes=PRACTICAL_STATE,
        wer_first_pass_fp32=41.5,
        rtf_cpu_first_pass=0.0123,
        wer_fp32=33.0,
    )
    d.update(changes)
    return d


def test_practical_keys_are_optional_nullable_and_checked():
    assert set(OPTIONAL).isdisjoint(SCHEMA)  # old metrics files (the fixtures) lack them and stay valid
    assert not set(OPTIONAL) & set(fixture())
    assert validate_metrics(practical()) == []
    assert validate_metrics(practical(**dict.fromkeys(OPTIONAL))) == []  # null: not a cascade / not measured


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"wer_first_pass_fp32": -1.0}, "wer_first_pass_fp32 must be a WER/CER in percent"),
        ({"rtf_cpu_first_pass": 0.0}, "rtf_cpu_first_pass must be a finite number > 0"),
        ({"gflops_per_audio_second_streamed": float("inf")}, "gflops_per_audio_second_streamed must be a finite"),
        ({"gflops_per_audio_second_streamed": 0.2}, "exceeds the whole model's gflops_per_audio_second"),
        ({"attention_state_bytes": 51200}, "attention_state_bytes must be an object"),
        (
            {"attention_state_bytes": dict(PRACTICAL_STATE, attention=-1)},
            "byte counts (integers >= 0) for ['attention']",
        ),
        ({"attention_state_bytes": dict(PRACTICAL_STATE, conv=1.5)}, "for ['conv']"),
        (
            {"attention_state_bytes": {k: v for k, v in PRACTICAL_STATE.items() if k != "seconds"}},
            "attention_state_bytes.seconds must be",
        ),
    ],
)
def test_practical_key_violations_are_reported(changes, expected):
    problems = validate_metrics(practical(**changes))
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------------------------ audits
def test_read_audit_accepts_the_stabilize_stage_format(tmp_path):
    audit_mod = pytest.importorskip("edgeconformer.stabilize.audit")
    from edgeconformer.models.asr import DualDecoderASR
    from edgeconformer.models.conformer import ConformerEncoder

    torch.manual_seed(0)
    model = DualDecoderASR(ConformerEncoder(80, 32, 1, 4, 64, 7, 0.0, 4, True), 20, None, ctc_weight=1.0).eval()
    real = audit_mod.audit(model, [torch.randn(1, 60, 80) * 50])
    audit_mod.write_audit(real, tmp_path / "fp16_audit.json")
    stages, problem = read_audit(tmp_path / "fp16_audit.json")
    assert problem is None and list(stages) == [""]
    recs = {r["name"]: r for r in stages[""]}
    leaves = [n for n in real["modules"] if n != "<root>" and not any(m.startswith(n + ".") for m in real["modules"])]
    assert sorted(recs) == sorted(leaves)
    for name, r in recs.items():
        rec = real["modules"][name]
        assert r["max_abs"] == max(rec["out_max_abs"], rec["in_max_abs"])
        assert r["sumsq_peak"] == rec.get("ln_sumsq_peak")
    assert any(r["sumsq_peak"] is not None for r in recs.values())  # LayerNorms carry their sum-of-squares peak


def test_read_audit_before_after_stages_and_bad_files(tmp_path):
    obj = {
        "unstabilized": {"modules": {"a": {"max_abs": 1e5, "sumsq_peak": 3e6}, "b": {"max_abs": 2.0}}},
        "stabilized": list_audit([3.0, 4.0], {0: 100.0}),
        "format": "fp16",
    }
    write_audit(tmp_path / "fp16_audit.json", obj)
    stages, problem = read_audit(tmp_path / "fp16_audit.json")
    assert problem is None and list(stages) == ["unstabilized", "stabilized"]
    assert stages["unstabilized"][0] == {"name": "a", "max_abs": 1e5, "sumsq_peak": 3e6}
    assert [r["max_abs"] for r in stages["stabilized"]] == [3.0, 4.0]
    assert read_audit(tmp_path / "missing.json") == ({}, None)
    (tmp_path / "bad.json").write_text("{not json")
    stages, problem = read_audit(tmp_path / "bad.json")
    assert stages == {} and "unreadable" in problem
    (tmp_path / "odd.json").write_text(json.dumps({"format": "fp16", "modules": {"a": {"max_abs": "big"}}}))
    assert "no per-module records" in read_audit(tmp_path / "odd.json")[1]


# ------------------------------------------------------------------------------------------------ report
def test_build_report_writes_summary_and_plots(workdir):
    reports = workdir / "reports"
    peaks = [10.0, FP16_MAX * 2, 3.0]
    write_audit(reports / "vanilla" / "fp16_audit.json", list_audit(peaks, {0: 1e6, 2: 50.0}))
    write_audit(reports / "dws" / "fp16_audit.json", list_audit([1.0, 2.0], {}))
    out = build_report(workdir / "metrics", reports, reports / "summary.md")

    assert out["variants"] == ["vanilla", "dws"] and out["problems"] == {}
    assert set(out["plots"]) == {"flop_shares", "wer_vs_flops", "rtf", "fp16_audit"}
    for path in out["plots"].values():
        assert path.parent == reports / "plots" and path.read_bytes()[:8] == PNG
    md = out["summary"].read_text()
    for variant in ("vanilla", "dws"):
        m = fixture(variant)
        row = next(line for line in md.splitlines() if line.startswith(f"| {variant} | {fmt(m['wer_fp32'], 'wer')}"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:5] == [
            fmt(m[k], "wer") for k in ("wer_fp32", "wer_fp16", "wer_fp16_unstabilized", "wer_coreml_sim")
        ]
        assert cells[5] == "n/a" and cells[8] == "n/a"  # wer_coreml, rtf_coreml are null
        assert cells[7] == fmt(m["rtf_cpu"], "rtf")
        assert cells[10] == fmt(m["flops_subsampling_share"], "share")
        assert (
            f"| {variant} | " + " | ".join(fmt(m["rtf_device_estimates"][d], "rtf") for d in m["rtf_device_estimates"])
            in md
        )
    # the audit table counts modules and LayerNorms above the FP16 maximum
    assert "| vanilla | - | 3 | 1.31e+05 (encoder.blocks.1.x) | 1 | 1e+06 | 1 |" in md
    assert "| dws | - | 2 | 2 (encoder.blocks.1.x) | 0 | n/a | n/a |" in md
    assert "(paper 32.8%)" in md and "![FLOP share by module group](plots/flop_shares.png)" in md
    leftovers = [p.name for p in reports.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temp files


def table_rows(md: str) -> dict[str, list[str]]:
    # The ablation table (the first table of the summary): variant -> cells, header under "variant"
    lines = md.split("## Ablation", 1)[1].split("\n\n")[1].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    return {r[0]: r for r in rows}


def test_summary_has_the_practical_columns(workdir):
    (workdir / "metrics" / "practical.json").write_text(json.dumps(practical()))
    (workdir / "metrics" / "baseline.json").write_text(
        json.dumps(
            practical(
                variant="baseline",
                attention_state_bytes=SOFTMAX_STATE,
                gflops_per_audio_second_streamed=0.149,
                gflops_per_audio_second=0.153,
                wer_first_pass_fp32=None,
                rtf_cpu_first_pass=None,
            )
        )
    )
    out = build_report(workdir / "metrics", workdir / "reports", workdir / "reports" / "summary.md")
    assert out["variants"] == ["vanilla", "dws", "practical", "baseline"] and out["problems"] == {}
    rows = table_rows(out["summary"].read_text())
    col = {name: i for i, name in enumerate(rows["variant"])}
    p, b, dws = rows["practical"], rows["baseline"], rows["dws"]
    assert p[col["params (M)"]] == "2.85" and p[col["WER fp32 %"]] == "33.00" and p[col["RTF cpu"]] == "0.0275"
    assert (p[col["GFLOPs / audio s"]], p[col["GFLOPs / audio s streamed"]]) == ("0.152", "0.080")
    assert p[col["attention state B / step"]] == "51,200 @ 10 s"  # Performer sums, no position table
    assert b[col["attention state B / step"]] == "1,147,392 + 589,824 pos. @ 10 s"
    assert (p[col["WER fp32 % first pass"]], p[col["RTF cpu first pass"]]) == ("41.50", "0.0123")
    assert (b[col["WER fp32 % first pass"]], b[col["RTF cpu first pass"]]) == ("n/a", "n/a")  # null: no cascade
    # metrics written before these keys existed
    assert [
        dws[col[k]]
        for k in (
            "GFLOPs / audio s streamed",
            "attention state B / step",
            "WER fp32 % first pass",
            "RTF cpu first pass",
        )
    ] == ["n/a"] * 4
    assert dws[col["GFLOPs / audio s"]] == fmt(fixture()["gflops_per_audio_second"], "gflops")
    rtf_csv = (workdir / "reports" / "plot_data" / "rtf.csv").read_text()
    assert "practical/cpu first pass,practical,cpu first pass,0.0123" in rtf_csv
    assert "baseline/cpu first pass" not in rtf_csv


def test_state_cell():
    assert state_cell(None) == state_cell({"attention": None}) == state_cell("51200") == "n/a"
    assert state_cell({"attention": 0, "positions": 0, "seconds": 2.5}) == "0 @ 2.5 s"  # convolution-only model
    assert state_cell({"attention": 1234, "positions": 56}) == "1,234 + 56 pos."


def test_missing_values_show_as_na_and_missing_audits_are_reported(workdir):
    d = fixture("dws")
    for key in ("rtf_device_estimate", "rtf_device_estimates", "device", "flops_shares", "wer_coreml_sim"):
        d.pop(key)
    (workdir / "metrics" / "dws.json").write_text(json.dumps(d))
    (workdir / "metrics" / "vanilla.json").unlink()
    out = build_report(workdir / "metrics", workdir / "reports", workdir / "out" / "summary.md")
    md = out["summary"].read_text()
    assert "fp16_audit" not in out["plots"] and "flop_shares" not in out["plots"]
    assert "*FLOP share by module group: no data.*" in md and "No FP16 audits found" in md
    assert "*No device estimates in the metrics.*" in md
    assert "## Problems found in the inputs" in md and "missing key 'flops_shares'" in md
    assert "missing key 'flops_shares'" in out["problems"]["dws"]


def test_unusable_inputs_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="no metrics files"):
        load_metrics(tmp_path)
    (tmp_path / "dws.json").write_text("{broken")
    with pytest.raises(UserError, match=r"dws.json: not readable JSON"):
        load_metrics(tmp_path)


def test_bad_audit_does_not_stop_the_report(workdir):
    write_audit(workdir / "reports" / "dws" / "fp16_audit.json", {"garbage": True})
    out = build_report(workdir / "metrics", workdir / "reports", workdir / "reports" / "summary.md")
    assert "no per-module records" in out["problems"]["audits"][0]
    assert "no per-module records" in out["summary"].read_text()


# ------------------------------------------------------------------------------------------------ notebook
def test_notebook_runs_on_fixture_metrics(workdir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    write_audit(workdir / "reports" / "dws" / "fp16_audit.json", list_audit([1.0, 2e5], {0: 9.0}))
    (workdir / "metrics" / "comparisons.json").write_text(
        json.dumps(
            [
                {
                    "a": "dws/fp32",
                    "b": "vanilla/fp32",
                    "metric": "wer",
                    "diff": 1.25,
                    "ci95": [-0.5, 3.0],
                    "n_seeds": 3,
                    "n_utterances": 240,
                    "verdict": "not distinguishable at this budget",
                }
            ]
        )
    )
    monkeypatch.setenv("EDGECONFORMER_METRICS_DIR", str(workdir / "metrics"))
    monkeypatch.setenv("EDGECONFORMER_REPORTS_DIR", str(workdir / "reports"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs
    nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(workdir)}}
    ).execute()
    texts, images = [], 0
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o["output_type"] != "error", o
            texts.append(o.get("text", "") + o.get("data", {}).get("text/markdown", ""))
            images += "image/png" in o.get("data", {})
    text = "\n".join(texts)
    assert "2 variant(s) from" in text and "vanilla, dws" in text
    assert f"| dws | {fmt(fixture('dws')['wer_fp32'], 'wer')} |" in text
    assert "| params_millions | " in text and "apple-watch-s7" in text
    assert "+1.25 [-0.50, +3.00] n.d." in text  # the headline's paired CI
    assert images == 5  # the comparisons' CIs, FLOP shares, WER vs FLOPs, RTF, FP16 audit
