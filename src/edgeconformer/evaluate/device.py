"""Device-RTF estimate: counted FLOPs and bytes moved per second of audio against a device profile.

Model (a per-op roofline, docs/evaluation.md):

    time = sum over ops of max(flops_op / (peak_flops * efficiency), bytes_op / bandwidth)
    rtf  = time / audio seconds

One utterance of `seconds` audio runs once (batch 1) through encoder, CTC head and the teacher-forced attention
decoder, exactly what evaluate/flops.py counts, under a dispatch mode that sees every aten op:
  * flops_op: torch.utils.flop_counter's formulas (matmuls, convolutions, attention; 2 per multiply-accumulate),
    so the total equals count_flops(); elementwise ops, norms and softmax count 0 FLOPs but do move bytes;
  * bytes_op: every distinct tensor the op reads plus every tensor it writes, floating tensors at the precision's
    width (fp16: 2 bytes), integer/bool tensors at their own. Views (transpose, reshape, slice, expand) move
    nothing; a broadcast (stride-0) operand is read once; an embedding lookup reads only the rows it gathers.
    Weights are therefore read once per forward (each is used by one op), activations are written by the op that
    makes them and read by each op that uses them: no fusion, no cache reuse across ops.

Optimistic about compute (no per-op dispatch overhead, no CPU fallbacks, no host-side decoding) and bandwidth
(theoretical peak), pessimistic about reuse (every intermediate goes to DRAM): a figure to compare variants and
devices by, never a measurement. Models may live on the meta device, so paper sizes cost nothing to estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import yaml
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from edgeconformer.config import compose
from edgeconformer.evaluate.flops import AGGREGATES, BLOCK_PARTS, eval_mode, utterance_inputs
from edgeconformer.models.lightning import build_model

PRECISION_BYTES = {"fp32": 4, "fp16": 2}
PROFILES_DIR = Path(__file__).parent / "devices"

aten = torch.ops.aten
# Ops that allocate or relabel memory without moving data (is_view does not flag these).
NO_TRAFFIC = {
    aten._unsafe_view.default,
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.lift_fresh.default,
    aten.detach.default,
    aten.alias.default,
}


# ------------------------------------------------------------------------------------------------ profiles
def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(profile: str | Path | dict) -> dict:
    """A profile name (src/edgeconformer/evaluate/devices/<name>.yaml), a YAML path, or an already loaded dict.

    Each figure is {value, estimate: bool, basis: text}; `sources` lists where the public figures come from."""
    if isinstance(profile, dict):
        return profile
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}.yaml"
    if not path.exists():
        raise ValueError(
            f"device profile {profile!r} not found; choose one of {available_profiles()} or pass a "
            "path to a YAML file with the same keys"
        )
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _figure(profile: dict, *keys: str) -> float:
    node = profile
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            raise ValueError(f"device profile {profile.get('name', '?')!r} has no {'.'.join(keys)}")
    return float(node["value"] if isinstance(node, dict) else node)


# ------------------------------------------------------------------------------------------------ op counting
def _unique_elements(t: torch.Tensor) -> int:
    # Elements an op actually touches: a broadcast (stride-0) dimension is read once, not size times.
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


def _bytes(t: torch.Tensor, float_bytes: int) -> int:
    width = float_bytes if t.is_floating_point() else t.element_size()
    return _unique_elements(t) * width


def _storage_key(t: torch.Tensor) -> int:
    # Identity of the memory behind a tensor; a weight and its transposed view share it (works on meta tensors).
    return t.untyped_storage()._cdata


class OpCounter(TorchDispatchMode):
    """Records {op, module, flops, bytes, weight_bytes} for every aten op run under it.

    `module` is the innermost nn.Module path (relative to the root passed in) whose forward issued the op."""

    def __init__(self, root: nn.Module, float_bytes: int):
        super().__init__()
        self.float_bytes = float_bytes
        self.records: list[dict] = []
        self.stack = [""]
        self.weights = {_storage_key(p) for p in root.parameters()}
        self.handles = []
        for name, module in root.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)  # returns None: the inputs are left as they are

        return hook

    def _leave(self, module, args, out):
        self.stack.pop()  # returns None: the output is left as it is

    def remove_hooks(self):
        for h in self.handles:
            h.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:
            # Composite ops are counted through what they decompose into (as FlopCounterMode does).
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func.is_view or func in NO_TRAFFIC:
            return out
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        reads, seen = 0, set()
        weight_bytes = 0
        if packet is aten.embedding:
            weight, indices = args[0], args[1]
            # Gathers indices.numel() rows of the table: reads those rows and the indices.
            reads = indices.numel() * weight.shape[1] * self.float_bytes + _bytes(indices, self.float_bytes)
            weight_bytes = indices.numel() * weight.shape[1] * self.float_bytes
        else:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    n = _bytes(t, self.float_bytes)
                    reads += n
                    if _storage_key(t) in self.weights:
                        weight_bytes += n
        writes = sum(_bytes(t, self.float_bytes) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.records.append(
            {
                "op": str(func),
                "module": self.stack[-1],
                "flops": int(flops),
                "bytes": reads + writes,
                "weight_bytes": weight_bytes,
            }
        )
        return out


def count_ops(module: nn.Module, *args, precision: str = "fp16", **kwargs) -> list[dict]:
    """Runs module(*args, **kwargs) once; per-op records {op, module, flops, bytes, weight_bytes}."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_BYTES)}, got {precision!r}")
    counter = OpCounter(module, PRECISION_BYTES[precision])
    try:
        # The math backend of scaled_dot_product_attention, as in evaluate/flops.py: the same matmuls on every
        # device, and the (T, T) score matrix is materialised (what an accelerator without flash attention does).
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
            module(*args, **kwargs)
    finally:
        counter.remove_hooks()
    return counter.records


