"""W&B offline runs are written and read back; the Report spec holds the promised panels over the sweep's group."""

import pytest

from edgeconformer.errors import UserError
from edgeconformer.wandb_report import SUMMARY_KEYS, log_job, read_offline_run, report_spec

METRICS = {
    "variant": "dws",
    "wer_fp32": 30.0,
    "wer_fp16": 30.25,
    "wer_fp16_unstabilized": 97.5,
    "wer_coreml_sim": 30.25,
    "rtf_cpu": 0.012,
    "rtf_device_estimate": 0.05,
    "flops_subsampling_share": 0.07,
    "flops_shares": {"subsampling": 0.07, "mhsa": 0.3},
    "gflops_per_audio_second": 1.5,
    "params_millions": 5.1,
    "wer_coreml": None,
    "machine": {"cpu": "x"},
    "attention_state_bytes": {"seconds": 10.0, "attention": 51200, "positions": 0, "conv": 26880},
}


def test_offline_runs_record_config_summary_and_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    dirs = [
        log_job(
            dict(METRICS, variant=v),
            {"model": {"subsampling": v}},
            project="p",
            entity=None,
            group="sweep-a",
            name=v,
            save_dir=str(tmp_path),
        )
        for v in ("vanilla", "dws")
    ]
    assert len(set(dirs)) == 2  # one run per job, each finished before the next starts
    runs = [read_offline_run(d) for d in dirs]
    assert [r["name"] for r in runs] == ["vanilla", "dws"]
    assert {r["group"] for r in runs} == {"sweep-a"}
    assert runs[1]["config"]["model"] == {"subsampling": "dws"}
    s = runs[1]["summary"]
    for k in SUMMARY_KEYS:
        assert s[k] == pytest.approx(METRICS[k])
    assert s["flops_share/mhsa"] == pytest.approx(0.3)
    assert s["attention_state_bytes/attention"] == 51200 and s["attention_state_bytes/conv"] == 26880
    assert s["delta/wer_fp16"] == pytest.approx(0.25)
    assert s["delta/wer_fp16_unstabilized"] == pytest.approx(67.5)
    assert "wer_coreml" not in s and "machine" not in s  # nulls and nested facts are not summary scalars


def test_read_offline_run_refuses_other_files(tmp_path):
    (tmp_path / "run-x.wandb").write_bytes(b"not a run")
    with pytest.raises(UserError, match="not a W&B run file"):
        read_offline_run(tmp_path)
    with pytest.raises(UserError, match="no .wandb run file"):
        read_offline_run(tmp_path / "missing")


def test_report_spec_panels_filter_the_sweep_group():
    report = report_spec("edgeconformer", "me", "sweep-a")
    grid = report.blocks[-1]
    assert grid.runsets[0].filters == "Group == 'sweep-a'"
    assert grid.runsets[0].project == "edgeconformer" and grid.runsets[0].entity == "me"
    titles = [p.title for p in grid.panels]
    assert titles == [
        "WER vs FLOPs",
        "FLOP share by module",
        "Real-time factor",
        "FP16 WER deltas (points vs FP32)",
        "WER vs attention state per streaming step",
        "Streamed part: GFLOPs per audio second",
    ]
    assert grid.panels[4].x.name == "attention_state_bytes/attention"
    scatter = grid.panels[0]
    assert (scatter.x.name, scatter.y.name) == ("gflops_per_audio_second", "wer_fp32")
    deltas = {m.name for m in grid.panels[3].metrics}
    assert deltas == {"delta/wer_fp16", "delta/wer_fp16_unstabilized", "delta/wer_coreml_sim"}
    assert report_spec("p", None, None).blocks[-1].runsets[0].filters == ""  # no group: every run


def test_chain_runs_are_one_per_seed_grouped_per_variant_with_the_comparisons(tmp_path, monkeypatch):
    from edgeconformer.wandb_report import log_chain

    monkeypatch.setenv("WANDB_MODE", "offline")
    seeds = [dict(METRICS, model="small", seed=s, wer_fp32=30.0 + s) for s in (1, 2)]
    summaries = {"dws": {"variant": "dws", "n_seeds": 2, "wer_fp32_mean": 31.5, "wer_fp32_sd": 0.7, "seeds": seeds}}
    comparisons = [
        {
            "a": "dws/fp16",
            "b": "dws/fp32",
            "metric": "wer",
            "diff": 0.1,
            "ci95": [-0.2, 0.4],
            "n_seeds": 2,
            "n_utterances": 240,
            "verdict": "not distinguishable at this budget",
        }
    ]
    dirs = log_chain(summaries, comparisons, {"seeds": [1, 2]}, project="p", entity=None, save_dir=str(tmp_path))
    runs = [read_offline_run(d) for d in dirs]
    assert [(r["name"], r["group"], r["job_type"]) for r in runs] == [
        ("dws-s1", "small-dws", "evaluate"),
        ("dws-s2", "small-dws", "evaluate"),
        ("comparisons", "comparisons", "compare"),
    ]
    assert runs[1]["summary"]["wer_fp32"] == pytest.approx(32.0) and runs[1]["config"]["seed"] == 2
    s = runs[2]["summary"]
    assert s["dws/wer_fp32_sd"] == pytest.approx(0.7)
    assert s["compare/dws/fp16 - dws/fp32/ci_hi"] == pytest.approx(0.4)
    assert s["compare/dws/fp16 - dws/fp32/significant"] == 0


def test_report_spec_shows_means_over_seeds_with_error_bars():
    grid = report_spec("edgeconformer", None, None).blocks[2]
    assert grid.runsets[0].groupby == ["group"] and grid.runsets[0].filters == "JobType == 'evaluate'"
    assert all(p.groupby_aggfunc == "mean" and p.groupby_rangefunc == "stddev" for p in grid.panels)
    assert [p.metrics[0].name for p in grid.panels] == ["wer_fp32", "wer_fp16", "wer_fp16_unstabilized"]


def test_every_panel_reads_a_key_the_schema_logs():
    # The panels' metric names are keys that metrics.wandb_summary gives a committed run record.
    import json
    from pathlib import Path

    from edgeconformer.metrics import wandb_summary

    run = json.loads((Path(__file__).resolve().parents[1] / "metrics" / "dws.json").read_text())["seeds"][0]
    logged = set(wandb_summary(run))
    report = report_spec("edgeconformer", None, None)
    names = set()
    for grid in (report.blocks[2], report.blocks[-1]):
        for panel in grid.panels:
            names |= {m.name for m in getattr(panel, "metrics", None) or []}
            names |= {getattr(panel, axis).name for axis in ("x", "y") if getattr(panel, axis, None) is not None}
    assert names and names <= logged, names - logged
    assert set(SUMMARY_KEYS) <= logged
