"""Softmax with a lookup-table exp and conditional re-scaling (Xu et al. 2023), computed in the scores' dtype.

After max-subtraction every score is z <= 0. exp is read from a K-entry table T[j] = exp(-j h), h = R / (K - 1),
covering [-R, 0], with nearest or linear interpolation. A row whose range (max - min over its unmasked entries)
exceeds R is re-scaled: with k = ceil(log2(range / R)), exp(z) = exp(z / 2^k)^(2^k), i.e. one table read of
z / 2^k (an exact division by a power of two) and k squarings. Rows within R use k = 0, so they keep the table's
accuracy; squaring multiplies relative errors by 2 each time (docs/stabilization.md, section 2, has the bound
`error_bound` computes and the measured table).

Masks follow models/attention.py: bool, True where a query may attend. Scores of -inf count as masked. A fully
masked row comes out as zeros, not NaN.
"""

import math

import numpy as np
import torch
import torch.nn as nn

from edgeconformer.stabilize.prenorm import get_format

INTERPS = ("nearest", "linear")


def _check(table_size, range_, interp):
    if int(table_size) != table_size or table_size < 2:
        raise ValueError(f"table_size must be an integer >= 2, got {table_size!r}")
    if not range_ > 0:
        raise ValueError(f"range_ must be > 0 (the table covers [-range_, 0]), got {range_!r}")
    if interp not in INTERPS:
        raise ValueError(f"interp must be one of {INTERPS}, got {interp!r}")


def exp_table(table_size, range_, dtype=torch.float16):
    """T[j] = exp(-j * range_ / (table_size - 1)), j = 0 .. K-1, rounded once from float64 to `dtype`. (K,)"""
    _check(table_size, range_, "nearest")
    j = torch.arange(table_size, dtype=torch.float64)
    return torch.exp(-j * (range_ / (table_size - 1))).to(dtype)


def diff_table(table_size, range_, dtype=torch.float16):
    """D[j] = T[j+1] - T[j] (<= 0) for linear interpolation, from float64 and rounded once; D[K-1] = 0. (K,)"""
    t = torch.exp(-torch.arange(table_size + 1, dtype=torch.float64) * (range_ / (table_size - 1)))
    d = torch.cat([t[1:-1] - t[:-2], t.new_zeros(1)])  # no in-place write: it would export as a scatter op
    return d.to(dtype)


def _valid(scores, mask):
    valid = scores > float("-inf")  # False for -inf and NaN (lut_softmax puts NaN back at the end)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
        valid = valid & mask
    return valid


def max_squarings_for(range_, dtype):
    """The most squarings any finite row can need: its range is at most 2 * max finite value of the format."""
    return max(0, math.ceil(math.log2(2 * torch.finfo(dtype).max / range_)))


def resolve_max_squarings(max_squarings, range_, width, dtype):
    """None (no cap), an int >= 0, or "auto": the fewest squarings k with width * exp(-range_ * 2^k) <= u, so the
    entries a cap drops (each below exp(-range_ * 2^k)) change a row sum >= 1 by less than the format's unit
    roundoff u. Every squaring doubles the table's relative error, so squaring further only costs accuracy."""
    if max_squarings is None:
        return None
    if isinstance(max_squarings, str):
        if max_squarings != "auto":
            raise ValueError(f"max_squarings must be None, 'auto' or an integer >= 0, got {max_squarings!r}")
        u = get_format(dtype).unit_roundoff
        return max(0, math.ceil(math.log2(math.log(max(int(width), 1) / u) / range_)))
    if isinstance(max_squarings, bool) or int(max_squarings) != max_squarings or max_squarings < 0:
        raise ValueError(f"max_squarings must be None, 'auto' or an integer >= 0, got {max_squarings!r}")
    return int(max_squarings)


def squarings(scores, dim=-1, mask=None, range_=16.0, max_squarings=None):
    """Per-row k (int64, `dim` kept as 1): 0 where the unmasked range is <= range_, else ceil(log2(range/range_)),
    capped at max_squarings (see resolve_max_squarings). The same k lut_softmax uses."""
    z, valid = _centered(scores, dim, mask)
    cap = resolve_max_squarings(max_squarings, range_, scores.shape[dim], scores.dtype)
    return _row_k(z, valid, dim, range_, cap)


