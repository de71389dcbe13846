"""Latency of the Practical Conformer configuration (conf/experiment/practical.yaml, Botros et al. 2023) against the
baseline Conformer of the same depth, measured side by side in one process.

* ``baseline``: model=small with DWS subsampling, causal convolutions and the same chunk size: every first-pass
  block is a softmax-attention Conformer block at the full width (a streaming Conformer);
* ``practical``: +experiment=practical: convolution-only lower blocks, downsized Performer upper blocks (the
  streamed first pass), plus the non-causal second pass of the cascade.

Measurements, batch 1, eval mode, torch.inference_mode(), fixed torch threads, random 80-dim features:

1. streaming: the utterance is fed chunk by chunk (chunk_size encoder frames = 4 x chunk_size feature frames) to
   `ConformerEncoder.stream` with carried state, plus the (first-pass) CTC head: the latency of one call, its
   median over the utterance, and the streaming RTF (sum of the calls / audio seconds);
2. full utterance: one `encode` + CTC head on the whole utterance (the practical model runs both passes);
3. parameters, FLOPs per audio second (edgeconformer.evaluate.flops: the whole model incl. attention decoder, and
   the streamed first pass alone), and the attention state a streaming step reads: softmax key/value caches grow
   with the context, Performer states do not; the projected relative-position embeddings (softmax blocks with
   relative positions, input-independent, grow with the context) and convolution caches are listed apart.

Warm-up reps are excluded; reps alternate the model order; headline numbers are medians over reps. Usage:

    python benchmarks/bench_practical.py [--seconds 10] [--chunk 8] [--reps 7] [--threads 2] [--json out.json]
    python benchmarks/bench_practical.py --quick          # tiny sizes, seconds of runtime (the smoke test)

The last line printed is a JSON object with every number (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from edgeconformer.config import compose
from edgeconformer.evaluate.flops import count_flops, count_params, counted_flops
from edgeconformer.evaluate.rtf import machine_info
from edgeconformer.files import write_text_atomic
from edgeconformer.models.lightning import build_model

MODELS = ("baseline", "practical")
FRAMES_PER_SECOND = 100  # 10 ms feature hop

QUICK_COMMON = [
    "model.encoder.d_model=32",
    "model.encoder.n_layers=2",
    "model.encoder.n_heads=2",
    "model.encoder.ff_dim=64",
    "model.encoder.kernel_size=7",
    "model.subsampling_channels=8",
    "model.decoder.n_heads=2",
    "model.decoder.ff_dim=64",
]
QUICK_PRACTICAL = [
    "model.encoder.conv_only_layers=1",
    "model.encoder.performer_features=16",
    "model.encoder.stages=[{n_layers:1,d_model:32},{n_layers:1,d_model:24,n_heads:2,ff_dim:48}]",
    "model.cascade.n_layers=1",
    "model.cascade.d_model=32",
    "model.cascade.n_heads=2",
    "model.cascade.ff_dim=64",
]


def configs(args) -> dict[str, dict]:
    """Composed model configs of both sides (conf/ through Hydra, so the experiment file is what is measured)."""
    common = [
        "model.subsampling=dws",
        f"model.encoder.chunk_size={args.chunk}",
        "model.encoder.left_chunks=-1",
        *(QUICK_COMMON if args.quick else []),
    ]
    base = compose(["model.encoder.causal=true", "model.encoder.dynamic_chunk=false", *common])
    prac = compose(["+experiment=practical", *common, *(QUICK_PRACTICAL if args.quick else [])])
    return {
        "baseline": OmegaConf.to_container(base.model, resolve=True),
        "practical": OmegaConf.to_container(prac.model, resolve=True),
        "vocab_size": int(base.data.tokenizer.vocab_size),
    }


def first_pass_ctc(model, x):
    # Log-probabilities of the streamed pass: the cascade's first-pass head, else the model's CTC head.
    return model.first_pass_log_probs(x) if hasattr(model, "first_pass_log_probs") else model.ctc_log_probs(x)


class FirstPass(nn.Module):
    """The streamed part as one module call (for FLOP counting): encoder first pass + its CTC head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats, lengths):
        first, _, _ = self.model.encoder.forward_passes(feats, lengths, second_pass=False)
        return first_pass_ctc(self.model, first)


