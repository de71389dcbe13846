"""Floating-point range audit: run a model over real utterances and record, per module, how close its
activations come to the limits of a target format (FP16 by default).

What is recorded (keyed by module name, as `model.named_modules()` spells it; only modules that ran):

* every module: `out_max_abs` / `in_max_abs` (largest finite |x| of its floating outputs / first input),
  `inf` and `nan` (non-finite outputs), `overflow` (finite outputs with |x| > the format's max: they would
  become inf), `underflow` (nonzero |x| < smallest normal, 2^-14 in FP16: subnormal, precision lost) and
  `flush_to_zero` (nonzero |x| < smallest subnormal, 2^-24 in FP16; a subset of `underflow`), `elements`.
* LayerNorm-type modules (nn.LayerNorm, prenorm.PreNormLayerNorm, the ANE graph's ChannelLayerNorm):
  `ln_sumsq_peak`, the largest sum over the normalised dim of (x - mean)^2 of any input row, and
  `ln_accumulated_peak`, the sum the module itself accumulates: the same for a plain LayerNorm, sum (y / s)^2
  for a pre-normalized one (s its pre-normalizer). An FP16 LayerNorm accumulates that sum before dividing by d,
  so it is the quantity that overflows (compare with 65504); `ln_rows_over` counts the rows where it exceeds the
  format's max, `ln_rows_nonfinite` the rows whose input already held inf/NaN.
* softmax modules (nn.Softmax, the LUT softmax): `softmax_logit_range` (max - min of the finite pre-softmax
  logits of a row, largest over rows) and `softmax_max_abs_logit`.

The statistics are exact: counts compare in float32 (which holds every FP16/BF16 value and the thresholds
exactly), sums of squares are computed in float64 from the module's actual input. A model running in FP32 shows
what *would* overflow or underflow in the target format; a model running in FP16 shows what did (inf/NaN, and
subnormals that survived). The original PyTorch model computes attention with the fused
F.scaled_dot_product_attention, so no softmax module is visible there; the report says so in its notes.

Run one utterance per batch (batch 1, how the on-device model runs): frames of padding would enter the
statistics otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
from matplotlib.figure import Figure

from edgeconformer.files import atomic_path, write_json_atomic
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.stabilize.prenorm import get_format, prenormalizer


def format_limits(fmt: str) -> dict[str, float]:
    """fmt ("fp16", "bf16", "fp32") -> {"max", "min_normal", "min_subnormal"}: 65504, 2^-14, 2^-24 for FP16."""
    f = get_format(fmt)
    return {"max": f.max, "min_normal": f.min_normal, "min_subnormal": f.min_subnormal}


def is_layernorm(module: nn.Module) -> bool:
    # nn.LayerNorm and the pre-normalized variants (PreNormLayerNorm, ANE channel LayerNorms) by class name,
    # so this file needs no import of the modules it audits.
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def is_softmax(module: nn.Module) -> bool:
    return isinstance(module, nn.Softmax) or type(module).__name__.endswith("Softmax")


def layernorm_dims(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """The dims a LayerNorm-type module normalises: nn.LayerNorm's trailing normalized_shape, else its `dim`
    attribute; without one, the channels (dim 1) of an ANE-layout (B, C, 1, S) input whose C matches the weight."""
    if isinstance(module, nn.LayerNorm):
        return tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    dim = getattr(module, "dim", None)
    if dim is None:
        weight = getattr(module, "weight", None)
        dim = 1 if x.dim() == 4 and weight is not None and x.size(1) == weight.numel() else -1
    return tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)


def centred_sumsq(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """sum over `dims` of (x - mean)^2, in float64: what a LayerNorm accumulates per row."""
    x = x.detach().double()
    y = x - x.mean(dims, keepdim=True)
    return (y * y).sum(dims)


def accumulated_sumsq(module: nn.Module, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The sum of squares the module itself accumulates, in float64: sum (y / s)^2 with the module's
    pre-normalizer s (stabilize/prenorm.py; `prenorm`, `p`, `fmt`, `eps` attributes), sum y^2 without one."""
    kind = getattr(module, "prenorm", "none")
    if kind == "none" or len(dims) != 1:
        return centred_sumsq(x, dims)
    x = x.detach().double()
    y = x - x.mean(dims, keepdim=True)
    s = prenormalizer(
        y, kind, getattr(module, "p", 2), getattr(module, "fmt", "fp16"), dims[0], getattr(module, "eps", 1e-5)
    )
    z = y / s
    return (z * z).sum(dims)