def _centered(scores, dim, mask):
    valid = _valid(scores, mask)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    row_max = torch.where(valid, scores, neg_inf).amax(dim, keepdim=True)
    # fully masked rows; a comparison, not isinf (which Core ML's converter lacks)
    row_max = torch.where(row_max.abs() == float("inf"), torch.zeros_like(row_max), row_max)
    z = torch.where(valid, scores - row_max, torch.zeros_like(scores))  # z <= 0, one rounding in scores.dtype
    return z, valid


def _row_k(z, valid, dim, range_, max_squarings):
    kmax = max_squarings_for(range_, z.dtype) if max_squarings is None else int(max_squarings)
    r = (-z).amax(dim, keepdim=True).double()  # row range over unmasked entries (masked z are 0); exact in float64
    k = torch.ceil(torch.log2(torch.clamp(r / range_, min=1.0)))
    k = torch.where(range_ * torch.exp2(k) < r, k + 1, k)  # guard log2 rounding: range <= R * 2^k exactly
    # NaN rows -> 0, +inf -> kmax; where/clamp rather than nan_to_num, which exports as non_zero + scatter_nd
    k = torch.where(k != k, torch.zeros_like(k), k).clamp(0, kmax)
    return k.long()


def lut_softmax(scores, dim=-1, mask=None, table_size=256, range_=16.0, interp="linear", max_squarings=None):
    """Softmax over `dim` with a K-entry exp table and conditional re-scaling, in scores.dtype.

    mask: bool broadcastable to scores, True = may attend. max_squarings: None, an int or "auto"
    (resolve_max_squarings); entries below -range_ * 2^k (only when the cap binds) are treated as 0."""
    _check(table_size, range_, interp)
    dtype, K = scores.dtype, int(table_size)
    if mask is not None:
        mask = mask.expand_as(scores)
    dim = dim % scores.dim()
    cap = resolve_max_squarings(max_squarings, range_, scores.shape[dim], dtype)
    z, valid = _centered(scores, dim, mask)  # (..., d, ...) <= 0
    k = _row_k(z, valid, dim, range_, cap)  # (..., 1, ...)
    w = z * torch.exp2(-k.to(torch.float64)).to(dtype)  # z / 2^k: exact (power of two), in [-R, 0]
    t = -w * torch.tensor((K - 1) / range_, dtype=dtype)  # table position from the top: accurate near z=0
    inside = valid & (w >= -range_)
    t = torch.where(inside, t, torch.zeros_like(t))
    table = exp_table(K, range_, dtype).to(scores.device)
    if interp == "nearest":
        e = table[torch.round(t).long().clamp(0, K - 1)]
    else:
        j = torch.floor(t)
        frac = t - j  # exact in binary floating point
        j = j.long().clamp(0, K - 1)  # t may round up past K - 1; D[K-1] = 0 there
        e = table[j] + frac * diff_table(K, range_, dtype).to(scores.device)[j]
    e = torch.where(inside, e, torch.zeros_like(e))
    nan = scores.isnan() if mask is None else scores.isnan() & mask
    e = torch.where(nan, torch.full_like(e, float("nan")), e)  # a NaN score poisons its row, as in torch.softmax
    # Squarings, only where the row needs them. With a cap the loop count is a constant, so a traced graph (Core ML
    # export) is the same for every input; without one it follows this input's largest k.
    steps = cap if cap is not None else (int(k.max()) if k.numel() else 0)
    for i in range(steps):
        e = torch.where(k > i, e * e, e)
    total = e.sum(dim, keepdim=True)
    total = torch.where(total == 0, torch.ones_like(total), total)  # fully masked rows: 0 / 1 = 0
    return e / total


