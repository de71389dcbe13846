import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.data.features import GlobalCMVN
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.stabilize.precision import (
    MODES,
    HalfSimulation,
    fp16_sum,
    pairwise_sum,
    precision_model,
    probe_cpu_half,
    run_fp16,
    to_precision,
)


def tiny_asr(seed=0):
    torch.manual_seed(seed)
    enc = ConformerEncoder(
        idim=20, d_model=32, n_layers=2, n_heads=2, ff_dim=64, kernel_size=7, dropout=0.0, subsampling_channels=8
    )
    return DualDecoderASR(enc, 12, None, ctc_weight=1.0).eval()


def tiny_cmvn(seed=0):
    g = torch.Generator().manual_seed(seed)
    return GlobalCMVN(20, torch.randn(20, generator=g), torch.rand(20, generator=g) + 0.5)


def test_probe_measures_cpu_half_kernels():
    probes = probe_cpu_half()
    # Every op the models use has a CPU half kernel in torch 2.9.1 ...
    assert all(p["half_kernel"] for p in probes.values()), probes
    # ... and these accumulate in float32 inside it: partial sums past 65504 do not overflow. This is what makes
    # the CPU simulation optimistic (docs/stabilization.md section 5); log_softmax rounds its denominator to FP16
    # and is not.
    for name in (
        "sum",
        "mean",
        "matmul",
        "linear",
        "einsum",
        "conv1d",
        "conv2d",
        "layer_norm",
        "softmax",
        "scaled_dot_product_attention",
    ):
        assert probes[name]["wide_accumulation"] is True, name
    assert probes["log_softmax"]["wide_accumulation"] is False


class Refuses(nn.Module):
    """Calls ops without a CPU half kernel (quantile, cdist) next to ones with one."""

    def forward(self, x):
        q = torch.quantile(x, 0.5, dim=-1, keepdim=True)  # (B, 1)
        d = torch.cdist(x[:, None, :], x[:, None, :])  # (B, 1, 1)
        return (x - q) + d[:, 0]


def test_ops_without_half_kernel_fall_back_and_are_counted():
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="quantile"):
        Refuses()(x.half())  # plain torch refuses
    module = Refuses()
    out1, rep = run_fp16(module, x)
    out2, rep2 = run_fp16(module, x)
    assert out1.dtype == torch.float16 and torch.equal(out1, out2)
    assert rep["fallback_ops"] == {"torch.quantile": 1, "torch.functional.cdist": 1}
    # cast in / run in float32 / cast out: each fallback op's float32 result on the FP16 input, rounded to FP16
    xh = x.half()
    q = torch.quantile(xh.float(), 0.5, dim=-1, keepdim=True).half()
    d = torch.cdist(xh.float()[:, None], xh.float()[:, None]).half()
    assert torch.equal(out1, (xh - q) + d[:, 0])


def test_forced_fp32_ops_are_counted_per_call():
    lin = nn.Linear(8, 4)
    model = to_precision(nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 4)), "fp16")
    x = torch.randn(5, 8)
    out, rep = run_fp16(model, x, force_fp32=["torch.nn.functional.linear"])
    assert rep["fallback_ops"] == {"torch.nn.functional.linear": 2}
    assert "torch.nn.functional.linear" not in rep["wide_accumulation_ops"]
    assert rep["fp32_compute_ops"] == {}
    w0, b0, w2, b2 = (p.float() for p in model.parameters())
    h = F.linear(x.half().float(), w0, b0).half().relu()
    assert torch.equal(out, F.linear(h.float(), w2, b2).half())


def test_wide_accumulation_calls_are_counted():
    model = to_precision(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)), "fp16")
    _, rep = run_fp16(model, torch.randn(2, 8))
    assert rep["wide_accumulation_ops"] == {"torch.nn.functional.linear": 2, "torch.nn.functional.layer_norm": 1}
    assert rep["fp32_compute_ops"] == {}  # linear keeps its half kernel (see below)
    assert rep["fallback_ops"] == {} and rep["emulated_reductions"] == {}


