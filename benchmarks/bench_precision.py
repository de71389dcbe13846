"""fp32 against bf16 mixed precision for a configured model's training step, and what `trainer.precision=auto`
picks on this machine (edgeconformer.hardware).

    .venv/bin/python benchmarks/bench_precision.py                        # model=small, a 40 s batch, 2 threads
    .venv/bin/python benchmarks/bench_precision.py model=conformer_m model.subsampling=dws --steps 5

Prints the CPU's bf16 instruction sets, the median forward + backward seconds of one batch (random features and
tokens of the configured batch size, `train.max_batch_seconds` of 8 s utterances) in both precisions, their ratio
(fp32 / bf16: above 1 means bf16 is faster), and auto's choice with its reason. On a CPU without bf16 instructions
bf16 is emulated through fp32, and auto picks fp32 without timing; the ratio here shows what that would cost.
The last line is the JSON of every number.
"""

from __future__ import annotations

import argparse
import json

import torch

from edgeconformer.config import compose
from edgeconformer.hardware import describe_cpu, resolve_precision, step_timer, synthetic_batch
from edgeconformer.models.lightning import build_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (model=..., train....)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision (after one untimed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose(args.overrides)
    model = build_model(cfg.model, args.vocab)
    batch = synthetic_batch(cfg.model.n_mels, args.vocab, float(cfg.train.max_batch_seconds))
    timer = step_timer(model, batch, steps=args.steps)
    seconds = {p: timer(p) for p in ("32-true", "bf16-mixed")}
    chosen, why = resolve_precision("auto", "cpu", step_seconds=lambda p: seconds[p])
    cpu = describe_cpu()
    result = {
        "model": cfg.model.name,
        "subsampling": cfg.model.subsampling,
        "threads": args.threads,
        "batch": list(batch[0].shape),
        "cpu": cpu,
        "step_seconds": seconds,
        "ratio_fp32_over_bf16": seconds["32-true"] / seconds["bf16-mixed"],
        "auto": chosen,
        "auto_reason": why["reason"],
    }
    print(f"CPU: {cpu['torch_cpu_capability']}, bf16 instructions: {cpu['bf16_instructions'] or 'none'}")
    print(f"{cfg.model.name} ({cfg.model.subsampling}), batch {tuple(batch[0].shape)}, {args.threads} threads")
    print(
        f"step fp32 {seconds['32-true']:.3f} s, bf16-mixed {seconds['bf16-mixed']:.3f} s: "
        f"x{result['ratio_fp32_over_bf16']:.2f} (fp32 / bf16)"
    )
    print(f"trainer.precision=auto -> {chosen}: {why['reason']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