class LUTSoftmax(nn.Module):
    def __init__(self, table_size=256, range_=16.0, interp="linear", max_squarings=None):
        super().__init__()
        _check(table_size, range_, interp)
        resolve_max_squarings(max_squarings, range_, 1, torch.float32)  # validate early
        self.table_size, self.range_, self.interp = int(table_size), float(range_), interp
        self.max_squarings = max_squarings

    def forward(self, scores, dim=-1, mask=None):
        return lut_softmax(scores, dim, mask, self.table_size, self.range_, self.interp, self.max_squarings)

    def extra_repr(self):
        return (
            f"table_size={self.table_size}, range_={self.range_}, interp={self.interp}, "
            f"max_squarings={self.max_squarings}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Error bound (docs/stabilization.md, section 2) and its measurement against a float64 softmax.


def _interp_error(w, h, interp):
    """Largest relative error of the table's exp at any position up to `w` = |w| (exact table, exact arithmetic).

    nearest: the node is within min(h/2, |w|) (node 0 is exp(0) = 1 exactly), so the error is <= e^min(h/2,|w|) - 1.
    linear: between nodes the chord over-estimates exp by the factor e^(theta h) (1 - theta (1 - e^-h)) at fraction
    theta of the step, the same on every interval; it grows up to theta* = 1/(1 - e^-h) - 1/h and an entry at |w|
    < h has theta = |w|/h (node 0 is exact)."""
    w = np.asarray(w, dtype=np.float64)
    if interp == "nearest":
        return np.expm1(np.minimum(h / 2, w))
    c = -np.expm1(-h)
    theta = np.minimum(w / h, 1 / c - 1 / h)
    return np.exp(theta * h) * (1 - theta * c) - 1


def error_bound(
    table_size, range_, interp="linear", dtype=torch.float16, k=0, width=64, floor=1e-3, max_squarings=None
):
    """Worst-case error of lut_softmax against the exact softmax of the same scores, for a row of `width` unmasked
    entries that uses k squarings: {"abs": bound on |p_hat - p| for every entry, "rel": bound on |p_hat/p - 1| for
    entries with p >= floor}. inf where the bound is vacuous. Derivation: docs/stabilization.md, section 2."""
    _check(table_size, range_, interp)
    K, R, n, k = int(table_size), float(range_), int(width), int(k)
    if n < 1 or not 0 < floor <= 1 or k < 0:
        raise ValueError(f"need width >= 1, 0 < floor <= 1 and k >= 0; got width={width}, floor={floor}, k={k}")
    f = get_format(dtype)
    u, mu, q = f.unit_roundoff, f.min_subnormal, 2.0**k
    log_growth, alpha = _log_growth(K, R, q, f, interp)
    truncated = 0.0
    max_squarings = resolve_max_squarings(max_squarings, R, n, f.dtype)
    if max_squarings is not None and k >= max_squarings:
        truncated = math.exp(-R * q / (1 + u) ** 2)  # entries beyond the table are set to 0
    eta = (k + 3) * mu + truncated  # absolute error of one entry (subnormals)
    sigma = (n - 1) * 2.0**-24 + (u if f.dtype != torch.float32 else 0.0)  # torch sums in float32, rounds once

    # |zeta| ranges over [0, zmax]; lg_up[i] bounds log B on [0, grid[i]]
    zmax = R * q * (1 + u) ** 2
    near = np.linspace(0.0, min(zmax, 64.0), 4097)
    grid = np.concatenate([near, np.geomspace(near[-1], zmax, 513)[1:]]) if zmax > 64 else near
    lg = log_growth(grid)
    lg_up = np.maximum.accumulate(lg)
    eps_s, b0, tail = _row_sum_error(grid, lg, lg_up, alpha, n, eta)
    if not eps_s < 1:
        return {"abs": math.inf, "rel": math.inf}
    with np.errstate(over="ignore", invalid="ignore"):
        # p_hat vs p for an entry at zeta with p <= exp(-zeta):
        # |p_hat - p| <= [p (1 - p) (B(zeta) - 1 + b0) + p tail] / (1 - eps_s) * (1 + u) / (1 - sigma)
        #               + p (u + sigma) / (1 - sigma) + eta / ((1 - eps_s)(1 - sigma)) + mu / 2
        scale = (1 + u) / ((1 - eps_s) * (1 - sigma))
        rnd = (u + sigma) / (1 - sigma)
        extra = eta / ((1 - eps_s) * (1 - sigma)) + mu / 2
        p_hi = np.exp(-grid[:-1])  # on [grid_i, grid_i+1]: p <= exp(-grid_i)
        pq = np.where(p_hi <= 0.5, p_hi * (1 - p_hi), 0.25)  # p (1 - p) <= that
        dev = (pq * (np.expm1(lg_up[1:]) + b0) + p_hi * tail) * scale + p_hi * rnd
        abs_ = float(np.max(dev)) + extra
        z_floor = math.log(1 / floor)
        eps_a = float(np.expm1(np.max(log_growth(np.array([0.0, z_floor])))))  # B is increasing: its value at z_floor
        rel = (eps_a + b0 + tail) * scale + rnd + extra / floor
    return {"abs": abs_ if math.isfinite(abs_) else math.inf, "rel": rel if math.isfinite(rel) else math.inf}


def _log_growth(K: int, R: float, q: float, f, interp: str):
    """-> (log B as a function of |zeta|: e_hat / exp(zeta) lies in [1/B, B] for an entry at |zeta|, with q = 2^k
    squarings; alpha, the relative rounding of the computed position)."""
    u, mu, h = f.unit_roundoff, f.min_subnormal, R / (K - 1)
    c = (K - 1) / R
    u_c = abs(float(torch.tensor(c, dtype=f.dtype)) - c) / c  # rounding of the index scale (often exact)
    alpha = (1 + u) ** 2 * (1 + u_c) - 1  # rounding of z = s - max and of t = -w c
    if interp == "nearest":
        d_rnd = u  # the table entry
    else:  # T_j + frac * D_j: entries, product, sum
        d_rnd = (1 + u) * (1 + u * np.exp(h) + (2 * u + u * u) * np.expm1(h)) - 1
    log_sub = q * (h * mu + mu)  # subnormal w and t, after 2^k squarings

    def log_growth(zeta):
        # log B(zeta) (k squarings double log errors)
        w = zeta * (1 + alpha) / q  # the computed position may lie further out
        with np.errstate(over="ignore"):
            return (
                alpha * zeta
                + log_sub
                + q * (np.log1p(_interp_error(w, h, interp)) + np.log1p(d_rnd))
                + (q - 1) * np.log1p(u)
            )

    return log_growth, alpha


def _row_sum_error(grid, lg, lg_up, alpha: float, n: int, eta: float) -> tuple[float, float, float]:
    """The row sum's relative error bound eps_s (S >= 1) -> (eps_s, b0: the part from the entries near the max,
    tail: the part from the entries beyond), the better of a split at some Z0 and Hoelder's inequality."""
    with np.errstate(over="ignore", invalid="ignore"):
        # row-sum error relative to S >= 1: entries within Z0 are off by at most B(Z0) - 1 relative; each entry
        # beyond Z0 by at most (B(zeta) - 1) exp(-zeta) absolute, whose largest value past Z0 is tau(Z0)
        piece = np.expm1(lg_up[1:]) * np.exp(-grid[:-1])  # bound on [grid_i, grid_i+1]
        tau = np.append(np.maximum.accumulate(piece[::-1])[::-1], 0.0)
        tails = n * tau + n * eta
        sum_err = np.expm1(lg_up) + tails
        i0 = int(np.nanargmin(sum_err))
        eps_s, b0, tail = float(sum_err[i0]), float(np.expm1(lg_up[i0])), float(tails[i0])
        # or by Hoelder: sum_j B_j e^zeta_j <= e^C sum_j e^((1-alpha) zeta_j) <= e^C n^alpha S, with C the largest
        # log B - alpha zeta (the argument-rounding part bounded on average instead of at the worst entry)
        holder = float(np.expm1(np.max(lg - alpha * grid) + alpha * math.log(n)))
        if holder + n * eta < eps_s:
            eps_s, b0, tail = holder + n * eta, holder, n * eta
    return eps_s, b0, tail


def adversarial_rows(n_rows=1024, width=64, seed=0, range_=16.0):
    """float64 score rows (n_rows, width) from families that stress a LUT softmax, in equal shares: small ranges,
    ranges near R, ranges far beyond R (up to R * 2^10), one huge positive outlier, a cluster near the max plus one
    far-below outlier (the case where re-scaling hurts most), constant rows, and attention-like Gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    fams = []
    per = -(-n_rows // 7)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    fams.append(randn(per, width) * 10 ** (rand(per, 1) * 2 - 2))  # ranges ~ 0.01 .. 1
    fams.append(-rand(per, width) * range_ * (0.5 + rand(per, 1)))  # ranges ~ R
    fams.append(-rand(per, width) * range_ * 2 ** torch.randint(1, 11, (per, 1), generator=g))  # >> R
    x = randn(per, width)
    x[:, 0] += 10 ** (1 + 3 * rand(per))  # one huge outlier
    fams.append(x)
    x = randn(per, width) * rand(per, 1) * 2
    x[:, -1] = -range_ * 2 ** (rand(per) * 10)  # one far below
    fams.append(x)
    fams.append((randn(per, 1) * 100).expand(per, width).clone())  # constant rows
    std = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)[torch.randint(0, 3, (per, 1), generator=g)]
    fams.append(randn(per, width) * std)  # attention-like
    rows = torch.cat(fams)[:n_rows]
    return rows[torch.randperm(len(rows), generator=g)]


def measure_error(
    table_size,
    range_,
    interp="linear",
    dtype=torch.float16,
    n_rows=1024,
    width=64,
    seed=0,
    floor=1e-3,
    max_squarings=None,
):
    """Max errors of lut_softmax on adversarial_rows (cast to `dtype`) against a float64 softmax of the same cast
    scores. max_rel_error is over entries with p >= floor; bound_* is error_bound at the largest k measured."""
    scores = adversarial_rows(n_rows, width, seed, range_).to(dtype)
    ref = torch.softmax(scores.double(), -1)
    out = lut_softmax(scores, -1, None, table_size, range_, interp, max_squarings).double()
    k = squarings(scores, -1, None, range_, max_squarings).squeeze(-1)
    err = (out - ref).abs()
    big = ref >= floor
    rel = torch.where(big, err / ref, torch.zeros_like(err))
    rows0 = k == 0
    kmax = int(k.max())
    b0 = error_bound(table_size, range_, interp, dtype, 0, width, floor, max_squarings)
    bk = error_bound(table_size, range_, interp, dtype, kmax, width, floor, max_squarings)
    return {
        "table_size": int(table_size),
        "range": float(range_),
        "interp": interp,
        "dtype": str(dtype).split(".")[-1],
        "rows": int(n_rows),
        "width": int(width),
        "floor": floor,
        "max_k": kmax,
        "rescaled_rows": int((~rows0).sum()),
        "max_abs_error": float(err.max()),
        "max_rel_error": float(rel.max()),
        "max_abs_error_k0": float(err[rows0].max()) if rows0.any() else 0.0,
        "max_rel_error_k0": float(rel[rows0].max()) if rows0.any() else 0.0,
        "bound_abs_k0": b0["abs"],
        "bound_rel_k0": b0["rel"],
        "bound_abs": bk["abs"],
        "bound_rel": bk["rel"],
    }


def error_table(
    table_sizes=(16, 64, 256, 1024),
    ranges=(8.0, 16.0),
    interps=INTERPS,
    dtype=torch.float16,
    n_rows=4096,
    width=64,
    seed=0,
    floor=1e-3,
):
    """Markdown table of measure_error (the one in docs/stabilization.md): per K, R and interpolation the bound and
    the measured errors on rows within R (k = 0), then all rows with uncapped squarings and with the "auto" cap."""
    lines = [
        "| K | R | interp | step h | bound abs (k=0) | measured abs (k=0) | bound rel (k=0) | measured rel (k=0) "
        "| measured abs, all rows (max k) | measured rel, all rows | measured abs, all rows, auto cap (k<=) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for R in ranges:
        for interp in interps:
            for K in table_sizes:
                full = measure_error(K, R, interp, dtype, n_rows, width, seed, floor)
                auto = measure_error(K, R, interp, dtype, n_rows, width, seed, floor, "auto")
                lines.append(
                    f"| {K} | {R:g} | {interp} | {R / (K - 1):.3g} | {full['bound_abs_k0']:.2e} "
                    f"| {full['max_abs_error_k0']:.2e} | {full['bound_rel_k0']:.2e} | {full['max_rel_error_k0']:.2e} "
                    f"| {full['max_abs_error']:.2e} ({full['max_k']}) | {full['max_rel_error']:.2e} "
                    f"| {auto['max_abs_error']:.2e} ({auto['max_k']}) |"
                )
    return "\n".join(lines)


def main():
    for dtype in (torch.float16, torch.float32):
        print(f"\n{str(dtype).split('.')[-1]}, 4096 adversarial rows x 64, floor 1e-3\n")
        print(error_table(dtype=dtype))


if __name__ == "__main__":
    main()
