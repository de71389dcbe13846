"""Pre-normalized LayerNorm: FP32 equivalence, the overflow/underflow bounds of docs/stabilization.md (section 1)
checked with accumulation that rounds after every addition, FP16 accuracy against float64, and the FP16 failure
without a pre-normalizer."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeconformer.stabilize.prenorm import (
    FORMATS,
    PRENORMS,
    PreNormLayerNorm,
    bounds,
    centered,
    computed_lp_sum,
    cumsum_in_format,
    first_overflow_d,
    layer_norm,
    overflow_safe_scale,
    prenormalizer,
    scale_floor,
    sum_in_format,
    worst_case_row,
)

EPS = 1e-5
FAST = settings(max_examples=40, deadline=None)


# --- inputs -----------------------------------------------------------------------------------------------------

FAMILIES = ("huge", "tiny", "outlier", "constant", "normal", "two_spike", "offset")


def make_row(family, d, fmt, seed):
    """One adversarial row (d,) in the format: magnitudes near and beyond sqrt(M), near the smallest normal m, one
    outlier among small values, constant rows, N(0, 1), MAD's worst case (two opposite spikes) and a large mean."""
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(d, generator=g, dtype=torch.float64)
    r = torch.rand(3, generator=g, dtype=torch.float64)
    root = math.sqrt(f.max)
    if family == "huge":  # sqrt(M) / 4 .. sqrt(M) * 64, capped at M / 8 so x - mean(x) cannot overflow
        x = n * root * 2.0 ** (8 * r[0] - 2)
        x = x.clamp(-f.max / 8, f.max / 8)
    elif family == "tiny":  # around m, some subnormal
        x = n * f.min_normal * 2.0 ** (8 * r[0] - 4)
    elif family == "outlier":
        x = n * 1e-2
        x[int(r[1] * d) % d] = root * 2.0 ** (4 * r[0]) * (1 if r[2] > 0.5 else -1)
    elif family == "constant":
        x = torch.full((d,), float(n[0]) * 10 ** (4 * float(r[0]) - 2), dtype=torch.float64)
    elif family == "normal":
        x = n
    elif family == "two_spike":
        x = torch.zeros(d, dtype=torch.float64)
        if d >= 2:
            a = root * 2.0 ** (6 * r[0] - 3)
            x[0], x[-1] = a, -a
    else:  # "offset": a mean 10..100 times the spread
        x = n + float(10 ** (1 + r[0]))
    return x.to(f.dtype)


def reference(x, w, b):
    """float64 LayerNorm of the same (format-rounded) input and parameters."""
    x, w, b = x.double(), w.double(), b.double()
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def tolerance(x, w, out_ref, fmt, accumulate):
    """Worst-case error of layer_norm in `fmt` (first order, x 1.25 for higher-order terms), per element.

    Centering: the computed mean is off by dmu <= (u + d 2^-24) max|x| (native: float32 accumulation, one rounding)
    or <= d u max|x| (sequential), so each y_i is off by eta_i <= dmu (1 + u) + u |y_i| + min_subnormal. A perturbation
    eta of y moves n = y / sigma (sigma = sqrt(mean y^2 + eps)) by <= (eta_i + |n_i| max eta) / sigma. The
    normalisation itself (y/s, square, mean, + eps/s^2, rsqrt, product) adds c1 u |n_i| with c1 = 8 (native) or
    8 + (d - 1)/2 (sequential: the mean of squares gains (d-1) u); rounding eps / s / s adds
    |n_i| (2 u eps/s^2 + min_subnormal (1 + 1/s)) s^2 / (2 sigma^2); weight and bias add u |w n| + u |out|. The
    pre-normalizer's own rounding cancels: LN(y/s; eps/s^2) = LN(y; eps) for every s > 0."""
    f = FORMATS[fmt]
    u, mu = f.unit_roundoff, f.min_subnormal
    x64 = x.double()
    d = x64.shape[-1]
    y = x64 - x64.mean(-1, keepdim=True)
    sigma = torch.sqrt((y * y).mean(-1, keepdim=True) + EPS)
    n = y / sigma
    amax = x64.abs().amax(-1, keepdim=True)
    dmu = ((u + d * 2.0**-24) if accumulate == "native" else (d + 1) * u) * amax + d * mu
    eta = dmu * (1 + u) + u * y.abs() + mu
    c1 = 8 if accumulate == "native" else 8 + (d - 1) / 2
    s = torch.maximum(y.abs().amax(-1, keepdim=True), torch.tensor(scale_floor(EPS, fmt), dtype=torch.float64))
    s_lo = torch.tensor(scale_floor(EPS, fmt), dtype=torch.float64)  # smallest s the layer can use
    eps_term = (2 * u * EPS + mu * (1 + 1 / s_lo) * s * s) / (2 * sigma**2)
    tol_n = n.abs() * (c1 * u + eps_term) + (eta + n.abs() * eta.amax(-1, keepdim=True)) / sigma + mu * (1 + s / sigma)
    w = w.double().abs()
    return 1.25 * (w * tol_n + u * w * n.abs() + u * out_ref.abs()) + mu


