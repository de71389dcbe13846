"""What the machine can do, and the training precision that `trainer.precision=auto` picks from it.

bf16 mixed precision pays on a CPU only where the CPU has bf16 instructions (x86: AVX512_BF16 or AMX_BF16;
Arm: the BF16 extension): elsewhere oneDNN emulates bf16 through fp32 and a bf16 step is slower than an fp32 one.
Even with the instructions, whether it pays depends on the model's shapes (small matrices leave the step bound by
elementwise ops and per-op overhead, not by matrix products), so `resolve_precision` times a few training steps of
the configured model in both precisions and keeps bf16 only where it is measurably faster. On a GPU, bf16-mixed
where the card supports it. Every decision comes with its reason, which the train stage records.

The post-training chain (stabilization, FP16, export) always starts from the FP32 master weights that
Lightning's mixed precision keeps, whatever the training precision.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgeconformer.errors import ConfigError

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, Intel AMX, Arm FEAT_BF16 (/proc/cpuinfo)
MIN_SPEEDUP = 1.05  # bf16 must save at least 5% of a step to be chosen: below that, timing noise decides


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo "flags" or "Features"); empty where unreadable (macOS)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16(flags: set[str] | None = None) -> list[str]:
    """The bf16 instruction sets this CPU has (empty: none, bf16 would be emulated)."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in flags]


def describe_cpu(flags: set[str] | None = None) -> dict:
    flags = cpu_flags() if flags is None else flags
    return {
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_instructions": cpu_bf16(flags),
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
    }


def time_steps(step: Callable[[], None], steps: int = 3, warmup: int = 1) -> float:
    """Median seconds of `step()` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def resolve_precision(
    precision: str,
    accelerator: str = "cpu",
    step_seconds: Callable[[str], float] | None = None,
    flags: set[str] | None = None,
) -> tuple[str, dict]:
    """trainer.precision -> (the Lightning precision to use, why). Anything but "auto" is returned as given.

    "auto" on CPU: "32-true" unless the CPU has bf16 instructions and `step_seconds("bf16-mixed")` is at least
    MIN_SPEEDUP times faster than `step_seconds("32-true")` (the caller times its own model's training step).
    On GPU: "bf16-mixed" where torch reports bf16 support, else "32-true"."""
    if precision != "auto":
        return precision, {"requested": precision, "chosen": precision, "reason": "set explicitly"}
    why = {"requested": "auto"}
    if accelerator in ("gpu", "cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        chosen = "bf16-mixed" if ok else "32-true"
        return chosen, {**why, "chosen": chosen, "reason": "GPU supports bf16" if ok else "no bf16 on this GPU"}
    if accelerator != "cpu":
        raise ConfigError(
            f"trainer.precision=auto knows accelerator cpu or gpu, not {accelerator!r}; set "
            "trainer.precision explicitly (32-true, bf16-mixed, ...)"
        )
    found = cpu_bf16(flags)
    why["cpu"] = describe_cpu(flags)
    if not found:
        return "32-true", {
            **why,
            "chosen": "32-true",
            "reason": "no bf16 instructions on this CPU (bf16 would be emulated through fp32)",
        }
    if step_seconds is None:
        return "32-true", {**why, "chosen": "32-true", "reason": "bf16 instructions found but no step to time"}
    fp32, bf16 = step_seconds("32-true"), step_seconds("bf16-mixed")
    speedup = fp32 / bf16
    chosen = "bf16-mixed" if speedup >= MIN_SPEEDUP else "32-true"
    reason = (
        f"{'+'.join(found)}: a training step takes {fp32:.3f} s in fp32 and {bf16:.3f} s in bf16 "
        f"(x{speedup:.2f}; bf16 is chosen from x{MIN_SPEEDUP})"
    )
    return chosen, {
        **why,
        "chosen": chosen,
        "reason": reason,
        "step_seconds": {"32-true": fp32, "bf16-mixed": bf16},
        "speedup": speedup,
    }


def step_timer(model: torch.nn.Module, inputs: tuple, steps: int = 3) -> Callable[[str], float]:
    """precision -> median seconds of one training step (forward, backward) of a copy of `model` on `inputs`, in
    that Lightning precision ("32-true", "bf16-mixed": autocast to bfloat16). `model(*inputs)` returns a dict with
    "loss". The copy and a forked RNG leave the model and every random stream of the run untouched."""

    def seconds(precision: str) -> float:
        net = copy.deepcopy(model).train()
        bf16 = precision.startswith("bf16")

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = net(*inputs)["loss"]
            loss.backward()

        with torch.random.fork_rng(devices=[]):
            return time_steps(step, steps)

    return seconds


def synthetic_batch(
    n_mels: int,
    vocab_size: int,
    batch_seconds: float,
    utterance_seconds: float = 8.0,
    frame_shift_s: float = 0.01,
    tokens_per_second: float = 3.0,
) -> tuple:
    """A training batch of the configured size for timing: (feats (B, T, n_mels), lengths, tokens (B, U),
    token_lengths), B = batch_seconds / utterance_seconds utterances. Random values from a private generator."""
    g = torch.Generator().manual_seed(0)
    batch = max(1, int(batch_seconds // utterance_seconds))
    frames, tokens = int(utterance_seconds / frame_shift_s), max(1, int(tokens_per_second * utterance_seconds))
    feats = torch.randn(batch, frames, n_mels, generator=g)
    ids = torch.randint(3, max(4, vocab_size), (batch, tokens), generator=g)
    return feats, torch.full((batch,), frames), ids, torch.full((batch,), tokens)