def value_counts(x: torch.Tensor, limits: dict[str, float]) -> dict[str, float | int]:
    """Exact counts and peak of one tensor against a format's limits (see the module docstring)."""
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()  # float32 holds FP16/BF16 values and the limits exactly
    if not x.numel():
        return {"max_abs": 0.0, "inf": 0, "nan": 0, "overflow": 0, "underflow": 0, "flush_to_zero": 0, "elements": 0}
    a = x.abs()
    # Few passes: NaN compares false everywhere, inf counts as "> max", so subtract those instead of masking.
    count = lambda m: int(torch.count_nonzero(m))  # noqa: E731
    nan, inf, zero = count(torch.isnan(a)), count(torch.isinf(a)), count(a == 0)
    peak = a.max() if nan + inf == 0 else a.masked_fill(~torch.isfinite(a), 0).max()
    return {
        "max_abs": float(peak),
        "inf": inf,
        "nan": nan,
        "overflow": count(a > limits["max"]) - inf,
        "underflow": count(a < limits["min_normal"]) - zero,
        "flush_to_zero": count(a < limits["min_subnormal"]) - zero,
        "elements": x.numel(),
    }


def logit_stats(scores: torch.Tensor, dim: int = -1) -> tuple[float, float]:
    """(largest per-row max - min, largest |logit|) over the finite logits; masked (-inf) entries are ignored."""
    x = scores.detach().double()
    finite = torch.isfinite(x)
    if not finite.any():
        return 0.0, 0.0
    row_max = x.masked_fill(~finite, -math.inf).amax(dim)
    row_min = x.masked_fill(~finite, math.inf).amin(dim)
    has = finite.any(dim)
    return float((row_max - row_min)[has].max()), float(x[finite].abs().max())


def _floats(obj) -> list[torch.Tensor]:
    # Floating tensors of a module output (a tensor, or a tuple/list/dict of them, e.g. (x, lengths)).
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _floats(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _floats(o)]
    return []