def terms(y, s, p):
    z = y / s  # in the format
    return z.abs() if p == 1 else z * z


# --- FP32 equivalence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", PRENORMS)
@pytest.mark.parametrize("accumulate", ["native", "sequential"])
def test_equals_torch_layer_norm_in_fp32(prenorm, accumulate):
    torch.manual_seed(0)
    for scale in (1e-2, 1.0, 1e3):
        x = torch.randn(3, 7, 144) * scale + 0.5 * scale
        w, b = torch.randn(144), torch.randn(144)
        ref = F.layer_norm(x, (144,), w, b, EPS)
        out = layer_norm(x, w, b, EPS, prenorm, 2, "fp16", -1, accumulate)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prenorm", PRENORMS)
def test_bc1s_layout_normalises_dim_1(prenorm):
    torch.manual_seed(1)
    ln = nn.LayerNorm(144)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 50, 144) * 3
    m = PreNormLayerNorm.from_layernorm(ln, prenorm, dim=1)
    out = m(x.transpose(1, 2).unsqueeze(2))  # (B, C, 1, S)
    assert out.shape == (2, 144, 1, 50)
    torch.testing.assert_close(out.squeeze(2).transpose(1, 2), ln(x), atol=1e-5, rtol=0)


def test_from_layernorm_keeps_parameters_and_casts():
    ln = nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    m = PreNormLayerNorm.from_layernorm(ln, "optimal", p=2, fmt="fp16")
    assert isinstance(m.weight, nn.Parameter) and isinstance(m.bias, nn.Parameter)
    assert set(m.state_dict()) == {"weight", "bias"}
    assert torch.equal(m.weight, ln.weight) and torch.equal(m.bias, ln.bias) and m.eps == 1e-6
    x = torch.randn(4, 16)
    torch.testing.assert_close(m(x), ln(x), atol=1e-5, rtol=0)
    assert m.half()(x.half()).dtype == torch.float16


@pytest.mark.parametrize("prenorm", PRENORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_constant_rows_give_bias_without_nan(prenorm, dtype):
    w, b = torch.randn(32).to(dtype), torch.randn(32).to(dtype)
    x = torch.tensor([[0.0], [3.0], [-1e-7], [1000.0]]).expand(4, 32).to(dtype)
    out = layer_norm(x, w, b, EPS, prenorm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), b.float().expand(4, 32), atol=1e-5, rtol=0)


