"""Long-form transcription: peak memory and RTF against length, and the WER cost of windowing.

Two parts, each printing ratios against a baseline measured in the same run:

* memory: a recording of each length in --minutes (test utterances one after another, cycled, 0.4 s apart;
  synthetic bursts without --manifest) is transcribed by `edgeconformer transcribe`'s code path in a fresh
  process, which reports its peak RSS (getrusage) and compute time. Baseline: a process transcribing
  --short-utterances test utterances one by one (batch 1), whose RTF is the short-utterance RTF and whose peak RSS
  is what loading the model and decoding utterances costs anyway. --whole-minutes adds the control: the same
  recordings decoded whole (full attention over every frame), whose memory grows with the square of the length.
* wer (needs --manifest): a --wer-minutes recording of test utterances, decoded long-form with each
  --configs chunk:context pair, against the same utterances decoded one by one (paired differences with 95%
  bootstrap CIs over utterances; the noise floor: the same utterances one by one after --shift-ms of silence);
  and, on groups of --group-minutes (short enough to decode whole), whole-input decoding against long-form and
  against the encoder's chunked attention (the streaming path's masks: --stream-chunk encoder frames per chunk,
  unlimited or --stream-left chunks of left context).

    python benchmarks/bench_longform.py --model models/dws --manifest data/prepared/manifests/test.jsonl \
        --part memory --minutes 10,60 --threads 1
    python benchmarks/bench_longform.py --model models/dws --manifest data/prepared/manifests/test.jsonl \
        --part wer --wer-minutes 20 --configs 8:1,8:2,4:1,16:2

The last line printed is a JSON object with every number (--json also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf

GAP_SECONDS = 0.4
SAMPLE_RATE = 16000


# ------------------------------------------------------------------------------------------------ recordings
def utterances(manifest: str | None, seed: int = 0) -> list[dict]:
    from edgeconformer.files import read_jsonl

    return read_jsonl(Path(manifest)) if manifest else []


def synthetic_burst(seconds: float, rng) -> np.ndarray:
    # noisy tones: stands in for speech when no manifest is given (RTF and memory only)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * rng.uniform(150, 600) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def build_recording(rows: list[dict], path: Path, minutes: float) -> tuple[str, list[int], list[float]]:
    """Utterances of rows, cycled, GAP_SECONDS of silence after each, written block by block until `minutes` are
    reached; returns (reference text, indices of the rows used, start second of each)."""
    rng = np.random.default_rng(0)
    texts, used, starts, seconds, k = [], [], [], 0.0, 0
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, subtype="PCM_16") as f:
        while seconds < minutes * 60:
            if rows:
                row = rows[k % len(rows)]
                x, sr = sf.read(row["audio_filepath"], dtype="float32")
                assert sr == SAMPLE_RATE, f"{row['audio_filepath']}: {sr} Hz; the benchmark expects 16 kHz"
                texts.append(row["text"])
                used.append(k % len(rows))
                starts.append(seconds)
            else:
                x = synthetic_burst(rng.uniform(1.0, 4.0), rng)
            f.write(np.concatenate([x, gap]))
            seconds += x.size / SAMPLE_RATE + GAP_SECONDS
            k += 1
    return " ".join(texts), used, starts


def paired_delta(refs: list[str], one: list[str], long: list[str], resamples: int = 2000) -> dict:
    """Long-form minus one-by-one WER (points) over the same utterances, with a 95% bootstrap CI over them."""
    from edgeconformer.scoring import score

    ids = [str(i) for i in range(len(refs))]
    a = np.array([u["errors"] for u in score(refs, one, ids)["utterances"]])
    b = np.array([u["errors"] for u in score(refs, long, ids)["utterances"]])
    n = np.array([len(r.split()) for r in refs])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(refs), (resamples, len(refs)))
    boot = 100 * (b[idx].sum(1) - a[idx].sum(1)) / n[idx].sum(1)
    return {
        "delta": 100 * (b.sum() - a.sum()) / n.sum(),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "utterances_changed": int(sum(x != y for x, y in zip(one, long))),
    }


def words_by_utterance(words: list[dict], starts: list[float]) -> list[str]:
    """Long-form words -> one text per utterance of the recording: a word belongs to the utterance whose stretch
    (from half a gap before its start to half a gap before the next one) holds the word's middle."""
    import bisect

    per: list[list[str]] = [[] for _ in starts]
    edges = [s - GAP_SECONDS / 2 for s in starts[1:]]
    for w in words:
        per[bisect.bisect_right(edges, (w["start"] + w["end"]) / 2)].append(w["word"])
    return [" ".join(p) for p in per]


