"""Where a default training step's time goes: the real recipe (its batches, SpecAugment, encoder, CTC and attention
decoder, losses, backward, AdamW), profiled with torch.profiler and grouped by op kind and by model part.

    .venv/bin/python benchmarks/bench_train_profile.py                       # variant vanilla, 30 steps, 2 threads
    .venv/bin/python benchmarks/bench_train_profile.py --variant dws --steps 50 --json outputs/profile.json

It needs the prepared corpus (`dvc repro tokenize`: data/prepared/manifests and tokenizer). It reports, for the
first `--steps` batches of epoch 0 of the training sampler (after `--warmup` untimed ones):
- the step time split into model parts (forward of the front end / encoder / CTC head + decoder + losses,
  backward, optimizer, SpecAugment + CMVN, batch collation), from record_function ranges;
- the op groups (matrix products, convolutions, norms, softmax/attention, activations, elementwise, data
  movement, reductions, optimizer, losses) by self CPU time, forward and backward together;
- the share outside the encoder; the padded fraction of the epoch's batches (frames computed on padding);
- the Lightning loop's overhead: the same steps through `Trainer.fit` against the plain loop, in the same process;
- the validation pass (dev split, CTC greedy decoding) against the training epoch.
Shares are of the profiled time; the JSON line at the end has every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader

from edgeconformer.config import apply_variant, compose
from edgeconformer.data.datamodule import FeatureDataset, collate_features, load_split
from edgeconformer.data.dataset import DurationBucketSampler
from edgeconformer.data.features import cmvn_stats
from edgeconformer.data.tokenizer import Tokenizer
from edgeconformer.evaluate.rtf import machine_info
from edgeconformer.files import write_text_atomic
from edgeconformer.hardware import describe_cpu
from edgeconformer.models.lightning import ASRModule

# Op name (without the "aten::" prefix; backward nodes by the forward op they differentiate) -> group.
GROUPS = {
    "matmul": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm", "addmv", "mv", "dot", "einsum"),
    "attention": (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math",
        "_softmax",
        "softmax",
        "_softmax_backward_data",
        "log_softmax",
        "_log_softmax",
        "_log_softmax_backward_data",
    ),
    "conv": (
        "convolution",
        "_convolution",
        "conv1d",
        "conv2d",
        "mkldnn_convolution",
        "_conv_depthwise2d",
        "convolution_backward",
        "_slow_conv2d_forward",
        "_slow_conv2d_backward",
        "thnn_conv2d",
    ),
    "norm": (
        "layer_norm",
        "native_layer_norm",
        "native_layer_norm_backward",
        "batch_norm",
        "native_batch_norm",
        "native_batch_norm_backward",
        "_batch_norm_impl_index",
    ),
    "activation": (
        "silu",
        "silu_backward",
        "glu",
        "glu_backward",
        "sigmoid",
        "sigmoid_backward",
        "relu",
        "threshold_backward",
        "gelu",
        "gelu_backward",
        "tanh",
        "tanh_backward",
    ),
    "loss": (
        "ctc_loss",
        "_ctc_loss",
        "_ctc_loss_backward",
        "nll_loss",
        "nll_loss_forward",
        "nll_loss_backward",
        "kl_div",
        "cross_entropy",
    ),
    "optimizer": ("_fused_adamw_",),  # and every _foreach_ op (AdamW's multi-tensor kernels)
    "data movement": (
        "copy_",
        "cat",
        "stack",
        "index",
        "index_select",
        "gather",
        "scatter",
        "masked_fill",
        "masked_fill_",
        "where",
        "pad",
        "constant_pad_nd",
        "transpose",
        "permute",
        "contiguous",
        "clone",
        "to",
        "_to_copy",
        "empty",
        "empty_like",
        "zeros",
        "zeros_like",
        "fill_",
        "zero_",
        "view",
        "reshape",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "expand",
        "as_strided",
        "narrow",
        "flip",
        "roll",
        "repeat",
        "unfold",
        "index_put_",
        "_index_put_impl_",
        "new_zeros",
        "embedding",
        "embedding_dense_backward",
        "full",
        "arange",
        "resize_",
        "t",
        "split",
        "chunk",
        "unbind",
        "_unsafe_view",
        "masked_scatter",
        "nonzero",
        "set_",
    ),
    "reduction": (
        "sum",
        "mean",
        "max",
        "min",
        "amax",
        "norm",
        "var",
        "std",
        "logsumexp",
        "any",
        "all",
        "argmax",
        "cumsum",
        "linalg_vector_norm",
    ),
    "elementwise": (
        "add",
        "add_",
        "mul",
        "mul_",
        "div",
        "div_",
        "sub",
        "sub_",
        "neg",
        "exp",
        "log",
        "pow",
        "rsqrt",
        "abs",
        "clamp",
        "lt",
        "gt",
        "le",
        "ge",
        "eq",
        "ne",
        "bitwise_and",
        "bitwise_not",
        "logical_not",
        "rand",
        "bernoulli_",
        "uniform_",
        "native_dropout",
        "native_dropout_backward",
        "dropout",
        "sign",
        "floor",
        "ceil",
        "round",
        "reciprocal",
        "square",
        "maximum",
        "minimum",
        "exp2",
    ),
}
PARTS = (
    "collate",
    "specaug+cmvn",
    "forward:front end",
    "forward:encoder blocks",
    "forward:heads+losses",
    "backward",
    "optimizer",
)


def op_group(name: str) -> str:
    base = name.split("::")[-1]
    if base.endswith("Backward0") or base.endswith("Backward1"):
        return "autograd bookkeeping"  # the node itself; the kernels it launches are counted under their ops
    for group, names in GROUPS.items():
        if base in names or (group == "optimizer" and base.startswith("_foreach_")):
            return group
    return "other"


def setup(variant: str, threads: int, overrides: list[str]):
    torch.set_num_threads(threads)
    cfg = apply_variant(compose([f"variant={variant}", *overrides]))
    module = build_module(cfg)
    train_set = train_split(cfg, module)
    module.cmvn.set_stats(*cmvn_stats(train_set.feats))
    dev_set = FeatureDataset(
        load_split(cfg.data, cfg.data.dev_split), module.tokenizer, module.fbank, cfg.data.dev_split
    )
    return cfg, module, train_set, dev_set, train_sampler(cfg, train_set)


def build_module(cfg) -> ASRModule:
    """The run's ASRModule as the train stage builds it (seeded by the run's seed), with the corpus's tokenizer."""
    tok_path = Path(cfg.data.out_dir) / "tokenizer" / "tokenizer.model"
    if not tok_path.exists():
        raise SystemExit(f"{tok_path}: not found; run `dvc repro tokenize` first (the profile uses the real corpus)")
    tokenizer = Tokenizer(tok_path)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t = cfg.train
    module = ASRModule(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(t, resolve=True),
        tokenizer.vocab_size,
        seed=int(cfg.seed),
        decode=OmegaConf.to_container(t.decode, resolve=True),
    )
    module.tokenizer = tokenizer
    return module