class _Recorder:
    """Forward hooks that fold every call of every module into one running record per module name."""

    COUNTS = ("inf", "nan", "overflow", "underflow", "flush_to_zero", "elements")

    CACHE = 16  # recent tensors: a container's output is its last child's, a module's input the previous output

    def __init__(self, model: nn.Module, limits: dict[str, float]):
        self.limits = limits
        self.records: dict[str, dict] = {}
        self.cache: dict[int, tuple[torch.Tensor, int, dict]] = {}
        # nn.Identity (e.g. the inference graph's dropout) passes its input on: its record would repeat the
        # previous module's and count its values twice in the summary.
        self.handles = [
            m.register_forward_hook(self._hook(name or "<root>"), with_kwargs=True)
            for name, m in model.named_modules()
            if not isinstance(m, nn.Identity)
        ]

    def counts(self, t: torch.Tensor) -> dict:
        # Keyed by object identity; the strong reference keeps the id from being reused by another tensor, and
        # the version counter catches in-place changes.
        hit = self.cache.get(id(t))
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        c = value_counts(t, self.limits)
        if len(self.cache) >= self.CACHE:
            del self.cache[next(iter(self.cache))]
        self.cache[id(t)] = (t, t._version, c)
        return c

    def _record(self, name, module):
        if name not in self.records:
            rec = {"type": type(module).__name__, "calls": 0, "out_max_abs": 0.0, "in_max_abs": 0.0}
            rec.update({k: 0 for k in self.COUNTS})
            if is_layernorm(module):
                rec.update(ln_sumsq_peak=0.0, ln_accumulated_peak=0.0, ln_rows_over=0, ln_rows_nonfinite=0)
            if is_softmax(module):
                rec.update(softmax_logit_range=0.0, softmax_max_abs_logit=0.0)
            self.records[name] = rec
        return self.records[name]

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            rec = self._record(name, module)
            rec["calls"] += 1
            for t in _floats(output):
                c = self.counts(t)
                rec["out_max_abs"] = max(rec["out_max_abs"], c["max_abs"])
                for k in self.COUNTS:
                    rec[k] += c[k]
            inputs = _floats(list(args[:1]))
            if not inputs:
                return
            x = inputs[0]
            rec["in_max_abs"] = max(rec["in_max_abs"], self.counts(x)["max_abs"])
            if "ln_sumsq_peak" in rec and x.numel():
                dims = layernorm_dims(module, x)
                raw, acc = centred_sumsq(x, dims), accumulated_sumsq(module, x, dims)
                finite = torch.isfinite(raw) & torch.isfinite(acc)  # rows with inf/NaN input overflowed upstream
                rec["ln_rows_nonfinite"] += int((~finite).sum())
                if finite.any():
                    rec["ln_sumsq_peak"] = max(rec["ln_sumsq_peak"], float(raw[finite].max()))
                    rec["ln_accumulated_peak"] = max(rec["ln_accumulated_peak"], float(acc[finite].max()))
                rec["ln_rows_over"] += int((acc[finite] > self.limits["max"]).sum())
            if "softmax_logit_range" in rec and x.numel():
                # LUT/exact softmax of the ANE graph: forward(scores, dim, mask=None); nn.Softmax: its .dim
                dim = args[1] if len(args) > 1 else kwargs.get("dim", getattr(module, "dim", None))
                mask = args[2] if len(args) > 2 else kwargs.get("mask")
                if mask is not None:  # True = may attend; masked scores are not logits of the row
                    x = x.detach().masked_fill(~mask, -math.inf)
                span, peak = logit_stats(x, -1 if dim is None else dim)
                rec["softmax_logit_range"] = max(rec["softmax_logit_range"], span)
                rec["softmax_max_abs_logit"] = max(rec["softmax_max_abs_logit"], peak)

        return hook

    def remove(self):
        self.cache.clear()
        for h in self.handles:
            h.remove()


def default_forward(model: nn.Module, batch) -> torch.Tensor:
    """One batch through the model: a DualDecoderASR runs encoder + CTC head (CMVN-normalised features in),
    anything else (an ANEConformer: raw log-mels in) is called on the features. `batch` is feats (B, T, F) or
    (feats, lengths)."""

    feats, lengths = batch if isinstance(batch, (tuple, list)) else (batch, None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), feats.dtype)
    feats = feats.to(dtype)
    if isinstance(model, DualDecoderASR):
        if lengths is None:
            lengths = torch.full((feats.size(0),), feats.size(1), dtype=torch.long)
        encoder_out, _ = model.encode(feats, lengths)
        return model.ctc_log_probs(encoder_out)
    return model(feats) if lengths is None else model(feats, lengths)


def _peak(rec: dict) -> float:
    return max(
        rec["out_max_abs"],
        rec["in_max_abs"],
        rec.get("ln_accumulated_peak", 0.0),
        rec.get("softmax_max_abs_logit", 0.0),
    )


def headroom_bits(peak: float, fmax: float) -> float | None:
    """log2(fmax / peak): doublings left before overflow (negative: overflow). None when peak is 0 or inf."""
    return math.log2(fmax / peak) if 0 < peak < math.inf else None