# ------------------------------------------------------------------------------------------------ child process
def child(args) -> None:
    """Runs in a fresh process: load the model, transcribe, print peak RSS and timings as JSON."""
    import torch

    from edgeconformer.cli import load_trained
    from edgeconformer.longform import Settings, decoding_defaults, transcribe_items
    from edgeconformer.transcribe_io import Item

    torch.set_num_threads(args.threads)
    module = load_trained(args.model)
    s = Settings(
        **{**decoding_defaults(module), "method": args.method},
        first_pass=args.first_pass,
        max_segment_seconds=1e9 if args.child == "whole" else 20.0,
    )
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    items = [Item(p) for p in args.inputs]
    t0 = time.perf_counter()
    outcomes = list(transcribe_items(module, items, s, batch_size=1))
    wall = time.perf_counter() - t0
    errors = [o.error for o in outcomes if o.error]
    assert not errors, errors
    audio = sum(o.transcript.seconds for o in outcomes)
    print(
        json.dumps(
            {
                "mode": args.child,
                "audio_seconds": audio,
                "compute_seconds": wall,
                "rtf": wall / audio,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_load_mb": loaded,
                "files": len(items),
            }
        )
    )


def run_child(args, mode: str, inputs: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(inputs))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--method",
        args.method,
        "--inputs-file",
        f.name,
    ] + (["--first-pass"] if args.first_pass else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(f.name)
    if proc.returncode:
        raise SystemExit(f"{mode} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ parts
def memory_part(args, rows, tmp: Path) -> dict:
    short = [r["audio_filepath"] for r in rows[: args.short_utterances]]
    if not short:  # no manifest: synthetic utterances of 1-4 s
        rng = np.random.default_rng(1)
        for i in range(args.short_utterances):
            sf.write(tmp / f"short{i}.flac", synthetic_burst(rng.uniform(1.0, 4.0), rng), SAMPLE_RATE)
            short.append(str(tmp / f"short{i}.flac"))
    base = run_child(args, "longform", short)
    print(
        f"baseline: {len(short)} utterances one by one ({base['audio_seconds']:.0f} s): RTF {base['rtf']:.4f}, "
        f"peak RSS {base['peak_rss_mb']:.0f} MB"
    )
    results = []
    lengths = [("longform", float(m)) for m in args.minutes.split(",") if m] + [
        ("whole", float(m)) for m in args.whole_minutes.split(",") if m
    ]
    for mode, minutes in lengths:
        path = tmp / f"{minutes:g}min.flac"
        if not path.exists():
            build_recording(rows, path, minutes)
        r = run_child(args, mode, [str(path)])
        r.update(
            minutes=minutes,
            rtf_ratio=r["rtf"] / base["rtf"],
            peak_ratio=r["peak_rss_mb"] / base["peak_rss_mb"],
            peak_growth_mb=r["peak_rss_mb"] - base["peak_rss_mb"],
        )
        results.append(r)
        print(
            f"{mode:8s} {minutes:6.1f} min: peak RSS {r['peak_rss_mb']:7.0f} MB ({r['peak_ratio']:.2f}x baseline, "
            f"{r['peak_growth_mb']:+.0f} MB), RTF {r['rtf']:.4f} ({r['rtf_ratio']:.2f}x short-utterance RTF)"
        )
    return {"baseline": base, "lengths": results}


def wer_part(args, rows, tmp: Path) -> dict:
    import torch

    from edgeconformer.cli import load_trained
    from edgeconformer.data.tokenizer import BLANK_ID
    from edgeconformer.decoding import decode
    from edgeconformer.longform import (
        Settings,
        decoding_defaults,
        encode,
        transcribe_batch,
        transcribe_items,
        transcribe_long,
    )
    from edgeconformer.scoring import score
    from edgeconformer.transcribe_io import Item, read_audio, read_blocks

    torch.set_num_threads(args.threads)
    module = load_trained(args.model)
    defaults = {**decoding_defaults(module), "method": args.method, "first_pass": args.first_pass}

    def wer(ref: str, hyp: str) -> float:
        return score([ref], [hyp], ["all"])["wer"]

    out: dict = {"method": args.method}
    # 1. a long recording: long-form with each window config vs the same utterances one by one
    path = tmp / "wer.flac"
    reference, used, starts = build_recording(rows, path, args.wer_minutes)
    refs = [rows[k]["text"] for k in used]
    t0 = time.perf_counter()
    one = [
        o.transcript.text
        for o in transcribe_items(module, [Item(rows[k]["audio_filepath"]) for k in used], Settings(**defaults))
    ]
    out["utterances"] = {"wer": wer(reference, " ".join(one)), "n": len(used), "seconds": time.perf_counter() - t0}
    print(
        f"{args.wer_minutes:g}-minute recording of {len(used)} test utterances ({args.method}): one by one WER "
        f"{out['utterances']['wer']:.2f}%"
    )
    # The noise floor: the same utterances one by one, each after --shift-ms of silence. A window or a segment
    # starts on the 40 ms frame grid of the recording, not where an utterance file starts.
    if args.shift_ms > 0:
        pad = torch.zeros(int(args.shift_ms * SAMPLE_RATE / 1000))
        audio = {k: torch.cat([pad, read_audio(rows[k]["audio_filepath"])]) for k in set(used)}
        shifted = []
        for i in range(0, len(used), 16):
            shifted += [
                t.text for t in transcribe_batch(module, [audio[k] for k in used[i : i + 16]], Settings(**defaults))
            ]
        r = {
            "shift_ms": args.shift_ms,
            "wer": wer(reference, " ".join(shifted)),
            "paired": paired_delta(refs, one, shifted),
        }
        out["utterances_shifted"] = r
        lo, hi = r["paired"]["ci95"]
        print(
            f"  one by one after {args.shift_ms:g} ms of silence: WER {r['wer']:.2f}% "
            f"({r['paired']['delta']:+.2f} points, 95% CI {lo:+.2f} to {hi:+.2f})"
        )
    out["longform"] = []
    for config in args.configs.split(","):
        chunk, context = map(float, config.split(":"))
        s = Settings(**defaults, chunk_seconds=chunk, context_seconds=context, timestamps=True)
        t0 = time.perf_counter()
        t = transcribe_long(module, read_blocks(str(path)), s)
        r = {
            "chunk_seconds": chunk,
            "context_seconds": context,
            "wer": wer(reference, t.text),
            "segments": t.segments,
            "compute_seconds": time.perf_counter() - t0,
        }
        r["wer_delta"] = r["wer"] - out["utterances"]["wer"]
        # the same difference per utterance (words assigned by their timestamps), for a confidence interval
        r["paired"] = paired_delta(refs, one, words_by_utterance(t.words, starts))
        out["longform"].append(r)
        lo, hi = r["paired"]["ci95"]
        print(
            f"  long-form chunk {chunk:g} s, context {context:g} s: WER {r['wer']:.2f}% "
            f"({r['wer_delta']:+.2f} points; per utterance {r['paired']['delta']:+.2f}, 95% CI {lo:+.2f} to "
            f"{hi:+.2f}), {t.segments} segments, RTF {r['compute_seconds'] / t.seconds:.4f}"
        )

    # 2. groups short enough to decode whole: whole vs long-form vs chunked attention
    if args.group_minutes <= 0:
        return out
    groups, members, k = [], [], 0
    while k < len(rows):
        audio, texts, seconds = [], [], 0.0
        members.append([])
        while k < len(rows) and seconds < args.group_minutes * 60:
            x, _ = sf.read(rows[k]["audio_filepath"], dtype="float32")
            audio += [x, np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)]
            texts.append(rows[k]["text"])
            members[-1].append(k)
            seconds += x.size / SAMPLE_RATE + GAP_SECONDS
            k += 1
        groups.append((torch.from_numpy(np.concatenate(audio)), " ".join(texts)))
    refs = [t for _, t in groups]
    enc = module.model.encoder
    s = Settings(**{**defaults, "method": "ctc_greedy"})  # one decoder for every row: only the encoding differs
    alone = [o.transcript.text for o in transcribe_items(module, [Item(r["audio_filepath"]) for r in rows], s)]
    hyps: dict[str, list[str]] = {
        "utterances": [" ".join(alone[k] for k in m) for m in members],
        "whole": [],
        "longform": [],
    }
    # the chunked-attention rows: a full-context encoder run with the streaming path's masks (for a first pass,
    # already chunk-masked and causal, whole-input decoding is exactly what streaming it gives)
    chunked = [] if args.first_pass else [(args.stream_chunk, -1), (args.stream_chunk, args.stream_left)]
    for c, left in chunked:
        hyps[f"chunked_{c}_left{left}"] = []
    with torch.inference_mode():
        for x, _ in groups:
            n = torch.tensor([x.numel()])
            _, lp, _ = encode(module, x[None], n, args.first_pass)
            hyps["whole"].append(module.tokenizer.decode(decode("ctc_greedy", lp[0], blank=BLANK_ID)))
            hyps["longform"].append(transcribe_long(module, [x], s).text)
            feats, lengths = module.features(x[None], n)
            for c, left in chunked:
                o, _ = module.model.encode(feats, lengths, chunk_size=c, left_chunks=left)
                ids = decode("ctc_greedy", module.model.ctc_log_probs(o)[0], blank=BLANK_ID)
                hyps[f"chunked_{c}_left{left}"].append(module.tokenizer.decode(ids))
    ids = [f"group{i}" for i in range(len(groups))]
    out["groups"] = {
        "minutes": args.group_minutes,
        "n": len(groups),
        "causal": bool(enc.blocks[0].conv.causal),
        "trained_chunk_size": enc.chunk_size,
    }
    whole_wer = score(refs, hyps["whole"], ids)["wer"]
    print(f"{len(groups)} groups of ~{args.group_minutes:g} min (greedy CTC): whole-input WER {whole_wer:.2f}%")
    for name, h in hyps.items():
        w = score(refs, h, ids)["wer"]
        out["groups"][name] = {"wer": w, "wer_delta_vs_whole": w - whole_wer}
        print(f"  {name:22s} WER {w:.2f}% ({w - whole_wer:+.2f} points vs whole)")
    return out


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained model folder (models/<variant>[/s<seed>])")
    p.add_argument("--manifest", default=None, help="test manifest whose utterances make the recordings")
    p.add_argument("--part", default="memory,wer", help="memory, wer or both (comma-separated)")
    p.add_argument("--minutes", default="10,60", help="recording lengths for the memory part")
    p.add_argument("--whole-minutes", default="", help="lengths also decoded whole (the control), e.g. 1,2")
    p.add_argument("--short-utterances", type=int, default=60, help="utterances of the short-utterance baseline")
    p.add_argument("--wer-minutes", type=float, default=20.0)
    p.add_argument("--configs", default="8:1", help="chunk:context seconds pairs for the wer part")
    p.add_argument("--group-minutes", type=float, default=2.0, help="0: no whole-input comparison")
    p.add_argument("--shift-ms", type=float, default=20.0, help="the noise-floor row: utterances shifted this much")
    p.add_argument("--stream-chunk", type=int, default=8, help="encoder frames per attention chunk (320 ms)")
    p.add_argument("--stream-left", type=int, default=16, help="left chunks of the bounded chunked-attention row")
    p.add_argument("--method", default="ctc_greedy")
    p.add_argument("--first-pass", action="store_true", help="a cascade's streaming first pass (its CTC head)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inputs-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.inputs = Path(args.inputs_file).read_text().splitlines()
        child(args)
        return None
    rows = utterances(args.manifest)
    report = {
        "model": args.model,
        "manifest": args.manifest,
        "threads": args.threads,
        "method": args.method,
        "first_pass": args.first_pass,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "memory" in args.part:
            report["memory"] = memory_part(args, rows, Path(tmp))
        if "wer" in args.part:
            if not rows:
                raise SystemExit("--part wer needs --manifest (test utterances with texts)")
            report["wer"] = wer_part(args, rows, Path(tmp))
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report))
    if args.json:
        from edgeconformer.files import write_json_atomic

        write_json_atomic(args.json, report)
    return report


if __name__ == "__main__":
    main()
