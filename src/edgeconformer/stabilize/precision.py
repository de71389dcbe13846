"""FP16 simulation on CPU: run a model end to end in float16 and say exactly where the simulation is not FP16.

`to_precision(module, "fp16")` casts a copy of a module; `run_fp16(module, *inputs)` runs it under
`HalfSimulation`, a TorchFunctionMode that sees every torch call and

* falls back to float32 for ops without a CPU half kernel (cast in, run in float32, cast out): any op that raises
  on half inputs and succeeds in float32 is wrapped, and `force_fp32` names ops to wrap always. Every wrapped
  call is counted in the report's `fallback_ops`. Measured in torch 2.9.1 (`probe_cpu_half`): every op of the
  Conformer, its ANE-layout graph, the pre-normalized LayerNorm and the LUT softmax has a half kernel, so their
  `fallback_ops` is empty; quantile, FFT/STFT, linalg, cdist, polar and ctc_loss have none.
* counts the calls of ops that accumulate wider than FP16 inside their half kernel (`wide_accumulation_ops`):
  on CPU, sum/mean/cumsum, matmul/linear/einsum/convolutions, layer_norm, softmax, vector norms and fused
  attention all accumulate in float32 and round once at the end (`probe_cpu_half` measures it: partial sums that
  pass 65504 do not overflow). An accelerator accumulating in FP16 would overflow or lose precision there, so
  the CPU simulation is optimistic for exactly these calls (docs/stabilization.md section 5).
* computes the convolutions and matrix products among them (conv1d/conv2d, matmul/bmm/mm, einsum;
  `FP32_COMPUTE`) in float32 from their half inputs and weights and rounds the result to float16 once; the
  report counts these calls in `fp32_compute_ops` as well as in `wide_accumulation_ops` (they are not fallbacks:
  the ops have half kernels). The semantics are those of the CPU half kernel: FP16 storage (half inputs and weights are
  exact in float32), a float32 accumulator, one rounding of the output (the bias included). Only the float32
  summation order differs: per call of the trained ANE graph (same inputs) 0.04% of the outputs differ on average,
  0.17% at most, by one FP16 ulp at the scale of the terms (more ulps only for results near zero, where partial
  sums cancel). The reason is speed: without AVX-512 FP16 the CPU half kernels take slow generic paths
  (convolutions: im2col + a scalar GEMM). Measured on one thread at T' = 249, half kernel vs float32 with the
  casts: 1x1 conv2d 144 -> 576 15.6 vs 0.66 ms, depthwise (1, 15) conv2d 1.6 vs 0.16 ms, the subsampling's 3x3
  conv2d 139 vs 5 ms, einsum 1.7-3.4 vs 0.13-0.2 ms, matmul/bmm 6.8 vs 0.4 ms; one 10 s utterance through the
  stabilized ANE graph 0.72 -> 0.11 s (native accumulation), 0.98 -> 0.40 s (FP16 accumulation, then mostly
  the LayerNorms' sequential FP16 sums: since computed by numpy's add.accumulate in float16, prenorm.py, a
  further x4.5 on the stabilize ablation's arms). Not switched: sum, mean, layer_norm, softmax, log_softmax (no faster
  in float32 with the casts, x0.4-0.9); linear (x6-9, but its half kernel rounds twice for a non-contiguous
  batched input, product then bias, and no simulated graph calls it); SDPA (x2.1, its half kernel's internal
  roundings not measured, not called either). bfloat16 simulation keeps the native kernels.
* with accumulate="fp16", re-computes sum and mean of half tensors as pairwise sums rounded to FP16 after every
  addition (`emulated_reductions` counts them), so a sum of squares that passes 65504 overflows as it would on
  such a device; `precision_model` also switches the graph's pre-normalized LayerNorms to their own FP16
  algorithm (prenorm.py, accumulate="sequential"). Matrix products, convolutions and the library softmax keep
  their float32 accumulators (log_softmax already rounds its denominator to FP16).

The pipeline's precision modes (`MODES`): "fp32" is the original PyTorch model; "fp16_unstabilized" the
ANE-layout model with plain LayerNorm, exact softmax and the Performer's own (unshifted) features in float16;
"fp16" the ANE-layout model with the configured pre-normalizer, the LUT softmax and shifted Performer features
in float16. `precision_model` builds one; the stabilize stage decodes the test split with each mode and counts the
utterances with non-finite log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_map

from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.stabilize.ane import ANEConformer
from edgeconformer.stabilize.prenorm import PreNormLayerNorm

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fp32", "fp16_unstabilized", "fp16")
ACCUMULATE = ("native", "fp16")


def get_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    return PRECISIONS[precision]


def to_precision(module: nn.Module, precision: str) -> nn.Module:
    """A deep copy of `module` with every floating parameter and buffer cast to `precision` ("fp32", "fp16",
    "bf16"); integer buffers and the train/eval mode are kept, the original is not modified."""
    return copy.deepcopy(module).to(get_dtype(precision))


_NAMES: dict = {}


def op_name(func) -> str:
    # "torch.Tensor.sum", "torch.nn.functional.conv2d", ...; falls back to the bare name for unresolvable callables.
    # Cached: resolve_name is slow next to a small op, and the simulation asks for every call.
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        name = resolve_name(func) or getattr(func, "__name__", repr(func))
    try:
        _NAMES[func] = name
    except TypeError:  # unhashable callable
        pass
    return name


# ------------------------------------------------------------------------------------------------ CPU half probes


def _probes() -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], bool]]]:
    """name -> (run the op on half inputs, does the result show an accumulator wider than FP16?).

    Each probe is built so that an FP16 accumulator, in any summation order, gives a visibly wrong answer: the
    partial sums pass 65504 (60000 + 60000) while the exact result is small, or a sum of 70000 terms is needed."""
    h = torch.float16
    big = torch.tensor([60000.0, 60000.0, -60000.0, -60000.0], dtype=h)  # exact sum 0, partial sums overflow
    ones4 = torch.ones(4, dtype=h)
    row = torch.tensor([300.0, -300.0] * 72, dtype=h)  # centred sum of squares 1.3e7 > 65504
    zeros = torch.zeros(70000, dtype=h)  # softmax denominator 70000 > 65504
    q = torch.full((1, 1, 1, 4), 240.0, dtype=h)
    k = torch.tensor([250.0, 250.0, -250.0, -250.0], dtype=h).reshape(1, 1, 1, 4)  # q.k partial sums overflow
    return {
        "sum": (lambda: big.sum(), lambda r: float(r) == 0.0),
        "mean": (lambda: big.mean(), lambda r: float(r) == 0.0),
        "cumsum": (lambda: big.cumsum(0)[-1], lambda r: float(r) == 0.0),
        "matmul": (lambda: big[None] @ ones4[:, None], lambda r: float(r) == 0.0),
        "linear": (lambda: F.linear(big[None], ones4[None]), lambda r: float(r) == 0.0),
        "einsum": (lambda: torch.einsum("i,i->", big, ones4), lambda r: float(r) == 0.0),
        "conv1d": (lambda: F.conv1d(big[None, None], ones4[None, None]), lambda r: float(r) == 0.0),
        "conv2d": (lambda: F.conv2d(big.reshape(1, 4, 1, 1), ones4.reshape(1, 4, 1, 1)), lambda r: float(r) == 0.0),
        "layer_norm": (
            lambda: F.layer_norm(row, (144,)),
            lambda r: bool(torch.isfinite(r).all()) and abs(float(r[0]) - 1.0) < 1e-2,
        ),
        "softmax": (lambda: torch.softmax(zeros, 0), lambda r: abs(float(r[0]) * 70000 - 1) < 1e-2),
        "log_softmax": (lambda: F.log_softmax(zeros, 0), lambda r: abs(float(r[0]) + math.log(70000)) < 1e-2),
        "vector_norm": (
            lambda: torch.linalg.vector_norm(torch.full((4,), 300.0, dtype=h)),
            lambda r: float(r) == 600.0,
        ),
        "scaled_dot_product_attention": (
            lambda: F.scaled_dot_product_attention(q, k, ones4.reshape(1, 1, 1, 4), scale=1.0),
            lambda r: bool(torch.isfinite(r).all()),
        ),
    }


# op names (as op_name spells them) of each probe; calls of these on half tensors are what the report counts
PROBED_OPS = {
    "sum": ("torch.sum", "torch.Tensor.sum"),
    "mean": ("torch.mean", "torch.Tensor.mean"),
    "cumsum": ("torch.cumsum", "torch.Tensor.cumsum"),
    "matmul": ("torch.matmul", "torch.Tensor.matmul", "torch.bmm", "torch.Tensor.bmm", "torch.mm", "torch.Tensor.mm"),
    "linear": ("torch.nn.functional.linear",),
    "einsum": ("torch.functional.einsum", "torch.einsum"),
    "conv1d": ("torch.nn.functional.conv1d",),
    "conv2d": ("torch.nn.functional.conv2d",),
    "layer_norm": ("torch.nn.functional.layer_norm",),
    "softmax": ("torch.softmax", "torch.Tensor.softmax", "torch.nn.functional.softmax"),
    "log_softmax": ("torch.log_softmax", "torch.Tensor.log_softmax", "torch.nn.functional.log_softmax"),
    "vector_norm": ("torch.linalg.vector_norm", "torch.norm", "torch.Tensor.norm", "torch.functional.norm"),
    "scaled_dot_product_attention": ("torch.nn.functional.scaled_dot_product_attention",),
}


@functools.lru_cache(maxsize=1)
def probe_cpu_half() -> dict[str, dict[str, bool | str | None]]:
    """Runs every probe on CPU half tensors: {name: {"half_kernel", "wide_accumulation", "error"}}.

    half_kernel False: the op refuses Half (the simulation must fall back to float32 for it). wide_accumulation
    True: its half kernel accumulates in a wider type, so it hides FP16 overflow and rounding of partial sums."""
    out = {}
    for name, (run, wide) in _probes().items():
        try:
            result = run()
        except (RuntimeError, NotImplementedError) as e:
            out[name] = {"half_kernel": False, "wide_accumulation": None, "error": str(e)}
            continue
        out[name] = {
            "half_kernel": result.dtype == torch.float16,
            "wide_accumulation": bool(wide(result)),
            "error": None,
        }
    return out


# Probes whose ops HalfSimulation computes in float32 and rounds once (see the module docstring): convolutions and
# matrix products, whose CPU half kernels are 10-30x slower than float32 with the casts.
FP32_COMPUTE = frozenset(op for name in ("conv1d", "conv2d", "matmul", "einsum") for op in PROBED_OPS[name])


def wide_accumulating_ops() -> dict[str, str]:
    """op name -> probe name, for every op whose CPU half kernel was measured to accumulate wider than FP16."""
    probes = probe_cpu_half()
    return {op: name for name, ops in PROBED_OPS.items() if probes[name]["wide_accumulation"] for op in ops}


# ------------------------------------------------------------------------------------------------ FP16 reductions


def pairwise_sum(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """sum over `dim` as a pairwise tree, every addition rounded to x.dtype (log2(n) vectorised adds).

    For non-negative terms (sums of squares) any order overflows exactly when the total passes the format's max, so
    the tree shows the same overflows as a sequential FP16 accumulator; its rounding error grows with log2(n)
    instead of n."""
    y = x.movedim(dim, -1)
    n = y.size(-1)
    if n == 0:
        s = y.new_zeros(y.shape[:-1])
    else:
        width = 1 << (n - 1).bit_length()
        y = F.pad(y, (0, width - n))  # zeros: adding them is exact
        while y.size(-1) > 1:
            y = y[..., 0::2] + y[..., 1::2]  # one rounding to x.dtype per addition
        s = y.squeeze(-1)
    return s.unsqueeze(dim % x.dim()) if keepdim else s


def _reduce_dims(x, dim):
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(x.dim()))
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return sorted({d % x.dim() for d in dims})


def fp16_sum(x: torch.Tensor, dim=None, keepdim: bool = False, mean: bool = False) -> torch.Tensor:
    """torch.sum / torch.mean semantics (dim int, tuple or None) with every addition rounded to x.dtype."""
    if x.dim() == 0:
        return x.clone()
    dims = _reduce_dims(x, dim)
    rest = [d for d in range(x.dim()) if d not in dims]
    y = x.permute(rest + dims).flatten(len(rest))  # (..., n): the reduced dims last, as one
    n = y.size(-1)
    s = pairwise_sum(y, -1)
    if mean:
        s = s / n  # one more rounding, as a device dividing the FP16 sum would
    if keepdim:
        shape = [1 if d in dims else x.size(d) for d in range(x.dim())]
        s = s.reshape(shape)
    return s


def _parse_reduction(args, kwargs):
    # torch.sum(input, dim=None, keepdim=False, *, dtype=None) and the Tensor method; None when not emulable
    if kwargs.get("dtype") is not None or kwargs.get("out") is not None:
        return None
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if isinstance(dim, torch.dtype) or isinstance(keepdim, torch.dtype):  # x.sum(torch.float32)
        return None
    return x, dim, bool(keepdim)


REDUCTIONS = {"torch.sum": False, "torch.Tensor.sum": False, "torch.mean": True, "torch.Tensor.mean": True}


# ------------------------------------------------------------------------------------------------ the simulation


class HalfSimulation(TorchFunctionMode):
    """Context manager: every torch call inside runs as FP16 as the CPU allows, and is accounted for.

    dtype: the simulated format (float16; bfloat16 works the same). force_fp32: op names (as `op_name` spells
    them, e.g. "torch.nn.functional.conv2d") always run in float32. accumulate: "native" (the CPU kernels) or
    "fp16" (sum/mean re-computed with FP16 additions). `report()` returns the counts.

    With float16, the wide-accumulating ops of `FP32_COMPUTE` (convolutions, matrix products) are computed in
    float32 from their half arguments and rounded to float16 once: the half kernel's own semantics (float32
    accumulator, one rounding), 10-30x faster on CPUs without AVX-512 FP16; only the float32 summation order differs
    (last-ulp differences, module docstring). Counted in `fp32_compute_ops` and `wide_accumulation_ops`, not in
    `fallback_ops`. Calls with an `out=` argument or float arguments of another dtype go to the half kernel."""

    def __init__(self, dtype: torch.dtype = torch.float16, force_fp32: Iterable[str] = (), accumulate: str = "native"):
        super().__init__()
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate={accumulate!r}: choose one of {ACCUMULATE}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfSimulation simulates float16 or bfloat16, got {dtype}")
        self.dtype, self.force_fp32, self.accumulate = dtype, frozenset(force_fp32), accumulate
        self.wide = wide_accumulating_ops()
        # only ops measured to accumulate wide in their half kernel: for them float32 compute + one rounding is the
        # kernel's own semantics
        self.fp32_compute = frozenset(FP32_COMPUTE & self.wide.keys()) if dtype == torch.float16 else frozenset()
        self.fallback_ops: Counter = Counter()
        self.wide_accumulation_ops: Counter = Counter()
        self.fp32_compute_ops: Counter = Counter()
        self.emulated_reductions: Counter = Counter()

    def _has_sim(self, args, kwargs):
        # Tensors of the simulated dtype among the arguments, one level into lists (torch.cat); no pytree walk:
        # this runs for every torch call.
        for a in (*args, *kwargs.values()):
            if torch.is_tensor(a):
                if a.dtype == self.dtype:
                    return True
            elif isinstance(a, (list, tuple)) and any(torch.is_tensor(t) and t.dtype == self.dtype for t in a):
                return True
        return False

    def _only_sim(self, args, kwargs):
        # Every floating tensor argument (one level into lists: einsum's operand list) is of the simulated dtype, and
        # no out= tensor: then float32 compute + one rounding is what the half kernel does. Mixed dtypes go to the
        # half kernel (which refuses them: a counted fallback, as without fp32 compute).
        if kwargs.get("out") is not None:
            return False
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if torch.is_tensor(t) and t.is_floating_point() and t.dtype != self.dtype:
                    return False
        return True

    def _fp32(self, func, args, kwargs):
        cast_in = lambda t: t.float() if torch.is_tensor(t) and t.dtype == self.dtype else t  # noqa: E731
        out = func(*tree_map(cast_in, args), **tree_map(cast_in, kwargs))
        cast_out = lambda t: t.to(self.dtype) if torch.is_tensor(t) and t.dtype == torch.float32 else t  # noqa: E731
        return tree_map(cast_out, out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name.endswith("__get__") or not self._has_sim(args, kwargs):  # attribute reads, non-half calls
            return func(*args, **kwargs)
        if name in self.force_fp32:
            self.fallback_ops[name] += 1
            return self._fp32(func, args, kwargs)
        if self.accumulate == "fp16" and name in REDUCTIONS:
            parsed = _parse_reduction(args, kwargs)
            if parsed is not None and parsed[0].dtype == self.dtype:
                self.emulated_reductions[name] += 1
                x, dim, keepdim = parsed
                return fp16_sum(x, dim, keepdim, mean=REDUCTIONS[name])
        if name in self.wide:
            self.wide_accumulation_ops[name] += 1
            if name in self.fp32_compute and self._only_sim(args, kwargs):
                self.fp32_compute_ops[name] += 1
                return self._fp32(func, args, kwargs)
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as error:
            if name.endswith("_") and not name.endswith("__"):
                raise  # in-place: a float32 copy would be modified instead of the tensor itself
            try:
                out = self._fp32(func, args, kwargs)
            except Exception:
                raise error from None  # not a missing half kernel: the original error is the real one
            self.fallback_ops[name] += 1
            return out

    def report(self) -> dict:
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "accumulate": self.accumulate,
            "fallback_ops": dict(self.fallback_ops),
            "wide_accumulation_ops": dict(self.wide_accumulation_ops),
            "fp32_compute_ops": dict(self.fp32_compute_ops),
            "emulated_reductions": dict(self.emulated_reductions),
        }


def _module_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


@torch.no_grad()
def run_fp16(
    module: nn.Module,
    *args,
    force_fp32: Iterable[str] = (),
    accumulate: str = "native",
    dtype: torch.dtype = torch.float16,
    **kwargs,
):
    """module(*args, **kwargs) under HalfSimulation, floating tensor inputs cast to `dtype`; the module must
    already be in that dtype (`to_precision(module, "fp16")`). Returns (output, report)."""
    have = _module_dtype(module)
    if have is not None and have != dtype:
        raise ValueError(
            f"run_fp16: the module's parameters are {have}, not {dtype}; cast a copy first with "
            f"to_precision(module, 'fp16')"
        )
    cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    with one_thread(), HalfSimulation(dtype, force_fp32, accumulate) as sim:
        out = module(*tree_map(cast, args), **tree_map(cast, kwargs))
    return out, sim.report()


@contextlib.contextmanager
def one_thread():
    """Runs half-precision CPU code on one intra-op thread: torch 2.9.1's CPU half depthwise conv2d stalls with two
    or more threads (measured: a (1, 144, 1, 150) x (144, 1, 1, 15) grouped convolution takes 1 ms on one thread
    and did not finish in 10 minutes on two). FP16 numerics do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ precision modes


