"""FLOP accounting by counting, not by formula: the model runs once under torch's FlopCounterMode, which
records the FLOPs of every matmul/convolution/attention op together with the module that issued it.

What is counted: matrix multiplications, convolutions (depthwise included, groups are honoured) and their
fused variants, 2 FLOPs per multiply-accumulate. Elementwise ops, norms, softmax and activations are not
counted; they are a small, memory-bound fraction on every accelerator and the convention of the papers
being reproduced. Those ops issued outside any counted part land in "other".

Parts: "projection" is the nn.Linear in front of a block whose width differs from the previous block's
(`encoder.projections`, downsized stages); "ctc_head" is every CTC output layer, i.e. for a cascade both the
second pass's `ctc` and the first pass's `ctc_first` (one aggregate, like evaluate/device.py's `part_of`, whose
"asr.ctc" prefix already takes both). The "streamed part" is what runs chunk by chunk while audio arrives:
subsampling + the (first-pass) blocks and the projections between them + the CTC head they feed; for a cascade
that is the first pass and `ctc_first`, otherwise the whole encoder and `ctc`.
"""

import contextlib
import json

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from edgeconformer.config import compose
from edgeconformer.models.cascade import CascadedASR
from edgeconformer.models.lightning import build_model

AGGREGATES = ("subsampling", "ffn", "mhsa", "conv", "projection", "ctc_head", "attention_decoder", "other")

# Per-block module names (ConformerBlock attributes) -> part they are accounted to.
BLOCK_PARTS = {"ffn1": "ffn", "ffn2": "ffn", "norm_mhsa": "mhsa", "mhsa": "mhsa", "conv": "conv"}


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def counted_flops(module, *args, **kwargs):
    # Runs module(*args, **kwargs) once; returns (total FLOPs, {submodule path relative to module: FLOPs}),
    # e.g. "encoder.blocks.0.mhsa". A path's count includes its submodules, as FlopCounterMode reports them.
    # The math backend of scaled_dot_product_attention: the fused CPU kernel has no FLOP formula registered and
    # would count as 0; the math backend issues the same two matmuls on every device (meta included).
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = name.split(".", 1)[1] if "." in name else ""  # the tracker prefixes paths with the class name
        per_module[path] = per_module.get(path, 0) + sum(ops.values())
    return counter.get_total_flops(), per_module


class WholeUtterance(nn.Module):
    """Everything one utterance goes through, as one module call so all parts get paths below `asr.`."""

    def __init__(self, asr):
        super().__init__()
        self.asr = asr

    def forward(self, feats, lengths, ys_in):
        if isinstance(self.asr, CascadedASR):
            # Both passes in one encoder run; the first pass's output (1, T', D1) also feeds its own CTC head
            # (asr.ctc_first), which `encode` would skip.
            first, encoder_out, encoder_lengths = self.asr.encoder.forward_passes(feats, lengths)
            self.asr.first_pass_log_probs(first)
        else:
            encoder_out, encoder_lengths = self.asr.encode(feats, lengths)
        self.asr.ctc_log_probs(encoder_out)
        if self.asr.decoder is not None:
            ys_lengths = torch.full_like(encoder_lengths, ys_in.size(1))
            self.asr.decoder(encoder_out, encoder_lengths, ys_in, ys_lengths)


def streamed_paths(model) -> list[str]:
    """Module paths (below WholeUtterance) of the streamed part: subsampling, the (first-pass) blocks, the projections
    in front of blocks 1..N-1 of them (a projection in front of the first second-pass block belongs to the second
    pass, as in ConformerEncoder.stream) and the CTC head they feed."""
    encoder = model.encoder
    n = encoder.first_pass_layers or len(encoder.blocks)
    head = "asr.ctc_first" if isinstance(model, CascadedASR) else "asr.ctc"
    return (
        ["asr.encoder.subsampling"]
        + [f"asr.encoder.blocks.{i}" for i in range(n)]
        + [f"asr.encoder.projections.{i}" for i in range(1, n) if str(i) in encoder.projections]
        + [head]
    )