def stream_once(model, feats, chunk_frames):
    """Feeds feats (1, T, F) in pieces of chunk_frames -> per-call seconds and the final streaming state."""
    enc = model.encoder
    state = enc.stream_init(1)
    calls, T = [], feats.size(1)
    with torch.inference_mode():
        for s in range(0, T, chunk_frames):
            t0 = time.perf_counter()
            out, state = enc.stream(feats[:, s : s + chunk_frames], state, final=s + chunk_frames >= T)
            if out.size(1):
                first_pass_ctc(model, out)
            calls.append(time.perf_counter() - t0)
    return calls, state


def full_once(model, feats, lengths) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out, out_lengths = model.encode(feats, lengths)
        model.ctc_log_probs(out)
        return time.perf_counter() - t0


def interleaved(fn, names, reps: int, warmup: int) -> dict[str, list]:
    """Per model, `reps` results of fn(name); warm-up calls first, then rep by rep with alternating order."""
    for _ in range(warmup):
        for name in names:
            fn(name)
    out = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(fn(name))
    return out


def attention_state(model, feats, chunk_frames, seconds_list) -> dict:
    """Streaming state bytes (attention, relative positions, convolution) after each of seconds_list seconds."""
    out = {}
    for s in seconds_list:
        _, state = stream_once(model, feats[:, : int(s * FRAMES_PER_SECOND)], chunk_frames)
        out[f"{s:g}"] = model.encoder.stream_state_bytes(state)
    return out


def bench(args) -> dict:
    cfgs = configs(args)
    models = {}
    for name in MODELS:
        torch.manual_seed(0)
        models[name] = build_model(cfgs[name], cfgs["vocab_size"]).eval()
    factor = cfgs["baseline"]["subsampling_factor"]
    chunk_frames = args.chunk * factor  # feature frames per streaming call
    T = int(args.seconds * FRAMES_PER_SECOND)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, T, cfgs["baseline"]["n_mels"], generator=gen)
    lengths = torch.tensor([T])

    streams = interleaved(
        lambda n: stream_once(models[n], feats, chunk_frames)[0], list(MODELS), args.reps, args.warmup
    )
    fulls = interleaved(lambda n: full_once(models[n], feats, lengths), list(MODELS), args.reps, args.warmup)
    firsts = interleaved(lambda n: first_only(models[n], feats, lengths), list(MODELS), args.reps, args.warmup)

    result = {
        "config": {
            "seconds": args.seconds,
            "chunk_size": args.chunk,
            "chunk_ms": chunk_frames * 10,
            "calls": len(streams["baseline"][0]),
            "models": {n: cfgs[n] for n in MODELS},
        }
    }
    per = {}
    for n, model in models.items():
        medians = [statistics.median(c) for c in streams[n]]  # per rep: median call latency over the utterance
        totals = [sum(c) for c in streams[n]]
        flops = count_flops(model, args.seconds)
        first_flops, _ = counted_flops(FirstPass(model), feats, lengths)
        state_at = attention_state(model, feats, chunk_frames, sorted({min(1.0, args.seconds), args.seconds}))
        per[n] = {
            "params": count_params(model),
            "encoder_params": count_params(model.encoder),
            "gflops_per_audio_second": flops["gflops_per_audio_second"],
            "first_pass_gflops_per_audio_second": first_flops / 1e9 / args.seconds,
            "stream_call_ms": 1e3 * statistics.median(medians),
            "stream_call_ms_best": 1e3 * min(medians),
            "stream_call_ms_last": 1e3 * statistics.median([c[-1] for c in streams[n]]),  # at the longest context
            "stream_call_ms_all": [[round(1e3 * x, 4) for x in c] for c in streams[n]],
            "stream_rtf": statistics.median(totals) / args.seconds,
            "full_s": statistics.median(fulls[n]),
            "full_rtf": statistics.median(fulls[n]) / args.seconds,
            "first_pass_full_s": statistics.median(firsts[n]),
            "attention_state_bytes": {s: b["attention"] for s, b in state_at.items()},
            "position_state_bytes": {s: b["positions"] for s, b in state_at.items()},
            "conv_state_bytes": {s: b["conv"] for s, b in state_at.items()},
        }
    result["models"] = per
    b, p = per["baseline"], per["practical"]
    result["ratios"] = {  # baseline / practical: > 1 means the practical configuration is faster / smaller
        "stream_call_latency": b["stream_call_ms"] / p["stream_call_ms"],
        "stream_call_latency_best": b["stream_call_ms_best"] / p["stream_call_ms_best"],
        "stream_call_latency_last": b["stream_call_ms_last"] / p["stream_call_ms_last"],
        "stream_rtf": b["stream_rtf"] / p["stream_rtf"],
        "full_utterance_latency": b["full_s"] / p["full_s"],
        "first_pass_full_latency": b["first_pass_full_s"] / p["first_pass_full_s"],
        "first_pass_flops": b["first_pass_gflops_per_audio_second"] / p["first_pass_gflops_per_audio_second"],
        "attention_state": b["attention_state_bytes"][f"{args.seconds:g}"]
        / max(1, p["attention_state_bytes"][f"{args.seconds:g}"]),
    }
    return result


