"""Pre-normalized LayerNorm: LN(x; eps) = LN(x / s; eps / s^2), chosen so FP16 arithmetic cannot overflow.

LayerNorm computes y = x - mean(x) and the Lp sum sum_i |y_i|^p (p = 2: the variance). In FP16 that sum
overflows as soon as it passes M = 65504 (one |y_i| >= 256 is enough), and small |y_i|^p underflow below the
smallest normal m = 2^-14. For any s > 0 the output is unchanged if y is divided by s and eps by s^2, so s can be
chosen to keep every partial sum of |y_i / s|^p finite while as few terms as possible underflow. The choices
(docs/stabilization.md, section 1, has the statements and proofs that `bounds` returns):

* ``none``: s = 1 (plain LayerNorm).
* ``mad``: s = mean |y_i| (Xu et al. 2023). sum |y_i/s|^p <= 2 (d/2)^p for an exactly centered row, d^p for a
  computed one (its rounded mean leaves sum y != 0). FP16, p = 2: proven overflow-free for d <= 217; the extremal
  computed row first overflows at d = 256 (`first_overflow_d`, the measured limit).
* ``linf``: s = max |y_i|. sum |y_i/s|^p <= d.
* ``optimal``: the smallest power of two s with d (max|y_i| / s)^p * gamma <= M (gamma: rounding growth of the
  sum). Among all s that this bound proves overflow-free for every row with that max, it leaves the fewest terms
  underflowing; a power of two makes y / s exact.

Everything is computed in x.dtype, so a float16 input really runs float16 arithmetic (CPU torch widens reductions
internally; ``accumulate="sequential"`` rounds after every addition instead, as a device accumulating in the
format does).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)  # cumsum_in_format's numpy path
PRENORMS = ("none", "mad", "linf", "optimal")


@dataclass(frozen=True)
class FloatFormat:
    name: str
    max: float  # largest finite value M
    min_normal: float  # smallest positive normal m
    min_subnormal: float  # smallest positive subnormal
    mantissa_bits: int  # stored fraction bits; unit roundoff u = 2^-(mantissa_bits + 1)
    dtype: torch.dtype

    @property
    def unit_roundoff(self):
        return 2.0 ** -(self.mantissa_bits + 1)


FORMATS = {
    "fp16": FloatFormat("fp16", 65504.0, 2.0**-14, 2.0**-24, 10, torch.float16),
    "bf16": FloatFormat("bf16", float(torch.finfo(torch.bfloat16).max), 2.0**-126, 2.0**-133, 7, torch.bfloat16),
    "fp32": FloatFormat("fp32", float(torch.finfo(torch.float32).max), 2.0**-126, 2.0**-149, 23, torch.float32),
}
_BY_DTYPE = {f.dtype: f for f in FORMATS.values()}


def get_format(fmt):
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        if fmt not in _BY_DTYPE:
            raise ValueError(f"no float format for dtype {fmt}; use one of {sorted(FORMATS)}")
        return _BY_DTYPE[fmt]
    if fmt not in FORMATS:
        raise ValueError(f"unknown float format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _check(prenorm, p):
    if prenorm not in PRENORMS:
        raise ValueError(f"unknown prenorm {prenorm!r}; choose one of {PRENORMS}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2 (the Lp sum the layer computes), got {p!r}")


# ---------------------------------------------------------------------------------------------------------------
# Accumulation that rounds after every addition (what a device accumulating in the format does).


def cumsum_in_format(v, fmt=None, dim=-1):
    """Every partial sum v_1, v_1 + v_2, ... with one rounding to the format per addition (left to right).

    On CPU without autograd: numpy's add.accumulate in the format's own dtype (float16/32/64), which stores every
    partial sum in that dtype. numpy adds two float16 numbers in float32 and rounds the result to float16: exactly
    the float16 sum, as float32's 24-bit significand is >= 2 x 11 + 2 bits (double rounding is then innocuous,
    Figueroa 1995); tested bit for bit against the loop below. One call instead of 2d small torch calls: this is
    what the FP16-accumulation ablation's sequential LayerNorms spend their time on. Otherwise (bfloat16, other
    devices, gradients) a Python loop over `dim`, vectorised over all other dimensions."""
    dtype = v.dtype if fmt is None else get_format(fmt).dtype
    v = v.to(dtype).movedim(dim, -1)
    if v.device.type == "cpu" and dtype in NUMPY_DTYPES and not (torch.is_grad_enabled() and v.requires_grad):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the point of the simulation
            out = torch.from_numpy(np.add.accumulate(v.detach().contiguous().numpy(), axis=-1))
        return out.movedim(-1, dim)
    out = torch.empty_like(v)
    acc = v[..., 0]
    out[..., 0] = acc
    for i in range(1, v.shape[-1]):
        acc = acc + v[..., i]  # one rounding in `dtype`: torch rounds each elementwise add to the tensor dtype
        out[..., i] = acc
    return out.movedim(-1, dim)


def sum_in_format(v, fmt=None, dim=-1):
    """sum over `dim`, rounded after every addition in the format (see cumsum_in_format)."""
    return cumsum_in_format(v, fmt, dim).select(dim, -1)


def _mean(v, dim, accumulate):
    # (..., d, ...) -> (..., 1, ...). "sequential" divides by a power of two 2^e >= d *before* summing, so partial
    # sums stay <= max|v| and never overflow (the division is exact outside the subnormal range); it multiplies by
    # 2^e / d after.
    if accumulate == "native":
        return v.mean(dim, keepdim=True)
    if accumulate != "sequential":
        raise ValueError(f"accumulate must be 'native' or 'sequential', got {accumulate!r}")
    d = v.shape[dim]
    scale = 2.0 ** math.ceil(math.log2(d))
    return sum_in_format(v / scale, None, dim).unsqueeze(dim) * (scale / d)


def centered(x, dim=-1, accumulate="native"):
    """y = x - mean(x) over `dim`, in x.dtype (the first step of LayerNorm)."""
    return x - _mean(x, dim, accumulate)


def _sum(v, dim, accumulate):
    if accumulate == "native":
        return v.sum(dim, keepdim=True)
    return sum_in_format(v, None, dim).unsqueeze(dim)


# ---------------------------------------------------------------------------------------------------------------
# The pre-normalizer and its guarantees.


def rounding_growth(prenorm, p, fmt, d):
    """gamma >= 1: how much rounding can inflate the computed sum_i |y_i/s|^p over its exact value.

    Sequential sum of d non-negative terms: (1+u)^(d-1); squaring: (1+u); a computed MAD below the true one by at
    most (1-u)^(d+2) (sum of |y_i|/2^e plus two scalings) enlarges each |y_i/s| by its inverse. L-inf and the
    power-of-two "optimal" s divide without error."""
    u = get_format(fmt).unit_roundoff
    log_g = (max(d, 1) - 1 + (p == 2)) * math.log1p(u)
    if prenorm == "mad":
        log_g += p * math.log1p(u) - p * (d + 2) * math.log1p(-u)
    return math.exp(min(log_g, 700.0))  # capped far beyond any format's range instead of overflowing


def overflow_safe_scale(amax, p, fmt, d):
    """Smallest power of two s with gamma * d * (amax / s)^p <= M (the "optimal" pre-normalizer), elementwise.

    amax: tensor of row maxima max|y_i| (any float dtype; the exponent is computed in float64, so exactly)."""
    f = get_format(fmt)
    gamma = rounding_growth("optimal", p, f, d)
    s0 = amax.double() * (gamma * d / f.max) ** (1.0 / p)  # the continuous optimum
    e = torch.ceil(torch.log2(s0))
    # log2 may round; step up where 2^e still falls short, so the guarantee holds exactly
    e = torch.where(torch.exp2(e) < s0, e + 1, e)
    return torch.exp2(e)


def scale_floor(eps, fmt):
    """Smallest s the layer uses: a power of two >= max(m, sqrt(2 eps / M)), so eps / s^2 <= M / 2 stays finite and
    a constant row (s = 0) divides 0 by a normal number, giving LN = bias as nn.LayerNorm does."""
    f = get_format(fmt)
    floor = max(f.min_normal, math.sqrt(2 * eps / f.max))
    return 2.0 ** math.ceil(math.log2(floor))


def prenormalizer(y, prenorm="mad", p=2, fmt="fp16", dim=-1, eps=1e-5, accumulate="native"):
    """s of shape y with `dim` kept as 1, in y.dtype; y must already be centered (y = x - mean(x))."""
    _check(prenorm, p)
    if prenorm == "none":
        return torch.ones_like(y.select(dim, 0)).unsqueeze(dim)
    a = y.abs()
    if prenorm == "mad":
        s = _mean(a, dim, accumulate)
    else:
        s = a.amax(dim, keepdim=True)
        if prenorm == "optimal":
            s = overflow_safe_scale(s, p, fmt, y.shape[dim]).to(y.dtype)
    return s.clamp_min(scale_floor(eps, fmt))


def _sup_sum(prenorm, p, d, centered_exactly):
    # sup of sum_i |y_i / s|^p over rows y in R^d, exact arithmetic, s the row's own pre-normalizer
    if prenorm == "mad":
        # sum |z_i| = d; on {sum z = 0} the vertices are (d/2)(e_i - e_j); a computed row is only approximately
        # centered (its mean is rounded), and without sum z = 0 the vertex is d e_i
        if d < 2:
            return 0.0 if centered_exactly else 1.0
        return 2 * (d / 2) ** p if centered_exactly else float(d) ** p
    return float(d)  # L-inf: every term <= 1


def bounds(prenorm, p, fmt, d):
    """The guarantees of docs/stabilization.md section 1 for the Lp sum sum_i |y_i / s|^p of a row y = x - mean(x)
    (d entries) computed in the format, with the layer's own pre-normalizer s (rows whose s was raised to
    scale_floor have their own statement in the docs). Underflow: FTZ worst case, a term below m is lost entirely
    (gradual underflow loses at most min_subnormal / 2 per term).

    max_sum_exact       sup of the exact sum over exactly centered rows (sum y = 0); inf: no bound
    max_sum_computed    the same without sum y = 0, as the computed mean is rounded (differs for MAD only)
    rounding_growth     gamma: the computed partial sums are <= gamma * exact sum of the computed terms
    max_partial_sum     gamma * max_sum_computed: no computed partial sum exceeds it (optimal: M by construction)
    overflow_free       max_partial_sum <= M: no partial sum can overflow, for any input (sufficient, not
                        necessary: False does not mean that some row overflows)
    largest_safe_d      largest d with overflow_free (None: every d; 0: none): the width the proof covers, a lower
                        bound on the width at which a row really overflows (`first_overflow_d`)
    largest_safe_d_centered  the same for exactly centered rows (differs for MAD only)
    underflow_ratio     a term can underflow only if |y_i| < underflow_ratio * max|y| (None for "none")
    underflow_abs       "none" only: a term underflows iff 0 < |y_i| < m^(1/p)
    max_underflow_terms at most this many of the d terms underflow
    underflow_rel_error the underflowed terms carry at most this fraction of the sum
    """
    _check(prenorm, p)
    f = get_format(fmt)
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    M = f.max
    gamma = rounding_growth(prenorm, p, f, d)
    if prenorm == "none":
        exact = computed = math.inf
    elif prenorm == "optimal":
        exact = computed = M / gamma  # by construction of overflow_safe_scale
    else:
        exact, computed = _sup_sum(prenorm, p, d, True), _sup_sum(prenorm, p, d, False)
    max_partial = M if prenorm == "optimal" else computed * gamma
    safe = {"none": (0, 0), "optimal": (None, None)}.get(prenorm)
    if safe is None:
        safe = (_largest_safe_d(prenorm, p, f, False), _largest_safe_d(prenorm, p, f, True))
    return {
        "prenorm": prenorm,
        "p": p,
        "format": f.name,
        "d": d,
        "max_sum_exact": exact,
        "max_sum_computed": computed,
        "rounding_growth": gamma,
        "max_partial_sum": max_partial,
        "overflow_free": max_partial <= M,
        "largest_safe_d": safe[0],
        "largest_safe_d_centered": safe[1],
        **_underflow_bounds(prenorm, p, f, d, gamma),
    }


def _underflow_bounds(prenorm, p, f, d, gamma):
    # The underflow entries of `bounds` (FTZ worst case: a term below m is lost entirely).
    M, m, u = f.max, f.min_normal, f.unit_roundoff
    # smallest possible sum, which lost terms are compared with: mean|z| = 1 (MAD, up to the rounding of s),
    # max|z| = 1 (L-inf, exact), (max|y| / s)^p > M / (2^p gamma d) (optimal: s < twice its continuous optimum)
    min_sum = {"none": 0.0, "mad": d / gamma, "linf": 1.0, "optimal": M * (1 - u) / (2**p * gamma * d)}[prenorm]
    ratio = {
        "none": None,
        "mad": m ** (1 / p),  # s = mean|y| <= max|y|
        "linf": m ** (1 / p),
        "optimal": (2**p * gamma * d * m / M) ** (1 / p),
    }[prenorm]
    n_under = d if prenorm == "none" else d - 1  # the largest term of a pre-normalized row is >= 1 > m
    return {
        "underflow_ratio": ratio,
        "underflow_abs": m ** (1 / p) if prenorm == "none" else None,
        "max_underflow_terms": n_under,
        "underflow_rel_error": math.inf if min_sum == 0 else min(1.0, n_under * m / min_sum),
    }


def _largest_safe_d(prenorm, p, f, centered_exactly, limit=1 << 24):
    # gamma(d) * sup(d) grows with d: bisect for the last d whose bound stays <= M (None: beyond `limit`)
    def safe(d):
        return _sup_sum(prenorm, p, d, centered_exactly) * rounding_growth(prenorm, p, f, d) <= f.max

    if safe(limit):
        return None
    lo, hi = 1, limit  # safe(lo), not safe(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if safe(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------------------------
# The measured limit: the extremal rows of section 1.4 run through the layer's own arithmetic. `bounds` gives the
# widths the proof covers (gamma * sup <= M is sufficient for no overflow, not necessary); these functions find the
# width at which an overflow actually happens.


def computed_lp_sum(x, prenorm="mad", p=2, fmt="fp16", dim=-1, eps=1e-5, accumulate="sequential"):
    """Per row of x: the Lp sum sum_i |y_i / s|^p as `layer_norm` forms it, inf where it overflows.

    x is cast to the format; centering, pre-normalizer, z = y / s and |z|^p run in it. "sequential": the sum in the
    format, rounded after every addition (terms are >= 0, so it is the largest partial sum). "native": the layer
    never forms the sum in the format (torch's half mean accumulates in float32 and rounds once), so the exact sum
    of the computed terms is returned in float64, inf where a term or the layer's mean of the terms is inf."""
    _check(prenorm, p)
    x = x.to(get_format(fmt).dtype)
    dim = dim % x.dim()
    y = centered(x, dim, accumulate)
    s = prenormalizer(y, prenorm, p, fmt, dim, eps, accumulate)
    z = y / s
    t = z.abs() if p == 1 else z * z
    if accumulate == "sequential":
        return sum_in_format(t, None, dim)
    over = torch.isinf(t).any(dim) | torch.isinf(t.mean(dim))
    return torch.where(over, math.inf, t.double().sum(dim))


def worst_case_row(d, prenorm="mad", fmt="fp16", centred=False, accumulate="sequential"):
    """A row x (d,) in the format whose computed y attains the sup of S_p(y / s) of section 1.4 (p-independent).

    mad, centred=False: the computed-row vertex d e_d, y = (0, ..., 0, 1), |z_d| = d. It exists only because the
    computed mean is rounded: x = 2^t + k everywhere (t stored fraction bits: 1024 + k in FP16, spacing 1) and
    2^t + k + 1 in the last entry, whose exact mean 2^t + k + 1/d rounds to the bulk value. k is the smallest value
    for which the layer's own centering (`accumulate`) gives exactly that y (ValueError if none does).
    mad, centred=True: the exactly centred vertex (d/2)(e_1 - e_2): x = (1, -1, 0, ..., 0), |z_1| = |z_2| = d/2.
    linf, optimal: alternating +-1, every |y_i| = max|y| (exactly centred for even d)."""
    _check(prenorm, 2)
    f = get_format(fmt)
    if prenorm == "none":
        raise ValueError("prenorm 'none' has no worst-case row of a given width: its sum grows with the values")
    if d < 2:
        return torch.zeros(max(d, 0), dtype=f.dtype)
    if prenorm != "mad":
        return torch.tensor([1.0, -1.0] * (d // 2) + [1.0] * (d % 2), dtype=f.dtype)
    if centred:
        x = torch.zeros(d, dtype=f.dtype)
        x[0], x[1] = 1.0, -1.0
        return x
    target = torch.zeros(d, dtype=f.dtype)
    target[-1] = 1.0
    base = 2.0**f.mantissa_bits
    for start in range(0, 2**f.mantissa_bits - 1, 64):  # candidate bulk values, 64 at a time
        k = torch.arange(start, min(start + 64, 2**f.mantissa_bits - 1), dtype=torch.float64)
        x = (base + k)[:, None].expand(-1, d).clone()  # (64, d), exact in the format
        x[:, -1] += 1
        x = x.to(f.dtype)
        ok = (centered(x, -1, accumulate) == target).all(-1)
        if ok.any():
            return x[int(ok.nonzero()[0])]
    raise ValueError(
        f"no bulk value in [2^{f.mantissa_bits}, 2^{f.mantissa_bits + 1}) centres to a single spike "
        f"at d = {d} ({fmt}, {accumulate})"
    )


def first_overflow_d(prenorm="mad", p=2, fmt="fp16", centred=False, accumulate="sequential", d_max=4096):
    """Smallest d at which the worst-case row (`worst_case_row`) overflows the layer's Lp sum (`computed_lp_sum`).

    Scans d upward from the largest width the proof covers (`bounds`: below it no row can overflow, so nothing is
    skipped); None when it finds no overflow up to d_max, or when the proof already covers every d. This is the
    measured limit of docs/stabilization.md section 1.5: the proof's largest safe d is a lower bound on it."""
    _check(prenorm, p)
    f = get_format(fmt)
    if prenorm == "none":
        raise ValueError("prenorm 'none' overflows at every width for large enough values")
    if prenorm == "optimal":
        return None  # M by construction (overflow_safe_scale)
    proven = _largest_safe_d(prenorm, p, f, centred)
    if proven is None:
        return None
    for d in range(max(proven + 1, 1), d_max + 1):
        x = worst_case_row(d, prenorm, f, centred, accumulate)
        if math.isinf(float(computed_lp_sum(x, prenorm, p, f, -1, 1e-5, accumulate))):
            return d
    return None


def layer_norm(x, weight, bias, eps, prenorm="none", p=2, fmt="fp16", dim=-1, accumulate="native"):
    """LayerNorm over `dim` computed in x.dtype as LN(x / s; eps / s^2).

    weight/bias: (C,) (or None) broadcast along `dim` (dim=1 for the (B, C, 1, S) layout). `fmt` is the format the
    pre-normalizer is chosen for; `p` only affects "optimal". accumulate="sequential" rounds every reduction after
    each addition (a device accumulating in the format); the variance is then the plain sum of squares divided by
    d, the sum the bounds of docs/stabilization.md are about."""
    _check(prenorm, p)
    dim = dim % x.dim()
    d = x.shape[dim]
    y = centered(x, dim, accumulate)  # (..., d, ...)
    s = prenormalizer(y, prenorm, p, fmt, dim, eps, accumulate)  # (..., 1, ...)
    z = y / s
    var = _sum(z * z, dim, accumulate) / d if accumulate == "sequential" else (z * z).mean(dim, keepdim=True)
    eps_s = eps / s / s  # eps / s^2 without forming s^2 (it may overflow)
    out = z * torch.rsqrt(var + eps_s)
    shape = [1] * x.dim()
    shape[dim] = d
    if weight is not None:
        out = out * weight.to(x.dtype).reshape(shape)
    if bias is not None:
        out = out + bias.to(x.dtype).reshape(shape)
    return out


class PreNormLayerNorm(nn.Module):
    """nn.LayerNorm over one dimension with a pre-normalizer; keeps the LayerNorm's weight and bias."""

    def __init__(self, normalized_shape, eps=1e-5, prenorm="mad", p=2, fmt="fp16", dim=-1, accumulate="native"):
        super().__init__()
        _check(prenorm, p)
        get_format(fmt)
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps, self.prenorm, self.p, self.fmt, self.dim, self.accumulate = eps, prenorm, p, fmt, dim, accumulate

    @classmethod
    def from_layernorm(cls, ln, prenorm="mad", p=2, fmt="fp16", dim=-1, accumulate="native"):
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"only LayerNorm over one dimension is supported, got {tuple(ln.normalized_shape)}")
        m = cls(ln.normalized_shape[0], ln.eps, prenorm, p, fmt, dim, accumulate)
        with torch.no_grad():
            if ln.weight is not None:
                m.weight.copy_(ln.weight)
            if ln.bias is not None:
                m.bias.copy_(ln.bias)
        if ln.weight is not None:
            m.to(ln.weight.device, ln.weight.dtype)
        return m

    def forward(self, x):
        return layer_norm(
            x, self.weight, self.bias, self.eps, self.prenorm, self.p, self.fmt, self.dim, self.accumulate
        )

    def extra_repr(self):
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, prenorm={self.prenorm}, p={self.p}, fmt={self.fmt}, "
            f"dim={self.dim}, accumulate={self.accumulate}"
        )