def test_bad_arguments_raise():
    x, w = torch.randn(2, 8), torch.ones(8)
    for kwargs, word in [
        ({"prenorm": "rms"}, "prenorm"),
        ({"p": 3}, "p must"),
        ({"fmt": "fp8"}, "format"),
        ({"accumulate": "kahan"}, "accumulate"),
    ]:
        with pytest.raises(ValueError, match=word):
            layer_norm(x, w, w, EPS, **{"prenorm": "mad", **kwargs})
    with pytest.raises(ValueError, match="one dimension"):
        PreNormLayerNorm.from_layernorm(nn.LayerNorm((4, 8)))


# --- formats and accumulation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_format_table_matches_torch(name):
    f, fi = FORMATS[name], torch.finfo(FORMATS[name].dtype)
    assert (f.max, f.min_normal, f.min_subnormal) == (fi.max, fi.tiny, fi.smallest_normal * fi.eps)
    assert 2.0**-f.mantissa_bits == fi.eps and f.unit_roundoff == fi.eps / 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_numpy_accumulation_equals_the_elementwise_loop_bit_for_bit(dtype):
    # cumsum_in_format's numpy path (no autograd) against its torch loop (taken for tensors that need gradients):
    # every partial sum identical, overflow to inf and the NaN of inf - inf included, along any dim
    torch.manual_seed(11)
    for scale in (1e-6, 1.0, 300.0, 3e4 if dtype == torch.float16 else 3e37):
        v = (torch.randn(6, 40, 33) * scale).to(dtype)
        for dim in (-1, 1, 0):
            fast = cumsum_in_format(v, dim=dim)
            slow = cumsum_in_format(v.clone().requires_grad_(), dim=dim).detach()
            assert fast.dtype == slow.dtype == dtype
            assert torch.equal(fast.isnan(), slow.isnan())
            assert torch.equal(fast.nan_to_num(), slow.nan_to_num())
    big = torch.full((2, 8), 40000.0, dtype=torch.float16)
    assert torch.isinf(cumsum_in_format(big)).all(dim=0)[1:].all()


def test_sum_in_format_rounds_after_every_addition():
    v = torch.tensor([2048.0] + [1.0] * 1024, dtype=torch.float16)
    assert float(sum_in_format(v)) == 2048.0  # 2048 + 1 rounds back to 2048 (ties to even) each time
    assert float(v.sum()) == 3072.0  # torch's CPU half sum accumulates in float32
    parts = cumsum_in_format(torch.tensor([[60000.0, 6000.0, 1.0]]), "fp16")
    assert parts.dtype == torch.float16 and float(parts[0, 0]) == 60000.0 and math.isinf(parts[0, 1])
    ints = torch.arange(1.0, 101.0).reshape(4, 25)
    assert torch.equal(sum_in_format(ints, "fp32", dim=0), ints.sum(0))
    assert torch.equal(cumsum_in_format(ints, "fp32", dim=1), ints.cumsum(1))


# --- the bounds -------------------------------------------------------------------------------------------------


def test_bounds_numbers():
    b = bounds("mad", 2, "fp16", 256)
    assert b["max_sum_exact"] == 256**2 / 2 and b["max_sum_computed"] == 256**2 and b["max_underflow_terms"] == 255
    assert b["underflow_rel_error"] == pytest.approx(255 * 2.0**-14 / 256 * b["rounding_growth"])
    assert bounds("linf", 1, "fp16", 144)["max_sum_exact"] == 144.0
    assert bounds("optimal", 2, "fp16", 512)["max_partial_sum"] == 65504.0
    none = bounds("none", 2, "fp16", 8)
    assert none["max_partial_sum"] == math.inf and none["max_underflow_terms"] == 8 and not none["overflow_free"]
    # MAD, p = 2, FP16: an exactly centered row reaches d^2 / 2 (> M from d = 362 on, even without rounding), a
    # computed row, whose rounded mean leaves sum y != 0, reaches d^2 (> M from d = 256 on)
    for key, limit in (("largest_safe_d_centered", 362), ("largest_safe_d", 256)):
        safe = bounds("mad", 2, "fp16", 8)[key]
        assert safe < limit
        centered_only = key == "largest_safe_d_centered"

        def ok(d, centered_only=centered_only):
            b = bounds("mad", 2, "fp16", d)
            return b["max_sum_exact" if centered_only else "max_sum_computed"] * b["rounding_growth"] <= 65504

        assert ok(safe) and not ok(safe + 1)
    assert bounds("mad", 2, "fp16", 144)["overflow_free"] and not bounds("mad", 2, "fp16", 256)["overflow_free"]
    assert bounds("mad", 2, "fp32", 4096)["overflow_free"] and bounds("linf", 2, "fp16", 4096)["overflow_free"]
    # the larger format tolerates tiny terms down to its own m
    assert bounds("linf", 2, "bf16", 64)["underflow_ratio"] == 2.0**-63


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("d", [2, 3, 144, 256])
def test_mad_bound_is_attained_by_two_spikes(p, d):
    y = torch.zeros(d, dtype=torch.float64)
    y[0], y[1] = 5.0, -5.0
    s = y.abs().mean()
    assert float(((y / s).abs() ** p).sum()) == pytest.approx(bounds("mad", p, "fp32", d)["max_sum_exact"])


