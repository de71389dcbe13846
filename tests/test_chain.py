"""The post-training chain on a tiny trained model, through the same functions the DVC stages call:
stabilize -> export -> evaluate -> report; and the ablation entry point under Hydra multirun (W&B offline)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_DATA, TINY_MODEL
from edgeconformer.config import compose

pytestmark = pytest.mark.slow  # the whole chain on a tiny corpus: CI runs it; `-m "not slow"` skips it

FAST_EVAL = [
    "eval.rtf.utterances=2",
    "eval.rtf.repeats=1",
    "eval.rtf.warmup=1",
    "eval.flops.seconds=2.0",
    "eval.device_estimate.seconds=2.0",
    "stabilize.stress_utterances=4",
    "stabilize.softmax.error_table_sizes=[16,256]",
    "export.shapes.policy=ranged",
]


def chain_cfg(data_dir, out, *extra):
    return compose(
        [
            *TINY_DATA,
            f"data.root={data_dir / 'raw'}",
            f"data.out_dir={data_dir / 'prepared'}",
            *TINY_MODEL,
            *FAST_EVAL,
            f"out_dir={out}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def chain(data_dir, tmp_path_factory):
    from edgeconformer.stages.evaluate import evaluate
    from edgeconformer.stages.export import export
    from edgeconformer.stages.stabilize import stabilize
    from edgeconformer.stages.train import train

    out = tmp_path_factory.mktemp("chain") / "dws"
    cfg = chain_cfg(data_dir, out, "model.subsampling=dws", "train.max_epochs=2", "train.test_after_fit=false")
    train(cfg)
    return {"cfg": cfg, "out": out, "stabilize": stabilize(cfg), "export": export(cfg), "evaluate": evaluate(cfg)}


def test_stabilize_checks_equivalence_and_writes_its_outputs(chain):
    s, out = chain["stabilize"], chain["out"]
    assert s["equivalence"]["encoder_max_abs_diff"] <= 1e-4 and s["equivalence"]["transcript_mismatches"] == []
    assert s["equivalence"]["utterances"] == 4  # every test utterance of the tiny corpus
    assert (out / "stabilized.pt").exists() and (out / "reports" / "fp16_audit.png").stat().st_size > 0
    audits = json.loads((out / "reports" / "fp16_audit.json").read_text())
    assert set(audits) == {"original_fp32", "ane_fp32", "fp16_unstabilized", "fp16"}
    assert json.loads((out / "reports" / "stabilize.json").read_text())["wer"] == s["wer"]
    assert s["nonfinite_utterances"]["fp16"] == 0
    assert abs(s["wer"]["fp16"] - s["wer"]["fp32"]) <= 0.5 + 1e-9


def test_stress_case_breaks_unstabilized_fp16_only(chain):
    stress = chain["stabilize"]["stress"]
    assert stress["setting"] == "auto" and stress["gain"] >= 2 and stress["utterances"] == 4
    # The gain lifts the worst LayerNorm sum of squares 64x past FP16's maximum: the unstabilized FP16 LayerNorm
    # overflows (its output collapses), the pre-normalized one stays with FP32.
    diff = stress["max_abs_diff_vs_fp32"]
    assert diff["fp32"] == 0 and diff["fp16"] < 0.1
    assert diff["fp16_unstabilized"] > 1.0 and diff["fp16_unstabilized"] > 20 * diff["fp16"]
    assert stress["nonfinite_utterances"]["fp16"] == 0
    assert abs(stress["wer"]["fp16"] - stress["wer"]["fp32"]) <= 0.5 + 1e-9


def test_load_stabilized_catches_a_retrained_checkpoint(chain, tmp_path):
    import shutil

    from edgeconformer.artifacts import load_stabilized
    from edgeconformer.errors import UserError

    copy = tmp_path / "dws"
    shutil.copytree(chain["out"], copy, ignore=shutil.ignore_patterns("*.mlpackage"))
    _, ane, options = load_stabilized(copy)
    assert options == chain["stabilize"]["options"]
    ckpt = torch.load(copy / "best.ckpt", map_location="cpu", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.endswith("ctc.weight"))
    ckpt["state_dict"][key] += 1.0
    torch.save(ckpt, copy / "best.ckpt")
    with pytest.raises(UserError, match="retrained after stabilization"):
        load_stabilized(copy)


def test_export_writes_the_package_and_its_report(chain):
    from conftest import package_metadata

    out, rep = chain["out"], chain["export"]
    assert (out / "model.mlpackage").is_dir()
    saved = json.loads((out / "reports" / "conversion.json").read_text())
    assert saved["n_ops"] == rep["n_ops"] > 0 and saved["variant"] == "dws"
    meta = package_metadata(out / "model.mlpackage")
    stab = meta["stabilization"]
    stab = json.loads(stab) if isinstance(stab, str) else stab
    assert stab["prenorm"] == chain["cfg"].stabilize.prenorm and meta["vocabulary"][0]  # an app can decode


def test_evaluate_metrics_follow_the_schema_and_coreml_sim_matches(chain):
    from edgeconformer.report import validate_metrics

    m, out = chain["evaluate"], chain["out"]
    assert validate_metrics(json.loads((out / "metrics.json").read_text())) == []
    assert m["wer_coreml"] is None and m["rtf_coreml"] is None  # not macOS
    assert m["coreml_sim"]["identical_transcripts"] == m["n_utterances"] == 4
    assert m["wer_coreml_sim"] == pytest.approx(m["wer_fp16"], abs=1e-9)
    assert 0 < m["flops_subsampling_share"] < 1 and m["rtf_cpu"] > 0 and m["rtf_device_estimate"] > 0
    assert abs(sum(m["flops_shares"].values()) - 1) < 1e-6
    rows = [json.loads(line) for line in (out / "reports" / "utterances.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"fp32", "fp16", "fp16_unstabilized", "coreml_sim"} <= set(rows[0])
    # the stabilization ablation's arms (FP16 accumulation emulated) on the same utterances, and the k counts
    assert {"acc16_none", "acc16_prenorm", "acc16_lut", "acc16_both", "acc16_both_uncapped"} <= set(rows[0])
    assert all(0 <= m[f"wer_{arm}"] for arm in ("acc16_none", "acc16_both")) and m["softmax_k"]["rows"] > 0
    assert rows[0]["fp32"]["errors"] >= 0 and rows[0]["reference"]


def test_report_reads_the_chain_outputs(chain, tmp_path):
    import shutil

    from edgeconformer.report import build_report

    (tmp_path / "metrics").mkdir()
    shutil.copy(chain["out"] / "metrics.json", tmp_path / "metrics" / "dws.json")
    shutil.copytree(chain["out"] / "reports", tmp_path / "reports" / "dws")
    result = build_report(tmp_path / "metrics", tmp_path / "reports", tmp_path / "reports" / "summary.md")
    text = result["summary"].read_text()
    assert result["variants"] == ["dws"] and not result["problems"]
    assert "fp16_audit" in result["plots"] and f"{chain['evaluate']['wer_fp32']:.1f}" in text
    shares = (tmp_path / "reports" / "plot_data" / "flop_shares.csv").read_text().splitlines()
    assert shares[0] == "label,variant,part,share" and any(r.startswith("dws/subsampling,") for r in shares)


def test_ablation_multirun_runs_each_job_end_to_end_with_one_wandb_run(data_dir, tmp_path):
    from edgeconformer.wandb_report import read_offline_run

    overrides = [
        *TINY_DATA,
        f"data.root={data_dir / 'raw'}",
        f"data.out_dir={data_dir / 'prepared'}",
        *[o for o in TINY_MODEL if not o.startswith("logger=")],
        *FAST_EVAL,
        "logger=wandb",
        "logger.csv=true",
        "train.max_epochs=1",
        "train.test_after_fit=false",
        "hydra.sweep.dir=sweeps/a",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "ablate.py"), "-m", "stabilize.prenorm=none,mad", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((tmp_path / "sweeps" / "a" / job / "metrics.json").read_text())
        assert metrics["stabilization"]["prenorm"] == ("none", "mad")[int(job)]
    runs = [read_offline_run(r) for r in sorted((tmp_path / "wandb").glob("offline-run-*"))]
    ablate = [r for r in runs if r["job_type"] == "ablate"]
    assert len(ablate) == 2 and {r["group"] for r in ablate} == {"sweep-sweeps-a"}
    assert sorted(r["name"] for r in ablate) == ["stabilize.prenorm=mad", "stabilize.prenorm=none"]
    assert all("wer_fp32" in r["summary"] and "flops_subsampling_share" in r["summary"] for r in ablate)