# ------------------------------------------------------------------------------------------------ roofline
def roofline(records: list[dict], peak_flops: float, bandwidth: float) -> dict:
    """Per-op roofline over op records. peak_flops is the sustained rate (peak * efficiency), bandwidth in
    bytes/s. bound: which regime the estimated time mostly comes from (compute-bound ops vs memory-bound ops)."""
    compute_bound = memory_bound = 0.0
    for r in records:
        c, m = r["flops"] / peak_flops, r["bytes"] / bandwidth
        if c >= m:
            compute_bound += c
        else:
            memory_bound += m
    flops = sum(r["flops"] for r in records)
    moved = sum(r["bytes"] for r in records)
    return {
        "seconds": compute_bound + memory_bound,
        "compute_bound_seconds": compute_bound,
        "memory_bound_seconds": memory_bound,
        "bound": "compute" if compute_bound >= memory_bound else "memory",
        "flops": flops,
        "bytes": moved,
        "compute_only_seconds": flops / peak_flops,  # every op at peak: the lower bound
        "memory_only_seconds": moved / bandwidth,
        "whole_model_seconds": max(flops / peak_flops, moved / bandwidth),  # one roofline for the whole graph
    }


def part_of(module_path: str) -> str:
    """Module path below WholeUtterance ("asr.encoder.blocks.3.mhsa.linear_q") -> part name as in evaluate/flops.py."""
    parts = module_path.split(".")
    if module_path.startswith("asr.encoder.subsampling"):
        return "subsampling"
    if module_path.startswith("asr.ctc"):
        return "ctc_head"
    if module_path.startswith("asr.decoder"):
        return "attention_decoder"
    if module_path.startswith("asr.encoder.projections"):
        return "projection"
    if module_path.startswith("asr.encoder.blocks.") and len(parts) > 4 and parts[4] in BLOCK_PARTS:
        return BLOCK_PARTS[parts[4]]
    return "other"


def utterance_ops(
    model,
    seconds: float,
    precision: str = "fp16",
    frame_shift_s: float = 0.01,
    idim: int = 80,
    decoder_tokens: int | None = None,
    tokens_per_second: float = 3.0,
) -> list[dict]:
    """Op records of one utterance of `seconds` audio through `model` (a DualDecoderASR on any device, meta
    included): encoder, CTC head and the attention decoder teacher-forced on 3 tokens per audio second, the same
    pass as evaluate/flops.count_flops. Batch 1, eval mode (restored afterwards)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    with eval_mode(model):
        return count_ops(
            *utterance_inputs(model, seconds, frame_shift_s, idim, decoder_tokens, tokens_per_second),
            precision=precision,
        )


def sustained_flops(profile: dict, precision: str) -> float:
    """peak_flops[precision] * efficiency of a loaded profile; a clear error when the precision is not listed."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_BYTES)}, got {precision!r}")
    peaks = profile.get("peak_flops") or {}
    if precision not in peaks:
        raise ValueError(
            f"device profile {profile.get('name')!r} has no {precision} peak (it lists "
            f"{sorted(peaks)}); use precision='{next(iter(peaks), 'fp16')}' or another profile"
        )
    return _figure(profile, "peak_flops", precision) * _figure(profile, "efficiency")