def test_mad_overflows_at_d_512_and_optimal_does_not():
    # the two-spike row makes |y_i / MAD| = d / 2 = 256 and 256^2 > 65504: MAD's guarantee ends below d = 362
    x = torch.zeros(512, dtype=torch.float16)
    x[0], x[1] = 1.0, -1.0
    y = centered(x)
    mad = terms(y, prenormalizer(y, "mad", 2, "fp16"), 2)
    assert torch.isinf(cumsum_in_format(mad)).any()
    opt = terms(y, prenormalizer(y, "optimal", 2, "fp16"), 2)
    assert torch.isfinite(cumsum_in_format(opt)).all()


@pytest.mark.parametrize("accumulate", ["native", "sequential"])
def test_mad_overflows_at_d_256_when_the_mean_rounds(accumulate):
    # 255 x 16 and one 16 + 2^-6 (one FP16 ulp): the mean 16 + 2^-14 rounds to 16, so the computed y is
    # (0, ..., 0, 2^-6), MAD = 2^-14 and the last term is 256^2 > M. L-inf and optimal do not rely on centering.
    x = torch.full((1, 256), 16.0, dtype=torch.float16)
    x[0, -1] = 16 + 2**-6
    y = centered(x, accumulate=accumulate)
    assert float(y[0, :-1].abs().max()) == 0 and float(y[0, -1]) == 2**-6
    w, b = torch.ones(256, dtype=torch.float16), torch.zeros(256, dtype=torch.float16)
    ref = reference(x, w, b)
    for prenorm in ("mad", "linf", "optimal"):
        t = terms(y, prenormalizer(y, prenorm, 2, "fp16", accumulate=accumulate), 2)
        out = layer_norm(x, w, b, EPS, prenorm, 2, "fp16", -1, accumulate).double()
        if prenorm == "mad":
            assert torch.isinf(cumsum_in_format(t)).any()
            assert float((out - ref).abs().max()) > 4  # the last output collapses to 0 (ref 4.70)
        else:
            assert torch.isfinite(cumsum_in_format(t)).all()
            assert ((out - ref).abs() <= tolerance(x, w, ref, "fp16", accumulate)).all()


# --- the measured limit (section 1.5): where MAD actually overflows in FP16, against the proof's width ----------

FP16_OVERFLOW = 65520.0  # M + half an ulp: the smallest sum that rounds to inf in FP16


