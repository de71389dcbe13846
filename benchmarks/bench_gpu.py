"""Training throughput and model FLOPs utilisation (MFU) of a configured model on a GPU, in bf16 mixed precision.

    .venv/bin/python benchmarks/bench_gpu.py                                   # conformer_m, bf16-mixed, cuda
    .venv/bin/python benchmarks/bench_gpu.py model=conformer_l --precision bf16-mixed,32-true --steps 30
    .venv/bin/python benchmarks/bench_gpu.py model=small --device cpu --steps 3   # the same measurement on a CPU

One step is what training does: forward of the whole model (front end, encoder, CTC head, attention decoder, both
losses) under the precision's autocast, backward, gradient clipping and AdamW (fused where the device allows it), on
a fixed batch of random features and tokens (`--batch-seconds` of `--utterance-seconds` utterances, 100 frames/s).
The median of `--steps` timed steps (after `--warmup`, each ended by a device synchronisation) gives the
throughput in audio seconds per second. The step's FLOPs are counted once (torch.utils.flop_counter, forward and
backward, attention's matrix products included through the math kernel). MFU is counted FLOPs per second over the
card's dense bf16 (or fp32) tensor peak from its datasheet (TABLE, or `--peak-tflops`); the fraction of the peak
measured in the same run (the best of five n^3 products in that precision) is printed beside it. Results go into
benchmarks/README.md ("GPU"). The last line is the JSON of every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, when loaded by path (tests)

from bench_encoder import gemm_peak  # noqa: E402

from edgeconformer.config import compose  # noqa: E402
from edgeconformer.files import write_text_atomic  # noqa: E402
from edgeconformer.hardware import synthetic_batch  # noqa: E402
from edgeconformer.models.lightning import build_model  # noqa: E402

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets: (name fragment, bf16, tf32). The
# first fragment found in torch.cuda.get_device_name() wins, so the more specific names come first.
TABLE = (
    ("H100 PCIe", 756.5, 378.0),
    ("H100 NVL", 835.5, 417.5),
    ("H100", 989.4, 494.7),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.5, 417.5),
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("L4", 121.0, 60.0),
)


def datasheet_peak(name: str, precision: str) -> float | None:
    """TFLOP/s of the card named `name` in `precision` (bf16 for mixed bf16, tf32 for 32-true), or None."""
    for fragment, bf16, tf32 in TABLE:
        if fragment in name:
            return bf16 if precision.startswith("bf16") else tf32
    return None


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision.startswith("bf16") else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(model, opt, batch, precision: str, device: torch.device, clip: float):
    mixed = precision != "32-true"

    def step():
        with torch.autocast(device.type, dtype=dtype_of(precision), enabled=mixed):
            loss = model(*batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def count_flops(model, batch, precision: str, device: torch.device) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype_of(precision), enabled=precision != "32-true"):
            loss = model(*batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(cfg, args, precision: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model, args.vocab).to(device).train()
    # fused AdamW on both devices (its update rule is the unfused one's)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    batch = synthetic_batch(cfg.model.n_mels, args.vocab, args.batch_seconds, args.utterance_seconds)
    batch = tuple(x.to(device) for x in batch)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "32-true"  # fp32 steps on tensor cores (TF32)
        torch.cuda.reset_peak_memory_stats(device)
    step = step_fn(model, opt, batch, precision, device, float(cfg.train.grad_clip))
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = count_flops(model, batch, precision, device)
    audio_s = float(batch[1].sum()) / 100
    achieved = flops / step_s
    sheet = args.peak_tflops or (
        datasheet_peak(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
    )
    measured = gemm_peak(args.peak_n, dtype=dtype_of(precision), device=device)
    return {
        "precision": precision,
        "step_s": step_s,
        "step_s_all": times,
        "audio_seconds_per_second": audio_s / step_s,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": achieved / 1e12,
        "datasheet_peak_tflops": sheet,
        "mfu": achieved / (sheet * 1e12) if sheet else None,
        "measured_peak_tflops": measured / 1e12,
        "fraction_of_measured_peak": achieved / measured,
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": list(batch[0].shape),
    }


def format_report(r: dict) -> str:
    lines = [f"{r['model']} on {r['device_name']}, batch {tuple(r['results'][0]['batch'])} (B, T, mels)"]
    for m in r["results"]:
        mfu = f"MFU {m['mfu']:.1%} of {m['datasheet_peak_tflops']:.0f} TFLOP/s" if m["mfu"] is not None else "MFU n/a"
        lines.append(
            f"{m['precision']:>10}: step {m['step_s'] * 1e3:.1f} ms, {m['audio_seconds_per_second']:.0f} audio s/s, "
            f"{m['gflop_per_step']:.0f} GFLOP/step, {m['achieved_tflops']:.3g} TFLOP/s, {mfu}, "
            f"{m['fraction_of_measured_peak']:.1%} of the measured matmul peak ({m['measured_peak_tflops']:.3g})"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides (default model=conformer_m)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--precision", default="bf16-mixed", help="comma-separated: bf16-mixed, 32-true")
    p.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (autotuning, allocator)")
    p.add_argument("--batch-seconds", type=float, default=320.0, help="audio seconds per batch")
    p.add_argument("--utterance-seconds", type=float, default=16.0, help="length of each utterance")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak, when TABLE does not know it")
    p.add_argument("--peak-n", type=int, default=8192, help="size of the product that measures the peak")
    p.add_argument("--json", default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    bad = [x for x in args.precision.split(",") if x not in ("bf16-mixed", "32-true")]
    if bad:
        p.error(f"--precision: {bad} (choose bf16-mixed, 32-true)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; --device cpu measures the same on the CPU")
    overrides = (
        args.overrides
        if any(o.startswith("model=") for o in args.overrides)
        else ["model=conformer_m", *args.overrides]
    )
    cfg = compose(overrides)
    results = [measure(cfg, args, p, device) for p in args.precision.split(",")]
    report = {
        "model": cfg.model.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    print(format_report(report))
    line = json.dumps(report)
    print(line)
    if args.json:
        write_text_atomic(args.json, line + "\n")
    return report


if __name__ == "__main__":
    main()