# the per-call counts of HalfSimulation.report() that PrecisionModel sums over calls
SIMULATION_COUNTS = ("fallback_ops", "wide_accumulation_ops", "fp32_compute_ops", "emulated_reductions")


class PrecisionModel:
    """feats (B, T, F) raw log-mels (CMVN folded in) -> CTC log-probs (B, T', V) in float32, in one precision mode.

    `report` accumulates the simulation counts over every call (all zeros/empty for "fp32")."""

    def __init__(
        self, mode: str, module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], simulation: dict | None
    ):
        self.mode, self.module, self._forward, self.simulation = mode, module, forward, simulation
        self.report = {
            "mode": mode,
            "calls": 0,
            "fallback_ops": Counter(),
            "wide_accumulation_ops": Counter(),
            "fp32_compute_ops": Counter(),
            "emulated_reductions": Counter(),
        }

    @torch.no_grad()
    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        self.report["calls"] += 1
        if self.simulation is None:
            return self._forward(feats).float()
        out, rep = run_fp16(self.module, feats, **self.simulation)
        for key in SIMULATION_COUNTS:
            self.report[key].update(rep[key])
        return out.float()

    def summary(self) -> dict:
        """The report with plain dicts (JSON-ready)."""
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in self.report.items()}


def _fp32_model(asr, cmvn: nn.Module | None) -> PrecisionModel:
    """The "fp32" mode: a float32 copy of the original model (+ CMVN), run as trained (feats (B, T, F) -> CTC)."""
    model = copy.deepcopy(asr).float().eval()
    norm = None if cmvn is None else copy.deepcopy(cmvn).float()

    def forward(feats):
        feats = feats.float()
        lengths = torch.full((feats.size(0),), feats.size(1), dtype=torch.long)
        if norm is not None:
            feats = norm(feats, lengths)
        encoder_out, _ = model.encode(feats, lengths)
        return model.ctc_log_probs(encoder_out)

    return PrecisionModel("fp32", model, forward, None)