def streamed_flops(model, per_module: dict) -> int:
    """FLOPs of the streamed part (see the module docstring) from counted_flops' per-module counts of one
    WholeUtterance(model) call. A block path's count includes all of the block's ops."""
    return sum(per_module.get(path, 0) for path in streamed_paths(model))


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside the block, its own mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def utterance_inputs(
    model,
    seconds: float,
    frame_shift_s: float = 0.01,
    idim: int = 80,
    decoder_tokens: int | None = None,
    tokens_per_second: float = 3.0,
):
    """One utterance of `seconds` audio for counting: (WholeUtterance(model), feats (1, T, idim), lengths (1,),
    ys_in (1, U) starting with <sos>), with U = decoder_tokens or tokens_per_second * seconds. The values are
    random: counts depend on shapes only."""
    device = next(model.parameters()).device
    frames = int(round(seconds / frame_shift_s))
    if decoder_tokens is None:
        decoder_tokens = max(1, int(round(tokens_per_second * seconds)))
    feats = torch.randn(1, frames, idim, device=device)
    lengths = torch.tensor([frames], device=device)
    ys_in = torch.randint(0, model.vocab_size, (1, decoder_tokens), device=device)
    ys_in[:, 0] = model.sos_eos
    return WholeUtterance(model), feats, lengths, ys_in


def count_flops(model, seconds, frame_shift_s=0.01, idim=80, decoder_tokens=None, tokens_per_second=3.0):
    """FLOPs of one utterance of `seconds` audio through encoder, CTC head and (if present) the attention
    decoder run teacher-forced on `decoder_tokens` tokens (<sos> included; default tokens_per_second * seconds,
    about right for LibriSpeech with a few-hundred-piece BPE vocabulary). Model in eval mode, batch 1.

    Returns total_flops, gflops_per_audio_second, flops/shares per aggregate part (shares sum to 1),
    block_flops/block_shares per "block{i}.ffn|mhsa|conv" (and "block{i}.projection" for a block with a projection
    in front; shares of the same total), and streamed_flops / gflops_per_audio_second_streamed: the part that runs
    chunk by chunk (for a cascade its first pass and first-pass CTC head; else everything but the decoder)."""
    inputs = utterance_inputs(model, seconds, frame_shift_s, idim, decoder_tokens, tokens_per_second)
    frames, decoder_tokens = inputs[1].size(1), inputs[3].size(1)
    with eval_mode(model):
        total, per_module = counted_flops(*inputs)

    flops = dict.fromkeys(AGGREGATES, 0)
    flops["subsampling"] = per_module.get("asr.encoder.subsampling", 0)
    flops["ctc_head"] = per_module.get("asr.ctc", 0) + per_module.get("asr.ctc_first", 0)
    flops["attention_decoder"] = per_module.get("asr.decoder", 0)
    block_flops = {}
    for i in range(len(model.encoder.blocks)):
        if str(i) in model.encoder.projections:  # (1, T', D_{i-1}) -> (1, T', D_i) in front of block i
            n = per_module.get(f"asr.encoder.projections.{i}", 0)
            block_flops[f"block{i}.projection"] = n
            flops["projection"] += n
        for attr, part in BLOCK_PARTS.items():
            n = per_module.get(f"asr.encoder.blocks.{i}.{attr}", 0)
            block_flops[f"block{i}.{part}"] = block_flops.get(f"block{i}.{part}", 0) + n
            flops[part] += n
    flops["other"] = total - sum(flops.values())  # whatever no part claims (none of the counted ops today)
    streamed = streamed_flops(model, per_module)

    return dict(
        seconds=seconds,
        frames=frames,
        encoder_frames=int(model.encoder.subsampling.subsample_lengths(frames)),
        decoder_tokens=decoder_tokens if model.decoder is not None else 0,
        params=count_params(model),
        total_flops=total,
        gflops_per_audio_second=total / 1e9 / seconds,
        flops=flops,
        shares={k: v / total for k, v in flops.items()},
        block_flops=block_flops,
        block_shares={k: v / total for k, v in block_flops.items()},
        streamed_flops=streamed,
        gflops_per_audio_second_streamed=streamed / 1e9 / seconds,
    )