def test_convolutions_and_matrix_products_are_computed_in_fp32_and_rounded_once():
    torch.manual_seed(3)
    x, dw_x = torch.randn(1, 144, 1, 250).half(), torch.randn(1, 144, 1, 264).half()
    w, b = (torch.randn(576, 144, 1, 1) * 0.1).half(), torch.randn(576).half()
    dw = (torch.randn(144, 1, 1, 15) * 0.3).half()
    q, k = torch.randn(1, 250, 1, 36).half(), torch.randn(1, 36, 1, 250).half()
    calls = {
        "torch.nn.functional.conv2d": (lambda x, w, b: F.conv2d(x, w, b), (x, w, b)),
        "depthwise": (lambda x, w: F.conv2d(x, w, groups=144), (dw_x, dw)),
        "torch.nn.functional.conv1d": (lambda x, w, b: F.conv1d(x, w, b), (x[:, :, 0], w[..., 0], b)),
        "torch.functional.einsum": (lambda q, k: torch.einsum("bqhc,bchk->bqhk", q, k), (q, k)),
        "torch.matmul": (torch.matmul, (x[0, :, 0].T, w[:, :, 0, 0].T)),
    }
    for label, (fn, args) in calls.items():
        native = fn(*args)  # the CPU half kernel: float32 accumulator, one rounding
        with HalfSimulation() as sim:
            out = fn(*args)
        assert out.dtype == torch.float16, label
        # the same semantics computed in float32: the half arguments are exact there, one rounding at the end ...
        assert torch.equal(out, fn(*(a.float() for a in args)).half()), label
        # ... and the half kernel differs by its float32 summation order only (one FP16 ulp at the scale of the
        # terms, in a small fraction of the outputs)
        assert torch.allclose(out.float(), native.float(), rtol=1e-3, atol=2e-3), label
        assert (out != native).float().mean() < 0.01, label
        rep = sim.report()
        name = "torch.nn.functional.conv2d" if label == "depthwise" else label
        assert rep["wide_accumulation_ops"] == {name: 1} and rep["fp32_compute_ops"] == {name: 1}, label
        assert rep["fallback_ops"] == {}, label  # not a fallback: the op has a half kernel
    # forced to float32: a fallback, not a wide-accumulating half call
    with HalfSimulation(force_fp32=["torch.nn.functional.conv2d"]) as sim:
        F.conv2d(x, w, b)
    assert sim.report()["fallback_ops"] == {"torch.nn.functional.conv2d": 1}
    assert sim.report()["fp32_compute_ops"] == {} and sim.report()["wide_accumulation_ops"] == {}