def train_split(cfg, module: ASRModule) -> FeatureDataset:
    """The training split's features, as the run's data module computes them (its filters and filterbank)."""
    rows = [r for s in cfg.data.train_splits for r in load_split(cfg.data, s, cfg.train)]
    return FeatureDataset(rows, module.tokenizer, module.fbank, "train")


def train_sampler(cfg, train_set: FeatureDataset) -> DurationBucketSampler:
    t = cfg.train
    return DurationBucketSampler(
        train_set.durations, t.max_batch_seconds, max_batch_size=t.max_batch_size, shuffle=True, seed=int(cfg.seed)
    )


def padded_fraction(dataset, sampler) -> dict:
    """Frames the encoder computes on padding over one epoch of the sampler's batches (at the feature rate)."""
    real = padded = 0
    for batch in sampler:
        t = [dataset.feats[i].size(0) for i in batch]
        real += sum(t)
        padded += len(t) * max(t)
    return {"padded_fraction": 1 - real / padded, "batches": len(sampler), "frames": real}


def instrument(module: ASRModule) -> None:
    """record_function ranges around the front end and the encoder blocks (forward); the rest of the model's forward
    (CTC head, attention decoder, losses) is its remainder."""
    enc = module.model.encoder

    def ranged(fn, name):
        def call(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return call

    enc.subsampling.forward = ranged(enc.subsampling.forward, "forward:front end")
    for block in enc.blocks:
        block.forward = ranged(block.forward, "forward:encoder blocks")


def plain_step(module, opt, batch, step: int, clip: float) -> None:
    # ASRModule.training_step's arithmetic, without Lightning's logging and loop.
    step_seed = module.hparams.seed * 1_000_003 + step
    torch.manual_seed(step_seed)
    with record_function("specaug+cmvn"):
        feats, lengths = module._batch_features(batch)
        feats = module.specaug(feats, lengths, generator=torch.Generator().manual_seed(step_seed))
    with record_function("forward:model"):
        out = module.model(feats, lengths, batch["tokens"], batch["token_lengths"])
    with record_function("backward"):
        out["loss"].backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def range_totals(prof) -> dict[str, float]:
    """Self-inclusive wall time (s) of each named range, summed over the profiled steps."""
    totals = defaultdict(float)
    for evt in prof.events():
        if evt.name in (*PARTS, "forward:model"):
            totals[evt.name] += evt.cpu_time_total / 1e6
    return dict(totals)


def profile_steps(module, opt, batches, warmup: int, clip: float) -> dict:
    module.train()
    for i, b in enumerate(batches[:warmup]):
        plain_step(module, opt, b, i, clip)
    timed = batches[warmup:]
    step_s = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, b in enumerate(timed, start=warmup):
            t0 = time.perf_counter()
            plain_step(module, opt, b, i, clip)
            step_s.append(time.perf_counter() - t0)
    ranges = range_totals(prof)
    total = sum(step_s)
    parts = {
        "specaug+cmvn": ranges.get("specaug+cmvn", 0.0),
        "forward:front end": ranges.get("forward:front end", 0.0),
        "forward:encoder blocks": ranges.get("forward:encoder blocks", 0.0),
        "backward": ranges.get("backward", 0.0),
        "optimizer": ranges.get("optimizer", 0.0),
    }
    parts["forward:heads+losses"] = max(
        0.0, ranges.get("forward:model", 0.0) - parts["forward:front end"] - parts["forward:encoder blocks"]
    )
    groups = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key in (*PARTS, "forward:model") or evt.key.startswith("ProfilerStep"):
            continue
        groups[op_group(evt.key)] += evt.self_cpu_time_total / 1e6
    top = sorted(
        (
            (e.key, e.self_cpu_time_total / 1e6, e.count)
            for e in prof.key_averages()
            if e.key not in (*PARTS, "forward:model")
        ),
        key=lambda r: -r[1],
    )[:15]
    audio_s = sum(float(b["feat_lengths"].sum()) for b in timed) / 100.0  # 10 ms hop
    return {
        "steps": len(timed),
        "step_s_median": statistics.median(step_s),
        "step_s_total": total,
        "audio_seconds": audio_s,
        "audio_seconds_per_second": audio_s / total,
        "parts_s": parts,
        "parts_share": {k: v / total for k, v in parts.items()},
        "outside_encoder_share": 1 - (parts["forward:encoder blocks"] + parts["forward:front end"]) / total,
        "op_groups_s": dict(groups),
        "op_groups_share": {k: v / sum(groups.values()) for k, v in groups.items()},
        "top_ops": [{"op": k, "self_s": s, "calls": c} for k, s, c in top],
    }


def lightning_overhead(module, batches, clip: float, threads: int) -> dict:
    """The same batches through Trainer.fit (logging every step as the recipe does) vs the plain loop."""
    torch.set_num_threads(threads)
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer = L.Trainer(
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=clip,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - t0
    torch.set_num_threads(threads)  # Lightning may reset it
    opt = module.make_optimizer()
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        plain_step(module, opt, b, i, clip)
    plain_s = time.perf_counter() - t0
    return {"fit_s": fit_s, "plain_s": plain_s, "ratio_fit/plain": fit_s / plain_s}


@torch.no_grad()
def validation_cost(module, dev_set, val_max_batch_seconds: float) -> dict:
    module.eval()
    loader = DataLoader(
        dev_set,
        collate_fn=collate_features,
        batch_sampler=DurationBucketSampler(dev_set.durations, val_max_batch_seconds, shuffle=False),
    )
    t0 = time.perf_counter()
    forward_s = 0.0
    for batch in loader:
        t1 = time.perf_counter()
        feats, lengths = module._batch_features(batch)
        out = module.model(feats, lengths, batch["tokens"], batch["token_lengths"])
        forward_s += time.perf_counter() - t1
        module.decode_encoder_output(out["encoder_out"], out["encoder_lengths"], method="ctc_greedy")
    total = time.perf_counter() - t0
    module.train()
    return {
        "seconds": total,
        "forward_s": forward_s,
        "decode_s": total - forward_s,
        "audio_seconds": sum(dev_set.durations),
    }


def format_report(r: dict) -> str:
    p = r["profile"]
    lines = [
        f"training step profile: variant {r['variant']}, {p['steps']} steps, {r['threads']} threads, "
        f"median step {p['step_s_median'] * 1000:.0f} ms, {p['audio_seconds_per_second']:.1f} audio s/s",
        f"padded fraction of the epoch's batches: {r['padding']['padded_fraction']:.1%} "
        f"({r['padding']['batches']} batches)",
        "",
        "model part                 seconds   share",
    ]
    for k in PARTS:
        if k in p["parts_s"]:
            lines.append(f"{k:<24} {p['parts_s'][k]:9.2f}  {p['parts_share'][k]:6.1%}")
    lines.append(f"outside the encoder's forward (front end + blocks): {p['outside_encoder_share']:.1%}")
    lines += ["", "op group (self CPU time)   seconds   share"]
    for k, v in sorted(p["op_groups_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<24} {v:9.2f}  {p['op_groups_share'][k]:6.1%}")
    lines += ["", "top ops (self CPU time)"]
    lines += [f"  {o['op']:<48} {o['self_s']:8.2f} s  {o['calls']:6d} calls" for o in p["top_ops"]]
    if "lightning" in r:
        lo = r["lightning"]
        lines.append(
            f"\nLightning loop: Trainer.fit {lo['fit_s']:.2f} s vs plain loop {lo['plain_s']:.2f} s "
            f"(x{lo['ratio_fit/plain']:.2f}) on the same {p['steps'] + r['warmup']} batches"
        )
    if "validation" in r:
        v = r["validation"]
        lines.append(
            f"validation pass: {v['seconds']:.1f} s ({v['decode_s']:.1f} s CTC greedy decoding), "
            f"{v['seconds'] / r['epoch_estimate_s']:.1%} of an estimated training epoch of "
            f"{r['epoch_estimate_s']:.0f} s"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="vanilla", help="a name in conf/variant_overrides (vanilla, dws, practical)")
    p.add_argument("--steps", type=int, default=30, help="profiled training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before profiling")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-lightning", action="store_true", help="skip the Trainer.fit comparison")
    p.add_argument("--no-validation", action="store_true", help="skip timing the validation pass")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.out_dir=/path/prepared")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg, module, train_set, dev_set, sampler = setup(args.variant, args.threads, args.overrides)
    n = args.warmup + args.steps
    order = list(iter(sampler))[:n]
    if len(order) < n:
        raise SystemExit(f"the training split has {len(order)} batches per epoch; ask for at most that many steps")
    t0 = time.perf_counter()
    batches = [collate_features([train_set[i] for i in b]) for b in order]
    collate_s = (time.perf_counter() - t0) / n
    instrument(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    report = {
        "variant": args.variant,
        "threads": args.threads,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "machine": {**machine_info(args.threads), **describe_cpu()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "padding": padded_fraction(train_set, sampler),
    }
    report["profile"] = profile_steps(module, module.make_optimizer(), batches, args.warmup, float(cfg.train.grad_clip))
    p = report["profile"]
    p["parts_s"]["collate"] = collate_s * p["steps"]
    p["parts_share"]["collate"] = p["parts_s"]["collate"] / p["step_s_total"]
    report["epoch_estimate_s"] = p["step_s_median"] * len(sampler)
    if not args.no_lightning:
        module.load_state_dict(state)
        report["lightning"] = lightning_overhead(module, batches, float(cfg.train.grad_clip), args.threads)
    if not args.no_validation:
        report["validation"] = validation_cost(module, dev_set, float(cfg.train.val_max_batch_seconds))
    print(format_report(report))
    line = json.dumps(report, default=float)
    print(line)
    if args.json:
        write_text_atomic(args.json, line + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