def format_table(result, per_block=False):
    total = result["total_flops"]

    def row(name, n):
        return f"{name:<20}{n / 1e9:>12.3f}{n / total:>10.1%}"

    lines = [
        f"audio {result['seconds']:g} s ({result['frames']} frames -> {result['encoder_frames']} encoder frames, "
        f"{result['decoder_tokens']} decoder tokens), {result['params'] / 1e6:.2f} M params",
        f"{'part':<20}{'GFLOPs':>12}{'share':>10}",
    ]
    if per_block:
        lines += [row(name, n) for name, n in result["block_flops"].items()]
        lines.append("-" * 42)
    lines += [row(name, n) for name, n in result["flops"].items()]
    lines.append(row("total", total))
    lines.append(f"{'GFLOPs / audio s':<20}{result['gflops_per_audio_second']:>12.3f}")
    if "streamed_flops" in result:  # results of older code lack it
        lines.append(
            f"{'  streamed part':<20}{result['gflops_per_audio_second_streamed']:>12.3f}"
            f"{result['streamed_flops'] / total:>10.1%}"
        )
    return "\n".join(lines)


def flops_report(cfg) -> dict:
    """Stage function behind `python pipelines/flops.py model=... model.subsampling=...`: counts the configured
    model (built on the meta device, so paper sizes cost nothing) and prints the table then one JSON line."""

    f = cfg.eval.flops
    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True), f.vocab_size).eval()
    result = count_flops(model, f.seconds, idim=cfg.model.n_mels, tokens_per_second=f.tokens_per_second)
    summary = {
        "model": cfg.model.name,
        "subsampling": cfg.model.subsampling,
        "seconds": f.seconds,
        "params_millions": round(count_params(model) / 1e6, 3),
        "gflops_per_audio_second": result["gflops_per_audio_second"],
        "gflops_per_audio_second_streamed": result["gflops_per_audio_second_streamed"],
        "shares": {k: round(v, 6) for k, v in result["shares"].items()},
    }
    print(
        f"{cfg.model.name} ({cfg.model.subsampling} subsampling), {f.seconds:g} s of audio, "
        f"{summary['params_millions']} M parameters"
    )
    print(format_table(result))
    print(json.dumps(summary))
    return summary


PAPER_SHARES = {"vanilla": 0.328, "dws": 0.040}  # Xu et al. 2023: subsampling share of total compute


def comparison_table(
    models=("small", "conformer_s", "conformer_m", "conformer_l", "paper"), seconds=10.0, vocab_size=256
) -> str:
    """Markdown table: counted subsampling FLOPs and shares, vanilla vs DWS, per model config."""

    lines = [
        "| model | params (M) | vanilla subsampling GFLOPs | vanilla share | DWS subsampling GFLOPs | DWS share "
        "| subsampling cut | total GFLOPs/audio s vanilla -> DWS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        row = {}
        for variant in ("vanilla", "dws"):
            cfg = compose([f"model={name}", f"model.subsampling={variant}"])
            with torch.device("meta"):
                model = build_model(OmegaConf.to_container(cfg.model, resolve=True), vocab_size).eval()
            row[variant] = count_flops(model, seconds, idim=cfg.model.n_mels)
        v, d = row["vanilla"], row["dws"]
        lines.append(
            f"| {name} | {v['params'] / 1e6:.1f} | {v['flops']['subsampling'] / 1e9:.2f} "
            f"| {v['shares']['subsampling']:.1%} "
            f"| {d['flops']['subsampling'] / 1e9:.2f} | {d['shares']['subsampling']:.1%} "
            f"| {v['flops']['subsampling'] / d['flops']['subsampling']:.2f}x "
            f"| {v['gflops_per_audio_second']:.3f} -> {d['gflops_per_audio_second']:.3f} |"
        )
    lines.append(
        f"| Xu et al. 2023 (paper) | n/a | n/a | {PAPER_SHARES['vanilla']:.1%} | n/a | "
        f"{PAPER_SHARES['dws']:.1%} | n/a | n/a |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(comparison_table())
