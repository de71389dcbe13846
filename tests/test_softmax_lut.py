"""LUT softmax with conditional re-scaling: the documented error bound against float64 for every table size,
which rows get squarings, masks, and float32 equivalence with torch.softmax (docs/stabilization.md, section 2)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeconformer.stabilize.prenorm import FORMATS
from edgeconformer.stabilize.softmax import (
    LUTSoftmax,
    adversarial_rows,
    diff_table,
    error_bound,
    exp_table,
    lut_softmax,
    measure_error,
    resolve_max_squarings,
    squarings,
)

FLOOR = 1e-3
FAST = settings(max_examples=30, deadline=None)
SIZES = [16, 64, 256, 1024]


def make_rows(family, width, seed, scale, range_):
    """(4, width) float64 rows of one family (see adversarial_rows for the same families at scale)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(4, width, generator=g, dtype=torch.float64)
    r = torch.rand(4, width, generator=g, dtype=torch.float64)
    if family == "gauss":
        return n * scale
    if family == "uniform":  # ranges ~ scale * R: from well inside the table to far beyond it
        return -r * range_ * scale
    if family == "outlier_up":
        x = n.clone()
        x[:, 0] += 10 * scale
        return x
    if family == "outlier_down":  # a cluster near the max plus one entry far below (largest k)
        x = n * 0.5
        x[:, -1] = -range_ * scale * 8
        return x
    return (n[:, :1] * 100).expand(4, width).clone()  # constant


def check_rows(scores, table_size, range_, interp, max_squarings):
    """Every entry within error_bound's abs bound and, where p >= FLOOR, its rel bound; returns the k per row."""
    out = lut_softmax(scores, -1, None, table_size, range_, interp, max_squarings).double()
    ref = torch.softmax(scores.double(), -1)
    k = squarings(scores, -1, None, range_, max_squarings).squeeze(-1)
    for row in range(len(scores)):
        b = error_bound(table_size, range_, interp, scores.dtype, int(k[row]), scores.shape[-1], FLOOR, max_squarings)
        err = (out[row] - ref[row]).abs()
        assert float(err.max()) <= b["abs"], (row, int(k[row]), float(err.max()), b)
        big = ref[row] >= FLOOR
        assert float((err[big] / ref[row][big]).max()) <= b["rel"], (row, int(k[row]), b)
    return k


# --- the table ----------------------------------------------------------------------------------------------------


def test_tables():
    t = exp_table(256, 16.0, torch.float64)
    assert t.shape == (256,) and t[0] == 1 and t[-1] == pytest.approx(math.exp(-16), rel=1e-15)
    assert (t[1:] < t[:-1]).all()
    assert torch.equal(exp_table(256, 16.0, torch.float16), t.half())  # one rounding from float64
    d = diff_table(256, 16.0, torch.float64)
    torch.testing.assert_close(d[:-1], t[1:] - t[:-1], rtol=1e-12, atol=0)
    assert d[-1] == 0


# --- error bound ----------------------------------------------------------------------------------------------------


