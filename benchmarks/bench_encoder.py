"""CPU speed of our Conformer encoder against torchaudio's reference Conformer.

Both sides get the same front end (one of our Conv2dSubsampling modules, identical weights), so only the
Conformer blocks differ. Three encoders per size:

* ``torchaudio``: Conv2dSubsampling -> torchaudio.models.Conformer (vanilla MHSA, no positional encoding,
  BatchNorm in the convolution module);
* ``ours_abs``: our ConformerEncoder with pos="abs" (closest to torchaudio's MHSA);
* ``ours_rel``: our ConformerEncoder with pos="rel" (our default, Transformer-XL relative positions).

Two measurements, interleaved rep by rep (alternating the order) so that background load hits every
model alike:

1. training throughput, audio seconds per second: forward + backward + AdamW step on a padded batch of
   random 80-dim features (100 frames per second), loss = output.pow(2).mean();
2. batch-1 inference real-time factor (processing time / audio duration) in eval mode under
   torch.inference_mode().

Warm-up steps are excluded; every number is the median over the timed reps. Usage:

    python benchmarks/bench_encoder.py [--sizes small,conformer_s] [--reps 5] [--threads 2] [--json out.json]

The last line printed is a JSON object with every number (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torchaudio
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchaudio.models import Conformer

from edgeconformer.evaluate.rtf import machine_info
from edgeconformer.files import write_text_atomic
from edgeconformer.models.conformer import ConformerEncoder

MODELS = ("torchaudio", "ours_abs", "ours_rel")
FRAMES_PER_SECOND = 100  # 10 ms feature hop
IDIM = 80

# Sizes that are not in conf/model (the smoke test uses "tiny"); every other name is read from conf/model.
BUILTIN_SIZES = {
    "tiny": dict(
        d_model=32,
        n_layers=1,
        n_heads=4,
        ff_dim=64,
        kernel_size=7,
        dropout=0.1,
        norm="layer",
        subsampling_factor=4,
        subsampling_channels=8,
        dws_subsampling=False,
    )
}


def load_size(name: str) -> dict:
    """Encoder hyper-parameters of a size: a built-in one or conf/model/<name>.yaml composed by Hydra."""
    if name in BUILTIN_SIZES:
        return dict(BUILTIN_SIZES[name])
    from edgeconformer.config import compose

    model = compose([f"model={name}"]).model
    enc = model.encoder
    return dict(
        d_model=int(enc.d_model),
        n_layers=int(enc.n_layers),
        n_heads=int(enc.n_heads),
        ff_dim=int(enc.ff_dim),
        kernel_size=int(enc.kernel_size),
        dropout=float(enc.dropout),
        norm=str(enc.norm),
        subsampling_factor=int(model.subsampling_factor),
        subsampling_channels=model.subsampling_channels,
        dws_subsampling=model.subsampling == "dws",
    )


class TorchaudioEncoder(nn.Module):
    """Our front end followed by torchaudio's Conformer blocks; same (feats, lengths) interface as ours."""

    def __init__(self, subsampling: nn.Module, cfg: dict):
        super().__init__()
        self.subsampling = subsampling
        self.blocks = Conformer(
            input_dim=cfg["d_model"],
            num_heads=cfg["n_heads"],
            ffn_dim=cfg["ff_dim"],
            num_layers=cfg["n_layers"],
            depthwise_conv_kernel_size=cfg["kernel_size"],
            dropout=cfg["dropout"],
        )

    def forward(self, feats, lengths):
        x, lengths = self.subsampling(feats, lengths)
        return self.blocks(x, lengths)


def build_models(cfg: dict, seed: int = 0) -> dict[str, nn.Module]:
    def ours(pos):
        torch.manual_seed(seed)
        return ConformerEncoder(
            idim=IDIM,
            d_model=cfg["d_model"],
            n_layers=cfg["n_layers"],
            n_heads=cfg["n_heads"],
            ff_dim=cfg["ff_dim"],
            kernel_size=cfg["kernel_size"],
            dropout=cfg["dropout"],
            subsampling_factor=cfg["subsampling_factor"],
            dws_subsampling=cfg["dws_subsampling"],
            pos=pos,
            norm=cfg["norm"],
            subsampling_channels=cfg["subsampling_channels"],
        )

    models = {"ours_abs": ours("abs"), "ours_rel": ours("rel")}
    # Same seed => same front-end weights; copy them anyway so the comparison never rests on RNG order.
    models["ours_abs"].subsampling.load_state_dict(models["ours_rel"].subsampling.state_dict())
    torch.manual_seed(seed + 1)
    models["torchaudio"] = TorchaudioEncoder(copy.deepcopy(models["ours_rel"].subsampling), cfg)
    front = models["ours_rel"].subsampling.state_dict()
    for name, model in models.items():
        sd = model.subsampling.state_dict()
        assert sd.keys() == front.keys() and all(torch.equal(sd[k], front[k]) for k in front), name
    return {name: models[name] for name in ("torchaudio", "ours_abs", "ours_rel")}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_params(name: str, model: nn.Module) -> int:
    # Everything but the shared front end: the Conformer blocks (+ our positional encodings, parameter-free).
    return count_params(model) - count_params(model.subsampling)