def _worst(records: dict[str, dict], key: Callable[[dict], float], fmax: float) -> dict:
    if not records:
        return {"module": None, "peak": 0.0, "headroom_bits": None}
    name = max(records, key=lambda n: key(records[n]))
    peak = key(records[name])
    return {"module": name, "peak": peak, "headroom_bits": headroom_bits(peak, fmax)}


def _summary(records: dict[str, dict], fmax: float) -> dict:
    """Adds each record's `peak` and `headroom_bits`; -> the report's summary: worst modules and totals."""
    for rec in records.values():
        rec["peak"] = _peak(rec)
        rec["headroom_bits"] = headroom_bits(rec["peak"], fmax)
    norms = {k: r for k, r in records.items() if "ln_sumsq_peak" in r}
    softmaxes = {k: r for k, r in records.items() if "softmax_logit_range" in r}
    totals = {k: sum(r[k] for r in records.values()) for k in ("inf", "nan", "overflow", "underflow", "flush_to_zero")}
    return {
        "worst": _worst(records, _peak, fmax),
        "worst_activation": _worst(records, lambda r: max(r["out_max_abs"], r["in_max_abs"]), fmax),
        "worst_layernorm_sumsq": _worst(norms, lambda r: r["ln_accumulated_peak"], fmax),
        "worst_layernorm_input_sumsq": _worst(norms, lambda r: r["ln_sumsq_peak"], fmax),
        "layernorm_rows_over": sum(r["ln_rows_over"] for r in norms.values()),
        "layernorm_rows_nonfinite": sum(r["ln_rows_nonfinite"] for r in norms.values()),
        "softmax_max_logit_range": max((r["softmax_logit_range"] for r in softmaxes.values()), default=None),
        "layernorm_modules": len(norms),
        "softmax_modules": len(softmaxes),
        **totals,
    }


@torch.no_grad()
def audit(
    model: nn.Module,
    batches: Iterable,
    fmt: str = "fp16",
    forward: Callable[[nn.Module, object], object] = default_forward,
) -> dict:
    """Runs `model` (eval mode, any dtype) over `batches` with forward hooks on every module; returns the
    report: {"format", "limits", "dtype", "batches", "modules": {name: record}, "summary", "notes"}."""
    limits = format_limits(fmt)
    if model.training:
        raise ValueError(
            "audit(model): put the model in eval mode first (model.eval()): dropout would change "
            "the activations being audited"
        )
    recorder = _Recorder(model, limits)
    n = 0
    try:
        for batch in batches:
            forward(model, batch)
            n += 1
    finally:
        recorder.remove()
    if n == 0:
        raise ValueError("audit(model, batches): no batches given; pass at least one utterance's features")

    records = recorder.records
    summary = _summary(records, limits["max"])
    notes = []
    if not summary["softmax_modules"]:
        notes.append(
            "no softmax module ran: attention is fused (F.scaled_dot_product_attention) or absent, so "
            "pre-softmax logits are not visible; audit the ANE-layout model to see them"
        )
    dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters()), "none")
    return {
        "format": fmt,
        "limits": limits,
        "dtype": dtype,
        "batches": n,
        "modules": records,
        "summary": summary,
        "notes": notes,
    }


def write_audit(report: dict, path_json: str | Path) -> Path:
    """Writes the report as JSON (temp file + os.replace: a reader never sees half a file)."""
    # allow_nan=False: strict JSON; audit() stores None, never inf/NaN, so this only guards against misuse.
    return write_json_atomic(path_json, report, indent=1, allow_nan=False)


def _front_end(records: dict[str, dict], prefix: str) -> dict[str, dict]:
    return {k: r for k, r in records.items() if prefix in k.split(".")}