# The stabilized graph's options (ANEConformer's keyword arguments) when precision_model is not told otherwise.
STABILIZED = dict(
    prenorm="mad",
    p=2,
    fmt="fp16",
    softmax="lut",
    lut_size=256,
    lut_range=16.0,
    lut_interp="linear",
    lut_max_squarings=None,
    performer_shift=True,
)
UNSTABILIZED = dict(prenorm="none", softmax="exact", performer_shift=False)


def precision_model(
    asr, mode: str, cmvn: nn.Module | None = None, accumulate: str = "native", force_fp32: Iterable[str] = (), **options
) -> PrecisionModel:
    """A trained DualDecoderASR (+ its GlobalCMVN, or None when features are already normalised) in one of MODES.

    options (prenorm, p, fmt, softmax, lut_*, performer_shift; defaults STABILIZED) configure the stabilized "fp16"
    mode; "fp16_unstabilized" always uses prenorm "none", the exact softmax and the Performer's unshifted features;
    accumulate/force_fp32 configure the simulation of both FP16 modes."""

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if not isinstance(asr, DualDecoderASR):
        hint = " (an ASRModule? pass module.model and cmvn=module.cmvn)" if hasattr(asr, "model") else ""
        raise ValueError(f"precision_model needs a DualDecoderASR, got {type(asr).__name__}{hint}")
    unknown = set(options) - set(STABILIZED)
    if unknown:
        raise TypeError(f"precision_model got unknown options {sorted(unknown)}; the graph takes {sorted(STABILIZED)}")
    if mode == "fp32":
        return _fp32_model(asr, cmvn)
    options = {**STABILIZED, **options, **(UNSTABILIZED if mode == "fp16_unstabilized" else {})}
    ane = ANEConformer.from_asr(asr, cmvn, **options)
    half = to_precision(ane, "fp16").eval()
    if accumulate == "fp16":
        # The LayerNorms' own device algorithm: every reduction rounded after each addition, means taken as sums of
        # x / 2^e (no partial sum can overflow), the variance as the plain sum of squares / d: the sum that
        # overflows without a pre-normalizer (stabilize/prenorm.py, accumulate="sequential").
        for m in half.modules():
            if isinstance(m, PreNormLayerNorm):
                m.accumulate = "sequential"
    return PrecisionModel(mode, half, half, {"accumulate": accumulate, "force_fp32": tuple(force_fp32)})
