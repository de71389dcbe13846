"""Smoke tests of the benchmarks: tiny sizes, one or two reps, output schema and invariants only (no timing claims)."""

import importlib.util
import json
import math

import pytest

from conftest import REPO, TINY_MODEL
from edgeconformer.metrics import MACHINE_KEYS


def load_bench(name: str = "bench_encoder"):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_encoder_tiny(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--sizes",
            "tiny",
            "--reps",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--batch",
            "2",
            "--min-sec",
            "1",
            "--max-sec",
            "1.5",
            "--rtf-sec",
            "1",
            "--infer-inner",
            "1",
            "--json",
            str(out),
        ]
    )

    # The last printed line and the --json file are the same report.
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(out.read_text()) == json.loads(json.dumps(report))

    # Peak fraction: a step's counted FLOPs per second over the matrix-product peak measured in the same run.
    for r in report["results"]:
        tr = r["train"]
        assert positive(tr["gemm_peak_gflops"])
        for name, fraction in tr["peak_fraction"].items():
            assert positive(tr["step_gflop"][name])
            assert math.isclose(fraction, tr["step_gflop"][name] / tr["step_s"][name] / tr["gemm_peak_gflops"])
        # the relative-position model does the absolute one's work and more (position projections and scores)
        assert tr["step_gflop"]["ours_rel"] > tr["step_gflop"]["ours_abs"]

    for key in ("torch", "torchaudio", "threads", "reps", "warmup", "machine", "date", "results"):
        assert key in report
    assert report["threads"] == 1 and report["reps"] == 1
    # the same machine facts as every evaluation timing, with the threads this benchmark ran on
    assert set(MACHINE_KEYS) <= set(report["machine"]) and report["machine"]["torch_threads"] == 1
    (r,) = report["results"]
    assert r["size"] == "tiny"
    models = ("torchaudio", "ours_abs", "ours_rel")
    for n in models:
        assert positive(r["train"]["throughput"][n]) and positive(r["train"]["throughput_best"][n])
        assert positive(r["train"]["step_s"][n]) and len(r["train"]["step_s_all"][n]) == 1
        assert positive(r["infer"]["rtf"][n]) and positive(r["infer"]["rtf_best"][n])
        assert positive(r["params"][f"{n}_blocks"])
    for key in ("ratios", "ratios_best"):
        assert set(r[key]) == {"ours_abs/torchaudio", "ours_rel/torchaudio"}
        for ratio in r[key].values():
            assert positive(ratio["throughput"]) and positive(ratio["rtf"])

    # Parameter accounting: abs-position blocks match torchaudio's exactly; relative attention adds
    # linear_pos (D x D, no bias) and the u/v biases (2 x D) per block.
    d, layers = r["config"]["d_model"], r["config"]["n_layers"]
    assert r["params"]["ours_abs_blocks"] == r["params"]["torchaudio_blocks"]
    assert r["params"]["ours_rel_blocks"] - r["params"]["ours_abs_blocks"] == layers * (d * d + 2 * d)


