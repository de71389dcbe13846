"""Real-time factor (RTF) measured on this machine, with a fixed protocol so figures are comparable.

Protocol (docs/evaluation.md):
  * batch 1, one utterance per call: how an on-device recogniser runs;
  * the torch intra-op thread count is set explicitly (default 1) for the measurement, recorded, and restored;
  * `warmup` untimed calls first (cycling over the inputs), which pay for lazy initialisation (allocator,
    oneDNN primitive caches, first-touch of weights);
  * then every utterance is timed `repeats` times with a monotonic wall clock (time.perf_counter); its compute
    time is the median of those runs, its RTF = compute seconds / audio seconds;
  * reported: the median and 90th percentile over utterances of the per-utterance RTF (the headline is the
    median), and the corpus RTF = total compute / total audio (weighted towards long utterances);
  * every result carries the machine facts (platform, CPU model, cores, torch/python versions, threads) and the
    audio lengths it was measured on. RTF < 1 is faster than real time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from edgeconformer.artifacts import load_trained
from edgeconformer.data.dataset import load_audio
from edgeconformer.errors import UserError
from edgeconformer.files import read_jsonl

PROTOCOL = (
    "batch 1; {warmup} untimed warm-up calls; each utterance timed {repeats}x (median) with "
    "time.perf_counter; RTF = compute s / audio s; median and p90 over utterances; "
    "torch threads = {threads}"
)


def cpu_model() -> str:
    """Marketing name of the CPU, or "unknown" when the platform does not tell."""
    system = platform.system()
    try:
        if system == "Linux":
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                        return value.strip()
        elif system == "Darwin":
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None = None) -> dict:
    """The facts every timing is stored with."""
    try:
        available = len(os.sched_getaffinity(0))  # cores this process may run on (cgroups/affinity)
    except AttributeError:  # macOS, Windows
        available = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "python_version": platform.python_version(),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_rtf(
    fn: Callable,
    inputs: Sequence[tuple[object, float]],
    warmup: int = 2,
    repeats: int = 3,
    threads: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Times fn(x) for every (x, audio_seconds) in `inputs` following the protocol above.

    fn is called warmup + repeats * len(inputs) times; only the last repeats * len(inputs) calls are timed.
    `clock` is injectable for tests. Returns rtf (= rtf_median), rtf_median, rtf_p90, rtf_total, the
    per-utterance rows, audio-length statistics, the protocol settings and machine facts."""
    _check_rtf_arguments(inputs, warmup, repeats, threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # the caller's thread count is restored even when fn raises
        for i in range(warmup):
            fn(inputs[i % len(inputs)][0])
        rows = [_time_utterance(fn, i, x, seconds, repeats, clock) for i, (x, seconds) in enumerate(inputs)]
    finally:
        torch.set_num_threads(previous)
    return _rtf_result(rows, warmup, repeats, threads)


def _check_rtf_arguments(inputs: Sequence[tuple[object, float]], warmup: int, repeats: int, threads: int) -> None:
    """Raises ValueError for settings the protocol cannot measure with, before anything is timed."""
    if not inputs:
        raise ValueError("measure_rtf needs at least one (input, audio_seconds) pair")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (set it explicitly so timings are comparable), got {threads}")
    for i, (_, seconds) in enumerate(inputs):
        if not seconds > 0:
            raise ValueError(f"input {i}: audio length must be > 0 seconds, got {seconds}")


def _time_utterance(
    fn: Callable, index: int, x: object, seconds: float, repeats: int, clock: Callable[[], float]
) -> dict:
    """One utterance's row: fn(x) timed `repeats` times; its compute time is the median of the runs (robust to a
    stray slow run)."""
    runs = []
    for _ in range(repeats):
        t0 = clock()
        fn(x)
        runs.append(clock() - t0)
    compute = statistics.median(runs)
    return {
        "index": index,
        "audio_seconds": float(seconds),
        "compute_seconds": compute,
        "rtf": compute / seconds,
        "runs": runs,
    }


def _rtf_result(rows: list[dict], warmup: int, repeats: int, threads: int) -> dict:
    """The per-utterance rows summarised over utterances, with the protocol settings and machine facts."""
    rtfs = [r["rtf"] for r in rows]
    lengths = [r["audio_seconds"] for r in rows]
    audio = sum(lengths)
    compute = sum(r["compute_seconds"] for r in rows)
    median = statistics.median(rtfs)
    return {
        "rtf": median,
        "rtf_median": median,
        "rtf_p90": percentile(rtfs, 90),
        "rtf_total": compute / audio,
        "compute_seconds": compute,
        "audio_seconds": audio,
        "audio_seconds_min": min(lengths),
        "audio_seconds_median": statistics.median(lengths),
        "audio_seconds_max": max(lengths),
        "n_utterances": len(rows),
        "warmup": warmup,
        "repeats": repeats,
        "threads": threads,
        "protocol": PROTOCOL.format(warmup=warmup, repeats=repeats, threads=threads),
        "machine": machine_info(threads),
        "utterances": rows,
    }


def pick_by_duration(rows: Sequence[dict], n: int) -> list[dict]:
    """A fixed, spread-out subset of manifest rows: n rows at evenly spaced ranks of duration (ties by id),
    so short and long utterances are both timed and the choice does not depend on manifest order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ranked = sorted(rows, key=lambda r: (r["duration"], r.get("id", r.get("audio_filepath", ""))))
    if n >= len(ranked):
        return ranked
    if n == 1:
        return [ranked[(len(ranked) - 1) // 2]]  # the median-length utterance
    step = (len(ranked) - 1) / (n - 1)  # > 1 here, so the ranks are distinct and include both ends
    return [ranked[round(i * step)] for i in range(n)]


def recognizer_fn(module, method: str = "ctc_greedy", first_pass: bool = False) -> Callable[[torch.Tensor], str]:
    """What is timed for an ASRModule: waveform (N,) -> features -> encoder -> decoding -> text. first_pass=True
    (a cascaded model only): the streaming first pass and its CTC head alone, the second pass is not run."""

    def run(audio: torch.Tensor) -> str:
        with torch.inference_mode():
            return module.transcribe(audio[None], torch.tensor([audio.numel()]), method=method, first_pass=first_pass)[
                0
            ]

    return run


def main(argv: list[str] | None = None) -> int:
    """python -m edgeconformer.evaluate.rtf --model models/dws [--manifest ...] [--utterances 10]: prints JSON."""

    p = argparse.ArgumentParser(prog="python -m edgeconformer.evaluate.rtf")
    p.add_argument(
        "--model", required=True, help="a trained model folder, e.g. models/dws (its default seed) or models/dws/s2"
    )
    p.add_argument("--manifest", default="data/prepared/manifests/test.jsonl")
    p.add_argument("--utterances", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="ctc_greedy")
    p.add_argument("--first-pass", action="store_true", help="cascaded models: time the streaming first pass alone")
    args = p.parse_args(argv)
    try:
        module = load_trained(args.model)
        if not os.path.exists(args.manifest):
            raise UserError(f"{args.manifest}: manifest not found; run `dvc repro prepare` first")
        rows = pick_by_duration(read_jsonl(args.manifest), args.utterances)
        inputs = [
            (load_audio(r["audio_filepath"], uid=r["id"], manifest=args.manifest), float(r["duration"])) for r in rows
        ]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = measure_rtf(
        recognizer_fn(module, args.method, args.first_pass), inputs, args.warmup, args.repeats, args.threads
    )
    for row, r in zip(result["utterances"], rows):
        row["id"] = r["id"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