def make_batch(batch: int, min_sec: float, max_sec: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = round(min_sec * FRAMES_PER_SECOND), round(max_sec * FRAMES_PER_SECOND)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    lengths[0] = hi  # the padded length is the maximum, whatever the draw
    feats = torch.randn(batch, hi, IDIM, generator=g)
    return feats, lengths


def train_step(model, opt, feats, lengths) -> float:
    t0 = time.perf_counter()
    out, _ = model(feats, lengths)
    loss = out.pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def step_flops(model, feats, lengths) -> int:
    """FLOPs counted in one training step (forward and backward; torch.utils.flop_counter, the math backend of
    scaled_dot_product_attention so attention's matrix products count) on a copy: the timed model is untouched."""
    net = copy.deepcopy(model).train()
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        out, _ = net(feats, lengths)
        out.pow(2).mean().backward()
    return counter.get_total_flops()


def gemm_peak(n: int = 1024, reps: int = 5, dtype: torch.dtype = torch.float32, device="cpu") -> float:
    """FLOP/s of the best of `reps` (n x n) @ (n x n) products (fp32 unless `dtype`) on the current threads or
    `device`: the machine's matrix product peak as this process sees it, measured beside the models it is compared
    with. On a GPU each product is timed to its end (synchronised)."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    cuda = torch.device(device).type == "cuda"

    def product():
        a @ b
        if cuda:
            torch.cuda.synchronize(device)

    product()  # warm-up
    best = min(timed(product) for _ in range(reps))
    return 2 * n**3 / best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def infer_call(model, feats, lengths, inner: int) -> float:
    # Mean time of `inner` consecutive forwards: one forward of a small model is only milliseconds.
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(inner):
            model(feats, lengths)
        return (time.perf_counter() - t0) / inner


def interleaved(fn, names, reps: int, warmup: int) -> dict[str, list[float]]:
    """Per model, `reps` timings of fn(name); warm-up calls first, then rep by rep with alternating order."""
    for _ in range(warmup):
        for name in names:
            fn(name)
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(fn(name))
    return times


def bench_size(size: str, cfg: dict, args) -> dict:
    models = build_models(cfg)
    result = {
        "size": size,
        "config": cfg,
        "params": {
            "front_end": count_params(models["ours_rel"].subsampling),
            **{f"{n}_blocks": block_params(n, m) for n, m in models.items()},
        },
    }

    # (1) training throughput
    feats, lengths = make_batch(args.batch, args.min_sec, args.max_sec, seed=1)
    audio_s = lengths.sum().item() / FRAMES_PER_SECOND
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    for m in models.values():
        m.train()
    steps = interleaved(lambda n: train_step(models[n], opts[n], feats, lengths), list(MODELS), args.reps, args.warmup)
    step_s = {n: statistics.median(t) for n, t in steps.items()}
    step_best = {n: min(t) for n, t in steps.items()}
    result["train"] = {
        "batch": args.batch,
        "padded_frames": feats.size(1),
        "audio_seconds": audio_s,
        "step_s": step_s,
        "step_s_best": step_best,
        "step_s_all": steps,
        "throughput": {n: audio_s / s for n, s in step_s.items()},
        "throughput_best": {n: audio_s / s for n, s in step_best.items()},
    }
    # Peak fraction: counted FLOPs per second of a (median) training step over the fp32 matrix-product peak
    # measured now, in the same process and precision: how much of the machine a step uses.
    flops = {n: step_flops(m, feats, lengths) for n, m in models.items()}
    peak = gemm_peak()
    result["train"]["step_gflop"] = {n: f / 1e9 for n, f in flops.items()}
    result["train"]["gemm_peak_gflops"] = peak / 1e9
    result["train"]["peak_fraction"] = {n: flops[n] / step_s[n] / peak for n in models}
    opts.clear()  # frees the optimizer states before the inference runs

    # (2) batch-1 inference RTF
    feats1, lengths1 = make_batch(1, args.rtf_sec, args.rtf_sec, seed=2)
    for m in models.values():
        m.eval()
    calls = interleaved(
        lambda n: infer_call(models[n], feats1, lengths1, args.infer_inner), list(MODELS), args.reps, args.warmup
    )
    call_s = {n: statistics.median(t) for n, t in calls.items()}
    call_best = {n: min(t) for n, t in calls.items()}
    result["infer"] = {
        "audio_seconds": args.rtf_sec,
        "inner": args.infer_inner,
        "call_s": call_s,
        "call_s_best": call_best,
        "call_s_all": calls,
        "rtf": {n: s / args.rtf_sec for n, s in call_s.items()},
        "rtf_best": {n: s / args.rtf_sec for n, s in call_best.items()},
    }

    # "ratios" compares medians (the headline numbers); "ratios_best" compares the fastest rep of each model,
    # the estimate least affected by other processes on a shared machine.
    for key, suffix in (("ratios", ""), ("ratios_best", "_best")):
        thr, rtf = result["train"]["throughput" + suffix], result["infer"]["rtf" + suffix]
        result[key] = {
            f"{n}/torchaudio": {"throughput": thr[n] / thr["torchaudio"], "rtf": rtf[n] / rtf["torchaudio"]}
            for n in ("ours_abs", "ours_rel")
        }
    return result


def format_report(report: dict) -> str:
    lines = [
        f"torch {report['torch']}, torchaudio {report['torchaudio']}, {report['threads']} thread(s), "
        f"median of {report['reps']} reps after {report['warmup']} warm-up, {report['machine']['cpu_model']}"
    ]
    for r in report["results"]:
        c, tr, inf = r["config"], r["train"], r["infer"]
        lines += [
            "",
            f"== {r['size']}: d={c['d_model']} x{c['n_layers']} blocks, {c['n_heads']} heads, ff {c['ff_dim']}, "
            f"kernel {c['kernel_size']}; front end {r['params']['front_end']:,} params (shared); "
            f"train batch {tr['batch']} ({tr['audio_seconds']:.1f} s audio, padded to {tr['padded_frames']} "
            f"frames), RTF on {inf['audio_seconds']:g} s",
            f"{'model':<11} {'block params':>13} {'train step s':>13} {'audio s / s':>12} {'(best)':>8} "
            f"{'RTF':>8} {'(best)':>8} {'GFLOP/step':>11} {'of peak':>8}",
        ]
        for n in MODELS:
            lines.append(
                f"{n:<11} {r['params'][n + '_blocks']:>13,} {tr['step_s'][n]:>13.3f} "
                f"{tr['throughput'][n]:>12.1f} {tr['throughput_best'][n]:>8.1f} "
                f"{inf['rtf'][n]:>8.4f} {inf['rtf_best'][n]:>8.4f} {tr['step_gflop'][n]:>11.2f} "
                f"{tr['peak_fraction'][n]:>8.1%}"
            )
        lines.append(f"fp32 matrix-product peak measured in this run: {tr['gemm_peak_gflops']:.0f} GFLOP/s")
        for k, v in r["ratios"].items():
            b = r["ratios_best"][k]
            lines.append(
                f"{k:<20} throughput x{v['throughput']:.2f} (best x{b['throughput']:.2f}; >1: ours faster)   "
                f"RTF x{v['rtf']:.2f} (best x{b['rtf']:.2f}; <1: ours faster)"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        default="small,conformer_s",
        help="comma-separated conf/model names (or 'tiny', a built-in smoke-test size)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed reps per model and measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed reps per model before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=16, help="utterances per training batch")
    p.add_argument("--min-sec", type=float, default=4.0, help="shortest training utterance (s)")
    p.add_argument("--max-sec", type=float, default=6.0, help="longest training utterance (s)")
    p.add_argument("--rtf-sec", type=float, default=6.0, help="length of the batch-1 inference utterance (s)")
    p.add_argument("--infer-inner", type=int, default=3, help="forwards averaged inside one inference rep")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = {
            "torch": torch.__version__,
            "torchaudio": torchaudio.__version__,
            "threads": args.threads,
            "reps": args.reps,
            "warmup": args.warmup,
            "machine": machine_info(args.threads),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()),
            "results": [],
        }
        t0 = time.perf_counter()
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            report["results"].append(bench_size(size, load_size(size), args))
        report["loadavg_end"] = list(os.getloadavg())
        report["wall_s"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    print(format_report(report))
    print(
        f"load average {report['loadavg_start'][0]:.2f} at start, {report['loadavg_end'][0]:.2f} at end "
        f"({os.cpu_count()} CPUs); wall {report['wall_s']:.0f} s"
    )
    line = json.dumps(report)
    if args.json:
        write_text_atomic(args.json, line + "\n")
    print(line)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