@pytest.mark.parametrize(
    "centred, accumulate, limit",
    [(False, "sequential", 256), (False, "native", 256), (True, "sequential", 362), (True, "native", 512)],
)
def test_mad_measured_overflow_limit(centred, accumulate, limit):
    # the extremal row of section 1.4 through the layer's own FP16 arithmetic: finite at limit - 1, inf at limit;
    # the proof (gamma sup <= M, sufficient only) stops well below: 217 (computed row) / 291 (exactly centred)
    assert first_overflow_d("mad", 2, "fp16", centred, accumulate) == limit
    below, at = (
        float(computed_lp_sum(worst_case_row(d, "mad", "fp16", centred, accumulate), accumulate=accumulate))
        for d in (limit - 1, limit)
    )
    assert math.isfinite(below) and math.isinf(at)
    proven = bounds("mad", 2, "fp16", limit)["largest_safe_d_centered" if centred else "largest_safe_d"]
    assert proven == (291 if centred else 217) < limit
    if accumulate == "sequential":  # the sums quoted in the docs' table
        assert below == (65152.0 if centred else 65024.0)


@pytest.mark.parametrize("accumulate", ["native", "sequential"])
def test_worst_case_rows_attain_the_vertices(accumulate):
    for d in (144, 255):
        # computed row: the rounded mean leaves one nonzero entry, MAD = 1/d and |z| = d
        x = worst_case_row(d, "mad", "fp16", False, accumulate)
        y = centered(x, accumulate=accumulate)
        assert float(y[-1]) == 1 and not y[:-1].any()
        assert float(computed_lp_sum(x, accumulate=accumulate)) == pytest.approx(d * d, rel=2**-10)
        # the same x centred exactly: y = (-1/d, ..., 1 - 1/d), S_2 = d^3 / (4 (d - 1)) ~ d^2 / 4
        y64 = x.double() - x.double().mean()
        assert float(((y64 / y64.abs().mean()) ** 2).sum()) == pytest.approx(d**3 / (4 * (d - 1)))
        # exactly centred vertex: two spikes, |z| = d / 2
        xc = worst_case_row(d, "mad", "fp16", True, accumulate)
        assert torch.equal(centered(xc, accumulate=accumulate), xc)
        assert float(computed_lp_sum(xc, accumulate=accumulate)) == pytest.approx(d * d / 2, rel=2**-9)
    assert float(computed_lp_sum(worst_case_row(144), accumulate="sequential")) == 144**2  # section 4.1


def _sum_of_row(y):
    """The layer's FP16 sequential sum of squares for y taken as the computed row itself (any FP16 vector: a
    superset of the rows centering can return)."""
    z = y / prenormalizer(y, "mad", 2, "fp16", accumulate="sequential")
    return sum_in_format(z * z).double()