def estimate_from_ops(records: list[dict], seconds: float, profile: str | Path | dict, precision: str = "fp16") -> dict:
    """The device estimate for op records already counted at `precision` (see estimate_rtf)."""
    prof = load_profile(profile)
    peak = sustained_flops(prof, precision)
    bandwidth = _figure(prof, "memory_bandwidth")

    total = roofline(records, peak, bandwidth)
    parts = {}
    for part in AGGREGATES:
        sub = [r for r in records if part_of(r["module"]) == part]
        parts[part] = roofline(sub, peak, bandwidth)["seconds"] / seconds if sub else 0.0
    weight_bytes = sum(r["weight_bytes"] for r in records)
    return {
        "rtf": total["seconds"] / seconds,
        "flops_per_audio_second": total["flops"] / seconds,
        "bytes_per_audio_second": total["bytes"] / seconds,
        "weight_bytes_per_forward": weight_bytes,
        "activation_bytes_per_forward": total["bytes"] - weight_bytes,
        "bound": total["bound"],
        "rtf_compute_only": total["compute_only_seconds"] / seconds,
        "rtf_memory_only": total["memory_only_seconds"] / seconds,
        "rtf_whole_model": total["whole_model_seconds"] / seconds,
        "rtf_by_part": parts,
        "n_ops": len(records),
        "seconds": seconds,
        "precision": precision,
        "device": prof.get("name"),
        "sustained_flops": peak,
        "memory_bandwidth": bandwidth,
        "model": "per-op roofline: sum over ops of max(flops / (peak * efficiency), bytes / bandwidth)",
        "note": "estimate",
    }


def estimate_rtf(model, seconds: float, profile: str | Path | dict, precision: str = "fp16", **utterance) -> dict:
    """Estimated real-time factor of `model` (a DualDecoderASR, any device incl. meta) on a device profile for an
    utterance (or streaming chunk) of `seconds` audio; weights are read once per forward, so shorter forwards
    (streaming chunks) pay the weight traffic more often per audio second. `utterance`: frame_shift_s, idim,
    decoder_tokens, tokens_per_second of utterance_ops.

    Returns rtf, flops_per_audio_second, bytes_per_audio_second, weight/activation bytes, bound
    ("compute"|"memory"), the compute-only / memory-only / whole-model RTFs, per-part RTFs, device,
    precision and note="estimate"."""
    prof = load_profile(profile)
    sustained_flops(prof, precision)  # fail on a bad profile or precision before counting
    return estimate_from_ops(utterance_ops(model, seconds, precision, **utterance), seconds, prof, precision)


def estimate_all(
    model, seconds: float, profiles: list[str] | None = None, precision: str = "fp16", **utterance
) -> dict:
    """{profile name: estimate_rtf(...)} for several devices (default: every bundled profile), counted once."""
    profiles = profiles or available_profiles()
    for name in profiles:
        sustained_flops(load_profile(name), precision)  # fail before counting
    records = utterance_ops(model, seconds, precision, **utterance)
    return {name: estimate_from_ops(records, seconds, name, precision) for name in profiles}


def comparison_table(models=("small", "paper"), seconds=10.0, vocab_size=256, precision="fp16") -> str:
    """Markdown table of docs/evaluation.md: per model config and subsampling, counted work and the estimated
    RTF on every bundled profile (models built on the meta device)."""

    profiles = available_profiles()
    lines = [
        "| model | subsampling | GFLOPs / audio s | MB moved / audio s | weights MB | " + " | ".join(profiles) + " |",
        "|---" * (5 + len(profiles)) + "|",
    ]
    for name in models:
        for variant in ("vanilla", "dws"):
            cfg = compose([f"model={name}", f"model.subsampling={variant}"])
            with torch.device("meta"):
                model = build_model(OmegaConf.to_container(cfg.model, resolve=True), vocab_size).eval()
            est = estimate_all(model, seconds, profiles, precision, idim=cfg.model.n_mels)
            e = est[profiles[0]]
            lines.append(
                f"| {name} | {variant} | {e['flops_per_audio_second'] / 1e9:.3f} | "
                f"{e['bytes_per_audio_second'] / 1e6:.1f} | {e['weight_bytes_per_forward'] / 1e6:.1f} | "
                + " | ".join(f"{est[p]['rtf']:.2g} ({est[p]['bound']})" for p in profiles)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(comparison_table())