def first_only(model, feats, lengths) -> float:
    # The streamed pass run once over the whole utterance (non-streaming), with its CTC head.
    with torch.inference_mode():
        t0 = time.perf_counter()
        FirstPass(model)(feats, lengths)
        return time.perf_counter() - t0


def format_report(report: dict) -> str:
    r = report["result"]
    c = r["config"]
    lines = [
        f"torch {report['torch']}, {report['threads']} thread(s), median of {report['reps']} reps after "
        f"{report['warmup']} warm-up, {report['machine']['cpu_model']}",
        f"{c['seconds']:g} s utterance, batch 1, streamed in chunks of {c['chunk_size']} encoder frames "
        f"({c['chunk_ms']} ms, {c['calls']} calls)",
        f"{'model':<10} {'params':>10} {'GFLOPs/s':>9} {'1st pass':>9} {'call ms':>8} {'(best)':>7} "
        f"{'last ms':>8} {'str. RTF':>9} {'full RTF':>9} {'attn state B':>13} {'pos. state B':>13} "
        f"{'conv state B':>13}",
    ]
    end = f"{c['seconds']:g}"
    for n in MODELS:
        m = r["models"][n]
        lines.append(
            f"{n:<10} {m['params']:>10,} {m['gflops_per_audio_second']:>9.3f} "
            f"{m['first_pass_gflops_per_audio_second']:>9.3f} {m['stream_call_ms']:>8.3f} "
            f"{m['stream_call_ms_best']:>7.3f} {m['stream_call_ms_last']:>8.3f} {m['stream_rtf']:>9.4f} "
            f"{m['full_rtf']:>9.4f} {m['attention_state_bytes'][end]:>13,} "
            f"{m['position_state_bytes'][end]:>13,} {m['conv_state_bytes'][end]:>13,}"
        )
    q = r["ratios"]
    lines.append(
        f"baseline/practical: streaming call latency x{q['stream_call_latency']:.2f} "
        f"(best x{q['stream_call_latency_best']:.2f}, at the longest context x"
        f"{q['stream_call_latency_last']:.2f}), streaming RTF x{q['stream_rtf']:.2f}, full utterance "
        f"x{q['full_utterance_latency']:.2f} (first pass only x{q['first_pass_full_latency']:.2f}), "
        f"first-pass FLOPs x{q['first_pass_flops']:.2f}, attention state x{q['attention_state']:.1f}"
    )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="utterance length (s)")
    p.add_argument("--chunk", type=int, default=8, help="streaming chunk, encoder frames (x40 ms)")
    p.add_argument("--reps", type=int, default=7, help="timed reps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed reps per model before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a 2 s utterance, 1 rep (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report here (atomically)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.reps, args.warmup = min(args.seconds, 2.0), 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = {
            "torch": torch.__version__,
            "threads": args.threads,
            "reps": args.reps,
            "warmup": args.warmup,
            "quick": args.quick,
            "machine": machine_info(args.threads),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()),
        }
        t0 = time.perf_counter()
        report["result"] = bench(args)
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