def test_no_fp16_row_overflows_mad_below_the_measured_limit():
    d, n = 255, 150
    g = torch.Generator().manual_seed(0)
    c = 2.0 ** (torch.rand(n, 1, generator=g) * 20 - 6)  # largest entry 2^-6 .. 2^14 (floor included)
    sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)
    rows = []
    # one spike among noise at relative level 2^-k (k = 0..23), at a random position
    y = c * torch.rand(n, d, generator=g) * 2.0 ** -torch.randint(0, 24, (n, 1), generator=g).float() * sign
    y[torch.arange(n), torch.randint(0, d, (n,), generator=g)] = c[:, 0]
    rows.append(y)
    # the spike first, then entries just under half an ulp of the running MAD sum: that sum loses all of them
    y = c * 2.0**-11 * (1 - 2.0**-8 * torch.rand(n, 1, generator=g)) * sign
    y[:, 0] = c[:, 0]
    rows += [
        y,
        y.clone().index_put_(
            (torch.arange(n), torch.ones(n, dtype=torch.long)), c[:, 0] * torch.rand(n, generator=g) * 0.2
        ),
    ]
    # up to four spikes of random sizes, Gaussian and Cauchy rows
    y = torch.zeros(n, d)
    for j in range(4):
        y[torch.arange(n), torch.randint(0, d, (n,), generator=g)] = c[:, 0] * torch.rand(n, generator=g) ** (j + 1)
    rows += [
        y * sign,
        torch.randn(n, d, generator=g) * c,
        torch.distributions.Cauchy(0.0, 1.0).sample((n, d)).clamp(-100, 100) * c / 100,
    ]
    # every FP16 spike value in three binades near the scale floor, in [1, 2) and in [2^14, 2^15)
    spikes = torch.cat([2.0**e * (1 + torch.arange(1024) / 1024) for e in (-7, -6, -5, 0, 14)])
    single = torch.zeros(len(spikes), d)
    single[:, -1] = spikes
    search = torch.cat([torch.cat(rows).half(), single.half()])
    assert torch.isfinite(search).all()
    sums = _sum_of_row(search)
    assert torch.isfinite(sums).all()
    # the largest: one spike whose |z| rounds up to 255.125, fl(255.125^2) = 65088, 432 below the overflow
    assert float(sums.max()) == 65088.0 < FP16_OVERFLOW
    # rows as the layer receives them: bulk value plus a spike of 1-3 ulps (the rounded-mean case) and noisy rows
    v = (2.0 ** torch.randint(-8, 12, (n, 1), generator=g).float() * (1 + torch.rand(n, 1, generator=g))).half()
    x = v.float().expand(n, d).clone()
    ulp = 2.0 ** (torch.floor(torch.log2(v.float())) - 10)
    x[torch.arange(n), torch.randint(0, d, (n,), generator=g)] += ulp[:, 0] * torch.randint(1, 4, (n,), generator=g)
    x = torch.cat([x, x + torch.randn(n, d, generator=g) * ulp * 0.3]).half()
    for accumulate in ("sequential", "native"):
        assert torch.isfinite(computed_lp_sum(x, accumulate=accumulate)).all()
    # and one width further every spike whose MAD is above the scale floor overflows
    single256 = torch.zeros(len(spikes), 256)
    single256[:, -1] = spikes
    over = torch.isinf(_sum_of_row(single256.half()))
    assert torch.equal(over, spikes >= 256 * scale_floor(EPS, "fp16"))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp32"])
def test_optimal_scale_is_the_smallest_safe_power_of_two(p, fmt):
    f, d = FORMATS[fmt], 256
    amax = torch.tensor([1e-3, 1.0, 300.0, f.max / 16], dtype=torch.float64)
    s = overflow_safe_scale(amax, p, fmt, d)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    gamma = bounds("optimal", p, fmt, d)["rounding_growth"]

    def worst(scale):
        return gamma * d * (amax / scale) ** p  # all |y_i| = max (even d)

    assert (worst(s) <= f.max).all() and (worst(s / 2) > f.max).all()


@FAST
@given(
    family=st.sampled_from(FAMILIES),
    d=st.sampled_from([1, 2, 3, 16, 144, 256]),
    seed=st.integers(0, 10**6),
    fmt=st.sampled_from(["fp16", "bf16", "fp32"]),
    p=st.sampled_from([1, 2]),
)
def test_partial_sums_and_underflow_within_bounds(family, d, seed, fmt, p):
    f = FORMATS[fmt]
    x = make_row(family, d, fmt, seed)
    y = centered(x, accumulate="sequential")
    y64 = y.double()
    counts = {}
    for prenorm in ("mad", "linf", "optimal"):
        b = bounds(prenorm, p, fmt, d)
        s = prenormalizer(y, prenorm, p, fmt, accumulate="sequential")
        partial = cumsum_in_format(terms(y, s, p)).double()
        if b["overflow_free"]:
            assert torch.isfinite(partial).all(), (prenorm, family)
        assert float(partial[torch.isfinite(partial)].max()) <= b["max_partial_sum"], (prenorm, family)
        if float(y64.sum()) == 0:  # computed row exactly centered: the tighter bound
            assert float(partial.max()) <= b["max_sum_exact"] * b["rounding_growth"], (prenorm, family)
        # underflow: exact terms of the computed y and s, counted where s is the layer's own (not the floor)
        if float(s) <= scale_floor(EPS, fmt):
            continue
        t = (y64 / float(s)).abs() ** p
        under = (t > 0) & (t < f.min_normal)
        counts[prenorm] = int(under.sum())
        assert counts[prenorm] <= b["max_underflow_terms"]
        assert float(t[under].sum()) <= b["underflow_rel_error"] * float(t.sum())
        nz = y64.abs()[y64 != 0]
        if len(nz) and float(nz.min()) >= b["underflow_ratio"] * float(nz.max()):
            assert counts[prenorm] == 0, (prenorm, family)
    if "optimal" in counts and "linf" in counts:  # s_opt < max|y| whenever 2 (gamma d / M)^(1/p) < 1
        assert counts["optimal"] <= counts["linf"]