def test_fp32_compute_keeps_the_half_kernel_where_its_semantics_would_differ():
    x, w = torch.randn(1, 8, 1, 5).half(), torch.randn(4, 8, 1, 1).half()
    with HalfSimulation() as sim:
        F.conv2d(x, w.float())  # mixed dtypes: the half kernel refuses, the call falls back as before
    assert sim.report()["fp32_compute_ops"] == {}
    assert sim.report()["fallback_ops"] == {"torch.nn.functional.conv2d": 1}
    a, b, out = torch.randn(3, 4).half(), torch.randn(4, 5).half(), torch.empty(3, 5).half()
    with HalfSimulation() as sim:
        torch.matmul(a, b, out=out)  # out=: written in place by the half kernel
    assert torch.equal(out, a @ b) and sim.report()["fp32_compute_ops"] == {}
    assert sim.report()["wide_accumulation_ops"] == {"torch.matmul": 1}
    with HalfSimulation(torch.bfloat16) as sim:  # measured for float16 only: bfloat16 keeps its kernels
        y = F.conv2d(x.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16 and sim.report()["fp32_compute_ops"] == {}
    # linear's half kernel rounds the product before adding the bias for a non-contiguous batched input (and once
    # for a contiguous one): one float32 rounding would not be its semantics, so it keeps the half kernel
    xt, wl, bl = torch.randn(1, 144, 250).half().mT, (torch.randn(576, 144) * 0.1).half(), torch.randn(576).half()
    native = F.linear(xt, wl, bl)
    two_roundings = F.linear(xt.float(), wl.float()).half() + bl
    one_rounding = F.linear(xt.float(), wl.float(), bl.float()).half()
    assert (native != two_roundings).float().mean() < 0.01 < 0.1 < (native != one_rounding).float().mean()
    with HalfSimulation() as sim:
        assert torch.equal(F.linear(xt, wl, bl), native)
    assert sim.report()["fp32_compute_ops"] == {}
    assert sim.report()["wide_accumulation_ops"] == {"torch.nn.functional.linear": 1}


def test_a_real_error_is_not_hidden_by_the_fallback():
    a, b = torch.randn(2, 3).half(), torch.randn(4, 5).half()
    with HalfSimulation() as sim, pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        a @ b
    assert sim.report()["fallback_ops"] == {}


def test_fp16_accumulation_emulation():
    big = torch.tensor([60000.0, 60000.0, -60000.0, -60000.0]).half()
    assert float(big.sum()) == 0.0  # CPU: float32 accumulator
    assert not torch.isfinite(pairwise_sum(big))  # FP16 additions: 60000 + 60000 overflows
    with HalfSimulation(accumulate="fp16") as sim:
        assert not torch.isfinite(big.sum())
        assert not torch.isfinite(torch.mean(big))
        assert float(big.float().sum()) == 0.0  # float32 tensors are not touched
    assert sim.report()["emulated_reductions"] == {"torch.Tensor.sum": 1, "torch.mean": 1}
    # small integers add exactly in FP16: the emulation then equals torch.sum/mean for every dim/keepdim form
    x = torch.randint(-8, 8, (3, 5, 6)).half()
    for dim in (None, 0, -1, (0, 2), [1, 2]):
        for keepdim in (False, True):
            assert torch.equal(fp16_sum(x, dim, keepdim), x.sum(dim=dim, keepdim=keepdim)), (dim, keepdim)
    assert torch.equal(fp16_sum(x, 1, True, mean=True), x.mean(1, keepdim=True))


def test_to_precision_copies_and_refuses_unknown():
    m = nn.Linear(3, 3)
    h = to_precision(m, "fp16")
    assert h.weight.dtype == torch.float16 and m.weight.dtype == torch.float32
    assert torch.equal(h.weight, m.weight.half())
    with pytest.raises(ValueError, match="fp8"):
        to_precision(m, "fp8")
    with pytest.raises(ValueError, match="to_precision"):
        run_fp16(m, torch.randn(1, 3))


def test_fp32_mode_is_the_original_model():
    asr, cmvn = tiny_asr(), tiny_cmvn()
    feats = torch.randn(1, 50, 20) * 3
    lengths = torch.tensor([50])
    with torch.no_grad():
        expected = asr.ctc_log_probs(asr.encode(cmvn(feats, lengths), lengths)[0])
    fp32 = precision_model(asr, "fp32", cmvn)
    assert torch.equal(fp32(feats), expected)
    assert fp32.summary() == {
        "mode": "fp32",
        "calls": 1,
        "fallback_ops": {},
        "wide_accumulation_ops": {},
        "fp32_compute_ops": {},
        "emulated_reductions": {},
    }


def test_fp16_modes_run_entirely_in_half_and_stay_close():
    asr, cmvn = tiny_asr(1), tiny_cmvn(1)
    feats = [torch.randn(1, T, 20) * 3 for T in (40, 70)]
    ref = precision_model(asr, "fp32", cmvn)
    for mode in ("fp16_unstabilized", "fp16"):
        pm = precision_model(asr, mode, cmvn)
        assert all(p.dtype == torch.float16 for p in pm.module.parameters())
        for f in feats:
            out = pm(f)
            assert out.dtype == torch.float32 and out.shape == ref(f).shape
            # measured: 0.003 (random tiny model, FP16 rounding of every op)
            assert (out - ref(f)).abs().max() < 0.02
        s = pm.summary()
        assert s["calls"] == 2 and s["fallback_ops"] == {}  # no op of the ANE graph leaves FP16
        assert s["wide_accumulation_ops"]["torch.nn.functional.conv2d"] > 0
        for op in ("torch.nn.functional.conv2d", "torch.functional.einsum"):  # every call computed in float32
            assert s["fp32_compute_ops"][op] == s["wide_accumulation_ops"][op] > 0
    with pytest.raises(ValueError, match="fp17"):
        precision_model(asr, "fp17")
    assert MODES == ("fp32", "fp16_unstabilized", "fp16")


class DigitTokenizer:
    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_fp16_accumulation_reveals_what_the_cpu_hides():
    # A gain that puts LayerNorm's sum of squares past 65504 while every single square stays below it: CPU half
    # kernels (float32 accumulators) hide the overflow, FP16 accumulation shows it, the pre-normalizer removes it.
    from edgeconformer.stabilize.ane import ANEConformer
    from edgeconformer.stabilize.audit import audit
    from edgeconformer.stabilize.prenorm import PreNormLayerNorm
    from edgeconformer.stabilize.stress import scale_activations

    asr, cmvn = tiny_asr(2), tiny_cmvn(2)
    torch.manual_seed(5)
    feats = [torch.randn(1, T, 20) * 3 for T in (50, 90)]
    ane = ANEConformer.from_asr(asr, cmvn)
    centred = []  # max |x - mean| over the channels of every LayerNorm input
    hooks = [
        m.register_forward_hook(lambda m, a, o: centred.append(float((a[0] - a[0].mean(1, True)).abs().max())))
        for m in ane.modules()
        if isinstance(m, PreNormLayerNorm)
    ]
    rep = audit(ane, feats)
    for h in hooks:
        h.remove()
    gain = 32.0
    assert gain**2 * rep["summary"]["worst_layernorm_sumsq"]["peak"] > 65504  # the sum overflows ...
    assert (gain * max(centred)) ** 2 < 65504  # ... no single square does
    scaled = scale_activations(asr, gain)
    ref = precision_model(asr, "fp32", cmvn)

    def err(mode, accumulate):
        pm = precision_model(scaled, mode, cmvn, accumulate=accumulate)
        if accumulate == "fp16":  # the LayerNorms run their own FP16-accumulating algorithm
            assert all(m.accumulate == "sequential" for m in pm.module.modules() if isinstance(m, PreNormLayerNorm))
        return max(float((pm(f) - ref(f)).abs().nan_to_num(1e9).max()) for f in feats)

    # measured: 0.004 / 1.8 / 0.003
    assert err("fp16_unstabilized", "native") < 0.02
    assert err("fp16_unstabilized", "fp16") > 0.5
    assert err("fp16", "fp16") < 0.02
