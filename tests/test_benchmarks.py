"""Smoke test of benchmarks/bench_encoder.py: tiny sizes, one rep, output schema only (no timing claims)."""

import importlib.util
import json
import math

from conftest import REPO

BENCH = REPO / "benchmarks" / "bench_encoder.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_encoder", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_encoder_tiny(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--sizes", "tiny", "--reps", "1", "--warmup", "1", "--threads", "1", "--batch", "2",
                         "--min-sec", "1", "--max-sec", "1.5", "--rtf-sec", "1", "--infer-inner", "1",
                         "--json", str(out)])

    # The last printed line and the --json file are the same report.
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(out.read_text()) == json.loads(json.dumps(report))

    for key in ("torch", "torchaudio", "threads", "reps", "warmup", "machine", "date", "results"):
        assert key in report
    assert report["threads"] == 1 and report["reps"] == 1
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