# --- FP16 accuracy and the failure without a pre-normalizer -----------------------------------------------------


@FAST
@given(
    family=st.sampled_from(FAMILIES),
    d=st.sampled_from([2, 16, 144, 256]),
    seed=st.integers(0, 10**6),
    prenorm=st.sampled_from(["mad", "linf", "optimal"]),
    case=st.sampled_from([("fp16", "native"), ("fp16", "sequential"), ("bf16", "native")]),
)
def test_low_precision_layer_norm_matches_float64(family, d, seed, prenorm, case):
    fmt, accumulate = case
    f = FORMATS[fmt]
    x = make_row(family, d, fmt, seed).reshape(1, d)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.rand(d, generator=g) * 2 + 0.1).to(f.dtype)
    b = torch.randn(d, generator=g).to(f.dtype)
    out = layer_norm(x, w, b, EPS, prenorm, 2, fmt, -1, accumulate)
    ref = reference(x, w, b)
    assert out.dtype == f.dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    tol = tolerance(x, w, ref, fmt, accumulate)
    assert (err <= tol).all(), float((err - tol).max())


@FAST
@given(d=st.sampled_from([16, 144, 256]), seed=st.integers(0, 10**6), big=st.booleans())
def test_fp16_layer_norm_without_prenorm_overflows(d, seed, big):
    """Without a pre-normalizer the FP16 sum of squares overflows: either an element |y_i| >= 256 squares to inf
    (any accumulation) or, with elements below 256, the sum passes M when accumulated in FP16. MAD fixes both."""
    g = torch.Generator().manual_seed(seed)
    if big:  # one x_i in [320, 3620): after centering y_i > 256, y_i^2 > M
        x = torch.randn(d, generator=g, dtype=torch.float64)
        x[0] = 320 * 2 ** (3.5 * float(torch.rand(1, generator=g)))
        accumulate = "native"
    else:  # all |y_i| < 181 (y_i^2 < M / 2) but sum y_i^2 > 2 M
        sign = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double()
        x = sign * math.sqrt(2 * 65504 * 1.2 / d) * (1 + 0.1 * torch.rand(d, generator=g, dtype=torch.float64))
        assert float(x.abs().max()) < 181
        accumulate = "sequential"
    x = x.half().reshape(1, d)
    y = centered(x, accumulate=accumulate)
    assert float((y.double() ** 2).sum()) > 65504 and (not big or float(y.abs().max()) > 256)
    assert torch.isinf(sum_in_format(y * y)).all()
    w, b = torch.ones(d, dtype=torch.float16), torch.zeros(d, dtype=torch.float16)
    ref = reference(x, w, b)
    bad = layer_norm(x, w, b, EPS, "none", 2, "fp16", -1, accumulate).double()
    # var = inf, so the output collapses to the bias (0 here) or NaN: off by the whole normalised value
    assert (~torch.isfinite(bad)).any() or float((bad - ref).abs().max()) > 0.5
    good = layer_norm(x, w, b, EPS, "mad", 2, "fp16", -1, accumulate)
    assert torch.isfinite(good).all()
    assert ((good.double() - ref).abs() <= tolerance(x, w, ref, "fp16", accumulate)).all()