def compare_audits(a: dict, b: dict, front_end: str = "subsampling") -> dict:
    """Per-module peak ratios b / a (in bits: log2 of the ratio; negative = b has the smaller range) over the
    modules both reports share, and the same for the front end as a whole (every module whose name contains the
    path component `front_end`; vanilla and DWS front ends have different layers, so only the whole compares)."""
    ma, mb = a["modules"], b["modules"]

    def ratio(pa, pb):
        return {
            "a_peak": pa,
            "b_peak": pb,
            "ratio": pb / pa if pa > 0 else None,
            "bits": math.log2(pb / pa) if pa > 0 and pb > 0 else None,
        }

    modules = {k: ratio(ma[k]["peak"], mb[k]["peak"]) for k in ma if k in mb}
    fa, fb = _front_end(ma, front_end), _front_end(mb, front_end)
    if not fa or not fb:
        raise ValueError(
            f"compare_audits: no module named with a {front_end!r} component in "
            f"{'a' if not fa else 'b'}; pass front_end= the front end's module name"
        )
    return {
        "modules": modules,
        "front_end": {
            "name": front_end,
            **ratio(max(r["peak"] for r in fa.values()), max(r["peak"] for r in fb.values())),
            "a_worst": max(fa, key=lambda k: fa[k]["peak"]),
            "b_worst": max(fb, key=lambda k: fb[k]["peak"]),
        },
        "only_in_a": sorted(set(ma) - set(mb)),
        "only_in_b": sorted(set(mb) - set(ma)),
    }


def _leaf_names(report: dict) -> list[str]:
    # Modules without children in the report (a parent's output repeats its last child's), dropouts left out (the
    # identity in eval mode); keeps the plot short.
    names = list(report["modules"])
    return [
        n
        for n in names
        if not any(m.startswith(n + ".") for m in names) and n != "<root>" and report["modules"][n]["type"] != "Dropout"
    ]


def _merged_order(lists: list[list[str]]) -> list[str]:
    # One order for several reports: a name only some reports have goes right after its predecessor there, so
    # e.g. the DWS front end's extra layer sits inside the front end, not after the CTC head.
    merged: list[str] = []
    for names in lists:
        prev = None
        for n in names:
            if n not in merged:
                merged.insert(merged.index(prev) + 1 if prev is not None else 0, n)
            prev = n
    return merged


def plot_audit(reports: dict[str, dict], path_png: str | Path) -> Path:
    """PNG: per module log2 of the peak |activation| (top) and of the LayerNorm sum-of-squares peak (bottom),
    one bar colour per report (e.g. vanilla vs DWS), the format's max marked. Written atomically."""
    if not reports:
        raise ValueError("plot_audit: no reports given")
    names = _merged_order([_leaf_names(r) for r in reports.values()])
    norms = [n for n in names if any("ln_sumsq_peak" in r["modules"].get(n, {}) for r in reports.values())]
    fmt = next(iter(reports.values()))["format"]
    fmax = format_limits(fmt)["max"]

    def log2(v):
        return math.log2(v) if v and v > 0 else float("nan")

    width = 0.8 / len(reports)
    # A Figure without pyplot: no global figure registry, no backend selection (headless by construction).
    fig = Figure(figsize=(max(8.0, 0.12 * len(names) * len(reports)), 10))
    axes = fig.subplots(2, 1)
    panels = [
        (axes[0], names, lambda rec: max(rec["out_max_abs"], rec["in_max_abs"]), "log2 max |activation|"),
        (axes[1], norms, lambda rec: rec.get("ln_accumulated_peak", 0.0), "log2 peak LayerNorm sum of squares"),
    ]
    for ax, keys, value, label in panels:
        for i, (rname, r) in enumerate(reports.items()):
            ys = [log2(value(r["modules"][k])) if k in r["modules"] else float("nan") for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], ys, width, label=rname)
        ax.axhline(math.log2(fmax), color="red", linestyle="--", label=f"{fmt} max ({fmax:g})")
        ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(keys))])
        ax.set_xticklabels(keys, rotation=90, fontsize=6)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_title(f"{fmt} range audit: " + " vs ".join(reports))
    fig.tight_layout()
    with atomic_path(path_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path_png)