@FAST
@given(
    family=st.sampled_from(["gauss", "uniform", "outlier_up", "outlier_down", "constant"]),
    width=st.sampled_from([1, 7, 64, 200]),
    seed=st.integers(0, 10**6),
    scale=st.sampled_from([0.1, 1.0, 3.0, 40.0]),
    range_=st.sampled_from([8.0, 16.0]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    interp=st.sampled_from(["nearest", "linear"]),
    max_squarings=st.sampled_from([None, "auto", 1]),
)
def test_error_within_documented_bound(family, width, seed, scale, range_, dtype, interp, max_squarings):
    scores = make_rows(family, width, seed, scale, range_).to(dtype)
    for table_size in SIZES:
        check_rows(scores, table_size, range_, interp, max_squarings)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bound_is_finite_and_tight_for_rows_within_the_table(dtype):
    # rows with k = 0: the bound is finite for every table size and within 30x of the measured worst case;
    # the linear table's error falls ~16x per 4x more entries (h^2) until the format's rounding dominates
    errors = {}
    for table_size in SIZES:
        r = measure_error(table_size, 16.0, "linear", dtype, n_rows=256, width=64, seed=3)
        assert r["max_abs_error_k0"] <= r["bound_abs_k0"] < 30 * r["max_abs_error_k0"]
        assert r["max_rel_error_k0"] <= r["bound_rel_k0"] < 30 * r["max_rel_error_k0"]
        errors[table_size] = r["max_abs_error_k0"]
    assert errors[64] < errors[16] / 8
    if dtype == torch.float32:
        assert errors[1024] < errors[256] / 8


def test_rescaling_amplifies_table_error_and_a_cap_removes_it():
    # squaring doubles the relative error per step: in FP16 with R = 16, rows beyond R lose accuracy with k, while
    # "auto" (no squaring needed: exp(-16) * 64 < u) keeps them at the k = 0 accuracy
    full = measure_error(256, 16.0, "linear", torch.float16, n_rows=512, width=64, seed=1)
    auto = measure_error(256, 16.0, "linear", torch.float16, n_rows=512, width=64, seed=1, max_squarings="auto")
    assert full["max_k"] >= 8 and auto["max_k"] == 0
    assert full["max_abs_error"] > 10 * auto["max_abs_error"]
    assert auto["max_abs_error"] <= auto["bound_abs"] and auto["max_rel_error"] <= auto["bound_rel"]


def test_float32_equals_torch_softmax_within_bound():
    torch.manual_seed(0)
    scores = torch.randn(8, 4, 50, 50) * 3  # attention-like
    ours = lut_softmax(scores, table_size=1024, range_=16.0, interp="linear")
    ref = torch.softmax(scores, -1)
    b = error_bound(1024, 16.0, "linear", torch.float32, k=int(squarings(scores).max()), width=50, floor=FLOOR)
    assert float((ours - ref).abs().max()) <= b["abs"] + 1e-6 and b["abs"] < 1e-4  # 1e-6: torch's own rounding
    torch.testing.assert_close(ours.sum(-1), torch.ones(8, 4, 50), atol=1e-5, rtol=0)


# --- conditional re-scaling -----------------------------------------------------------------------------------------


@FAST
@given(
    width=st.sampled_from([2, 10, 64]),
    seed=st.integers(0, 10**6),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    range_=st.sampled_from([8.0, 16.0]),
    cap=st.sampled_from([None, 0, 2]),
)
def test_squarings_only_where_the_range_exceeds_R(width, seed, dtype, range_, cap):
    g = torch.Generator().manual_seed(seed)
    spread = 10 ** (torch.rand(16, 1, generator=g, dtype=torch.float64) * 4 - 1)  # ranges 0.1 .. 1000
    scores = (torch.rand(16, width, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = squarings(scores, range_=range_, max_squarings=cap).squeeze(-1)
    z = (scores - scores.amax(-1, keepdim=True)).double()  # the computed (rounded) shifts
    rng = -z.min(-1).values
    expect = torch.where(rng > range_, torch.ceil(torch.log2(rng / range_)), torch.zeros_like(rng)).long()
    if cap is not None:
        expect = expect.clamp(max=cap)
    assert torch.equal(k, expect)
    assert (rng[k > 0] > range_).all() and (rng[k == 0] <= range_).all() | (cap == 0)
    # rows within R are computed exactly as without any re-scaling
    out = lut_softmax(scores, range_=range_, max_squarings=cap)
    plain = lut_softmax(scores, range_=range_, max_squarings=0)
    assert torch.equal(out[k == 0], plain[k == 0])


def test_rescaled_rows_reach_beyond_the_table():
    scores = torch.tensor([[0.0, -1.0, -20.0, -30.0], [0.0, -1.0, -2.0, -15.0]])
    assert squarings(scores, range_=16.0).flatten().tolist() == [1, 0]
    out, plain = lut_softmax(scores, range_=16.0), lut_softmax(scores, range_=16.0, max_squarings=0)
    ref = torch.softmax(scores.double(), -1)
    assert (plain[0, 2:] == 0).all() and (out[0, 2:] > 0).all()  # the table alone stops at -16
    torch.testing.assert_close(out[0, 2:].double() / ref[0, 2:], torch.ones(2, dtype=torch.float64), atol=1e-3, rtol=0)
    assert torch.equal(out[1], plain[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_auto_cap_drops_less_than_one_unit_roundoff(dtype):
    u = FORMATS["fp16" if dtype == torch.float16 else "fp32"].unit_roundoff
    for width in (1, 64, 1500):
        for range_ in (4.0, 8.0, 16.0):
            k = resolve_max_squarings("auto", range_, width, dtype)
            assert width * math.exp(-range_ * 2**k) <= u
            assert k == 0 or width * math.exp(-range_ * 2 ** (k - 1)) > u
    assert resolve_max_squarings("auto", 16.0, 64, torch.float16) == 0  # the default needs none


# --- masks ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_masks(dtype):
    torch.manual_seed(2)
    B, T = 3, 12
    scores = (torch.randn(B, 2, T, T) * 20).to(dtype)  # ranges beyond R: squarings
    lengths = torch.tensor([12, 5, 0])
    mask = (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T) key padding
    out = lut_softmax(scores, mask=mask)
    assert torch.isfinite(out).all()
    assert (out[1, ..., 5:] == 0).all() and (out[2] == 0).all()  # masked and fully masked rows
    # the masked row equals the softmax of its unmasked entries alone (range and k come from them only)
    torch.testing.assert_close(out[1, ..., :5], lut_softmax(scores[1, ..., :5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:2].sum(-1).float(), torch.ones(2, 2, T), atol=2e-3, rtol=0)
    # -inf scores count as masked
    neg = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lut_softmax(neg), out, atol=0, rtol=0)
    nan = scores.clone()
    nan[0, 0, 0, 3] = float("nan")
    assert lut_softmax(nan)[0, 0, 0].isnan().all() and not lut_softmax(nan)[0, 0, 1].isnan().any()


def test_module_and_other_dims():
    torch.manual_seed(3)
    x = torch.randn(2, 30, 5) * 6
    m = LUTSoftmax(64, 8.0, "nearest", max_squarings="auto")
    out = m(x, dim=1)
    torch.testing.assert_close(out, lut_softmax(x, 1, None, 64, 8.0, "nearest", "auto"), atol=0, rtol=0)
    last = lut_softmax(x.transpose(1, 2), -1, None, 64, 8.0, "nearest", "auto").transpose(1, 2)
    torch.testing.assert_close(out, last, atol=0, rtol=0)


def test_bad_arguments_raise():
    x = torch.randn(2, 5)
    for kwargs, word in [
        ({"table_size": 1}, "table_size"),
        ({"range_": 0.0}, "range_"),
        ({"interp": "cubic"}, "interp"),
        ({"max_squarings": -1}, "max_squarings"),
        ({"max_squarings": "always"}, "max_squarings"),
    ]:
        with pytest.raises(ValueError, match=word):
            lut_softmax(x, **kwargs)
    with pytest.raises(ValueError, match="bool"):
        lut_softmax(x, mask=torch.ones(2, 5))


def test_adversarial_rows_cover_every_case():
    rows = adversarial_rows(700, 32, seed=0, range_=16.0)
    rng = rows.amax(-1) - rows.amin(-1)
    assert rows.shape == (700, 32) and (rng == 0).sum() >= 90  # constant rows
    assert (rng < 16).sum() >= 200 and (rng > 16 * 2**6).sum() >= 50
    assert torch.equal(rows, adversarial_rows(700, 32, seed=0, range_=16.0))  # deterministic
