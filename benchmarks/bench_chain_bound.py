"""The least time the chain's training can take on this machine, and how close a finished chain came to it.

    .venv/bin/python benchmarks/bench_chain_bound.py                              # the runs of params.yaml
    .venv/bin/python benchmarks/bench_chain_bound.py --runs-json trained/runs.json --every 1

For every run of the chain (`runs` of the params file: variant x seed, each composed as the train_runs stage composes
it), the FLOPs of its training steps are counted (torch.utils.flop_counter: forward and backward of the model on the
run's real batches, attention's products included) on every `--every`-th batch of its first epoch; FLOPs per padded
frame of that sample, times the padded frames of all the batches the run trains on (every epoch's own composition),
give the run's work. The sum over the runs, divided by the machine's fp32 matrix-product peak measured in this run
(the faster of one thread's n^3 product times the usable cores, and the product on all of them at once), is a lower
bound on the training stage's wall time in fp32: no kernel, schedule or packing of the runs beats the peak on every
core for the whole stage. Validation, test decoding, checkpoints, features and the optimizer are left out; they only
add. Where the CPU has bf16 instructions, the bound at the bf16 peak is printed too.

With `--runs-json` (a finished chain's trained/runs.json) the stage's measured wall time and the fraction of the
peak it sustained are printed beside the bound. It needs the prepared corpus (`dvc repro tokenize`). The last line
is the JSON of every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, when loaded by path (tests)

from bench_encoder import gemm_peak  # noqa: E402
from bench_train_profile import build_module, train_sampler, train_split  # noqa: E402

from edgeconformer.data.datamodule import collate_features  # noqa: E402
from edgeconformer.files import write_text_atomic  # noqa: E402
from edgeconformer.hardware import cpu_bf16  # noqa: E402
from edgeconformer.stages.train import run_config, run_overrides  # noqa: E402

FRAME_SHIFT_S = 0.01  # feature frames per second of audio: 100


def padded_frames(sampler, lengths: list[int], steps: int) -> list[int]:
    """Padded frames (batch size x longest) of each of the first `steps` batches the run trains on, epoch after
    epoch, each epoch with its own shuffled composition (the sampler's set_epoch, as Lightning calls it)."""
    out, epoch = [], 0
    while len(out) < steps:
        sampler.set_epoch(epoch)
        for batch in sampler:
            out.append(len(batch) * max(lengths[i] for i in batch))
            if len(out) == steps:
                break
        epoch += 1
    return out


def count_flops(module, batch) -> int:
    """FLOPs of one training step's forward and backward (the math attention backend, so its products count)."""
    feats, lengths = module._batch_features(batch)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        out = module.model(feats, lengths, batch["tokens"], batch["token_lengths"])
        out["loss"].backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_work(cfg, module, train_set, every: int) -> dict:
    """One run's counted training work: a sample of its first epoch's batches, scaled by padded frames."""
    sampler = train_sampler(cfg, train_set)
    lengths = [f.size(0) for f in train_set.feats]
    per_epoch = len(sampler)
    steps = int(cfg.train.max_steps) if int(cfg.train.max_steps) > 0 else int(cfg.train.max_epochs) * per_epoch
    sampler.set_epoch(0)
    sample = list(iter(sampler))[::every]
    if not sample:
        raise SystemExit(f"{cfg.data.out_dir}: the training split has no batches; run `dvc repro tokenize` first")
    module.train()
    flops, frames = [], []
    for idx in sample:
        flops.append(count_flops(module, collate_features([train_set[i] for i in idx])))
        frames.append(len(idx) * max(lengths[i] for i in idx))
    per_frame = sum(flops) / sum(frames)
    total_frames = sum(padded_frames(sampler, lengths, steps))
    return {
        "steps": steps,
        "batches_per_epoch": per_epoch,
        "sampled_batches": len(sample),
        "padded_audio_seconds": total_frames * FRAME_SHIFT_S,
        "mflop_per_padded_frame": per_frame / 1e6,
        "mflop_per_padded_frame_range": [
            min(f / n for f, n in zip(flops, frames)) / 1e6,
            max(f / n for f, n in zip(flops, frames)) / 1e6,
        ],
        "tflop": per_frame * total_frames / 1e12,
    }


def chain_work(params: str, overrides: list[str], every: int) -> dict:
    """Every run's work; the features of a training split are computed once for the runs that share them."""
    cfg = OmegaConf.merge(OmegaConf.load(params), OmegaConf.from_dotlist(overrides))
    splits, out = {}, {}
    for name, run in dict(cfg.runs).items():
        rcfg = run_config(params, [*overrides, *run_overrides(run, cfg)])
        module = build_module(rcfg)
        key = json.dumps(  # what the features depend on: the corpus, the duration filters and the filterbank
            [OmegaConf.to_container(rcfg[k], resolve=True) for k in ("data", "train")] + [int(rcfg.model.n_mels)],
            sort_keys=True,
        )
        if key not in splits:
            splits[key] = train_split(rcfg, module)
        t0 = time.perf_counter()
        out[name] = {"variant": str(run.variant), "seed": int(run.seed), **run_work(rcfg, module, splits[key], every)}
        print(
            f"{name}: {out[name]['tflop']:.1f} TFLOP in {out[name]['steps']} steps ({time.perf_counter() - t0:.0f} s)"
        )
    return out


def peaks(cores: int) -> dict:
    """fp32 (and, with bf16 instructions, bf16) matrix-product peaks in GFLOP/s: the faster of one thread's times the
    cores (the stage's one-thread runs side by side) and all threads in one process."""

    def one_and_all(dtype):
        torch.set_num_threads(1)
        one = gemm_peak(dtype=dtype) / 1e9
        torch.set_num_threads(cores)
        return one, gemm_peak(dtype=dtype) / 1e9

    one, every = one_and_all(torch.float32)
    out = {
        "cores": cores,
        "one_thread_gflops": one,
        "all_threads_gflops": every,
        "fp32_gflops": max(one * cores, every),
    }
    if cpu_bf16():  # without the instructions bf16 is emulated, slower than fp32: no bound from it
        one16, every16 = one_and_all(torch.bfloat16)
        out["bf16_gflops"] = max(one16 * cores, every16)
    return out


def report(runs: dict, peak: dict, measured: dict | None) -> dict:
    total = sum(r["tflop"] for r in runs.values())
    r = {"runs": runs, "total_tflop": total, "peak": peak, "bound_s": total * 1e3 / peak["fp32_gflops"]}
    if "bf16_gflops" in peak:
        r["bound_bf16_s"] = total * 1e3 / peak["bf16_gflops"]
    if measured:
        r["measured"] = {**measured, "peak_fraction": total * 1e3 / measured["wall_seconds"] / peak["fp32_gflops"]}
    return r


def format_report(r: dict) -> str:
    p = r["peak"]
    lines = [f"{'run':<16} {'steps':>6} {'padded audio h':>15} {'MFLOP/frame':>12} {'TFLOP':>8}"]
    for name, run in r["runs"].items():
        lines.append(
            f"{name:<16} {run['steps']:>6} {run['padded_audio_seconds'] / 3600:>15.2f} "
            f"{run['mflop_per_padded_frame']:>12.2f} {run['tflop']:>8.1f}"
        )
    lines += [
        f"all runs: {r['total_tflop']:.1f} TFLOP of training steps",
        f"fp32 matrix-product peak: {p['one_thread_gflops']:.0f} GFLOP/s on one thread x {p['cores']} cores, "
        f"{p['all_threads_gflops']:.0f} on all threads at once -> {p['fp32_gflops']:.0f}",
        f"lower bound of the training stage in fp32: {r['bound_s'] / 60:.1f} min",
    ]
    if "bound_bf16_s" in r:
        lines.append(f"at the bf16 peak ({p['bf16_gflops']:.0f} GFLOP/s): {r['bound_bf16_s'] / 60:.1f} min")
    if "measured" in r:
        m = r["measured"]
        lines.append(
            f"measured training stage: {m['wall_seconds'] / 60:.1f} min, {m['peak_fraction']:.0%} of the fp32 peak "
            f"sustained (x{m['wall_seconds'] / r['bound_s']:.2f} the bound)"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="the chain's params file (its `runs`)")
    p.add_argument("--every", type=int, default=10, help="count the FLOPs of every N-th batch of epoch 0 (1: all)")
    p.add_argument("--runs-json", type=Path, default=None, help="a finished chain's trained/runs.json")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.out_dir=/path/prepared")
    args = p.parse_args(argv)
    if args.every < 1:
        p.error("--every must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    measured = None
    if args.runs_json:
        try:
            measured = {"wall_seconds": float(json.loads(args.runs_json.read_text())["wall_seconds"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{args.runs_json}: no wall_seconds of a finished train_runs stage ({e})") from None
    runs = chain_work(args.params, args.overrides, args.every)
    r = report(runs, peaks(cores), measured)
    r.update({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "every": args.every})
    print(format_report(r))
    line = json.dumps(r, default=float)
    print(line)
    if args.json:
        write_text_atomic(args.json, line + "\n")
    return r


if __name__ == "__main__":
    main()