def test_bench_train_profile_tiny(data_dir, tmp_path, capsys):
    # The profile of the real training step on the tiny corpus and model: schema and invariants, no timing claims.
    from conftest import TINY_DATA

    bench = load_bench("bench_train_profile")
    out = tmp_path / "profile.json"
    report = bench.main(
        [
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
            *TINY_DATA,
            f"data.root={data_dir / 'raw'}",
            f"data.out_dir={data_dir / 'prepared'}",
            *TINY_MODEL,
        ]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(out.read_text())
    p = report["profile"]
    assert p["steps"] == 2 and positive(p["step_s_median"]) and positive(p["audio_seconds_per_second"])
    assert set(p["parts_s"]) == set(bench.PARTS) and all(v >= 0 for v in p["parts_s"].values())
    assert positive(p["parts_s"]["forward:encoder blocks"]) and positive(p["parts_s"]["backward"])
    assert 0 < p["outside_encoder_share"] < 1
    assert math.isclose(sum(p["op_groups_share"].values()), 1.0, rel_tol=1e-9)
    assert p["op_groups_s"]["matmul"] > 0 and p["top_ops"]
    assert 0 <= report["padding"]["padded_fraction"] < 1 and report["padding"]["batches"] >= 3
    assert positive(report["lightning"]["ratio_fit/plain"]) and positive(report["validation"]["seconds"])
    assert set(MACHINE_KEYS) <= set(report["machine"]) and "bf16_instructions" in report["machine"]


def test_op_groups_cover_the_kinds_of_work():
    bench = load_bench("bench_train_profile")
    assert bench.op_group("aten::addmm") == "matmul" and bench.op_group("aten::native_layer_norm") == "norm"
    assert bench.op_group("aten::_foreach_mul_") == "optimizer" and bench.op_group("aten::silu") == "activation"
    assert bench.op_group("autograd::engine::evaluate_function: MmBackward0") == "autograd bookkeeping"
    assert bench.op_group("aten::something_new") == "other"


def test_bench_precision_tiny(capsys):
    bench = load_bench("bench_precision")
    result = bench.main([*TINY_MODEL, "train.max_batch_seconds=4", "--steps", "1", "--threads", "1", "--vocab", "16"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert all(positive(s) for s in result["step_seconds"].values())
    assert result["ratio_fp32_over_bf16"] == result["step_seconds"]["32-true"] / result["step_seconds"]["bf16-mixed"]
    # auto never picks bf16 without the instructions, nor where it is not the faster one
    if not result["cpu"]["bf16_instructions"] or result["ratio_fp32_over_bf16"] < 1:
        assert result["auto"] == "32-true"


def test_bench_chain_bound_counts_every_run_and_scales_exactly(data_dir, tmp_path, capsys, one_torch_thread):
    """The chain's training bound: every run of the params file, counted on its real batches; with every batch
    sampled and one epoch the scaled work is exactly the sum of the per-batch counts; the bound is work / peak."""
    from omegaconf import OmegaConf

    from conftest import TINY_DATA
    from edgeconformer.config import compose
    from edgeconformer.data.datamodule import collate_features

    bench = load_bench("bench_chain_bound")
    params = tmp_path / "params.yaml"
    base = compose(
        [
            *TINY_DATA,
            f"data.root={data_dir / 'raw'}",
            f"data.out_dir={data_dir / 'prepared'}",
            *TINY_MODEL,
            "train.max_epochs=1",
            "variants=[vanilla,dws]",
            "compared=[vanilla,dws]",
            "seeds=[1,2]",
        ]
    )
    OmegaConf.save(base, params, resolve=True)
    runs_json = tmp_path / "runs.json"
    runs_json.write_text(json.dumps({"wall_seconds": 100.0}))
    out = tmp_path / "bound.json"
    r = bench.main(["--params", str(params), "--every", "1", "--runs-json", str(runs_json), "--json", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(out.read_text())
    assert set(r["runs"]) == {"vanilla-s1", "vanilla-s2", "dws-s1", "dws-s2"}

    # one run recounted by hand: every batch of its only epoch, the same config as the stage composes
    from edgeconformer.stages.train import run_config, run_overrides

    profile = load_bench("bench_train_profile")
    rcfg = run_config(str(params), run_overrides(dict(base.runs)["dws-s2"], base))
    module = profile.build_module(rcfg)
    train_set = profile.train_split(rcfg, module)
    sampler = profile.train_sampler(rcfg, train_set)
    sampler.set_epoch(0)
    exact = sum(bench.count_flops(module, collate_features([train_set[i] for i in b])) for b in sampler)
    run = r["runs"]["dws-s2"]
    assert run["steps"] == run["batches_per_epoch"] == run["sampled_batches"] == len(sampler)
    assert math.isclose(run["tflop"], exact / 1e12, rel_tol=1e-9)
    assert r["runs"]["dws-s1"]["tflop"] < r["runs"]["vanilla-s1"]["tflop"]  # the DWS front end is the cheaper one

    p = r["peak"]
    assert positive(p["one_thread_gflops"]) and p["fp32_gflops"] >= max(p["all_threads_gflops"], p["one_thread_gflops"])
    assert math.isclose(r["total_tflop"], sum(x["tflop"] for x in r["runs"].values()))
    assert math.isclose(r["bound_s"], r["total_tflop"] * 1e3 / p["fp32_gflops"])
    assert math.isclose(r["measured"]["peak_fraction"], r["total_tflop"] * 1e3 / 100.0 / p["fp32_gflops"])

    runs_json.write_text("{}")
    with pytest.raises(SystemExit, match="wall_seconds"):
        bench.main(["--params", str(params), "--runs-json", str(runs_json)])


def test_bench_gpu_measures_the_same_step_in_each_precision(capsys, one_torch_thread, tmp_path):
    # The GPU benchmark's measurement, run on the CPU with a tiny model: schema and invariants, no timing claims.
    bench = load_bench("bench_gpu")
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--batch-seconds", "4", "--utterance-seconds", "2"]
    args += ["--vocab", "16", "--peak-n", "128", "--precision", "32-true,bf16-mixed", "--json", str(out)]
    report = bench.main([*TINY_MODEL, *args])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(out.read_text())
    assert report["model"] == "conformer_m" and [r["precision"] for r in report["results"]] == ["32-true", "bf16-mixed"]
    fp32, bf16 = report["results"]
    assert fp32["gflop_per_step"] == bf16["gflop_per_step"] > 0  # the same work, counted the same in both
    for r in report["results"]:
        assert r["batch"] == [2, 200, 80] and r["step_s"] == sorted(r["step_s_all"])[1]  # the median of three
        assert math.isclose(r["audio_seconds_per_second"], 4.0 / r["step_s"])
        assert math.isclose(r["fraction_of_measured_peak"], r["achieved_tflops"] / r["measured_peak_tflops"])
        assert r["mfu"] is None and r["max_memory_gb"] is None  # no datasheet peak for a CPU, no CUDA memory
    report = bench.main([*TINY_MODEL, *args[:-4], "--peak-tflops", "2.0"])
    assert math.isclose(report["results"][0]["mfu"], report["results"][0]["achieved_tflops"] / 2.0)


def test_bench_gpu_knows_the_cards_by_name():
    bench = load_bench("bench_gpu")
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.4
    assert bench.datasheet_peak("NVIDIA H100 PCIe", "bf16-mixed") == 756.5
    assert bench.datasheet_peak("NVIDIA H200 NVL", "32-true") == 417.5
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312.0
    assert bench.datasheet_peak("Some Other GPU", "bf16-mixed") is None
