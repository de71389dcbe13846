"""MIL-sim: saved Core ML programs executed on Linux match PyTorch, with the program's own precision."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb

from edgeconformer.export import milsim
from edgeconformer.export.coreml import export_coreml
from edgeconformer.export.milsim import MILExecutor, UnsupportedOpError, load_program
from edgeconformer.models.lightning import build_model
from edgeconformer.stabilize.ane import ANEConformer

META = {"subsampling_factor": 4, "cmvn_folded": False}


class StandIn(nn.Module):
    """A small (B, C, 1, S) acoustic model with the op mix of the ANE encoder: strided and depthwise Conv2d
    front end, 1x1 convs, einsum attention, softmax, SiLU, a kernel-5 depthwise conv and a log-softmax head."""

    def __init__(self, n_mels=80, channels=8, d=32, vocab=12):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, 2)
        self.depthwise = nn.Conv2d(channels, channels, 3, 2, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)
        freq = ((n_mels - 3) // 2 + 1 - 3) // 2 + 1
        self.proj = nn.Conv2d(channels * freq, d, 1)
        self.q, self.k, self.v = nn.Conv2d(d, d, 1), nn.Conv2d(d, d, 1), nn.Conv2d(d, d, 1)
        self.time_conv = nn.Conv2d(d, d, (1, 5), padding=(0, 2), groups=d)
        self.head = nn.Conv2d(d, vocab, 1)

    def forward(self, feats):
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        x = F.relu(self.pointwise(self.depthwise(F.relu(self.conv1(x)))))  # (B, C, F', T')
        x = self.proj(x.flatten(1, 2).unsqueeze(2))  # (B, D, 1, T')
        q = self.q(x).transpose(1, 3)  # (B, T', 1, D)
        scores = torch.einsum("bqhc,bchk->bqhk", q, self.k(x)) / 32**0.5  # (B, Tq, 1, Tk)
        probs = scores.softmax(dim=3)
        y = torch.einsum("bqhk,bkhc->bqhc", probs, self.v(x).transpose(1, 3)).transpose(1, 3)  # (B, D, 1, T')
        x = x + F.silu(self.time_conv(x + y))
        return F.log_softmax(self.head(x), dim=1).squeeze(2).transpose(1, 2)  # (B, T', V)


def convert(module, path, precision, lengths=(48, 80)):
    export_coreml(
        module, path, precision=precision, metadata=META, shapes={"policy": "enumerated", "lengths": list(lengths)}
    )
    return MILExecutor(load_program(path))


@pytest.fixture(scope="module")
def stand_in():
    torch.manual_seed(0)
    module = StandIn().eval()
    with torch.no_grad():
        module.head.weight.mul_(8.0)  # peaky outputs like a trained CTC head: greedy paths are well defined
    return module


@pytest.fixture(scope="module")
def programs(stand_in, tmp_path_factory):
    root = tmp_path_factory.mktemp("milsim")
    return {p: convert(stand_in, root / f"standin_{p}.mlpackage", p) for p in ("fp32", "fp16")}


def features(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, T, 80, generator=g) * 3.0 - 4.0  # raw log-mel range


def same_as_reference(path, inputs: list[torch.Tensor]) -> set[str]:
    """Runs the program at `path` on `inputs` (feats) both ways MIL-sim can run coremltools' value_inference (on a
    stand-in op holding the values, and through the Builder) and asserts bit-identical outputs and that the
    stand-in served every op; -> the op types of the program."""
    program = load_program(path)
    fast, reference = MILExecutor(program), MILExecutor(program, reference=True)
    for x in inputs:
        got, want = fast.run({"feats": x.numpy()})["log_probs"], reference.run({"feats": x.numpy()})["log_probs"]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert not fast.reference_calls, f"ops that needed the Builder: {dict(fast.reference_calls)}"
    assert not reference.reference_calls  # counts only what the fast way could not do
    return {op.op_type for op in fast.ops}


@pytest.mark.parametrize("T", [48, 80])
def test_fp32_program_matches_pytorch(stand_in, programs, T):
    x = features(T)
    with torch.no_grad():
        ref = stand_in(x).numpy()
    out = programs["fp32"].run({"feats": x.numpy()})["log_probs"]
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("T", [48, 80])
def test_fp16_program_runs_in_fp16_and_keeps_the_greedy_path(stand_in, programs, T):
    x = features(T, seed=1)
    with torch.no_grad():
        ref = stand_in(x).numpy()
    out = programs["fp16"].run({"feats": x.numpy()})["log_probs"]
    assert out.dtype == np.float16
    err = np.abs(out.astype(np.float64) - ref)
    # Measured 3.4e-3 .. 5.3e-3 over 12 inputs, about one fp16 ulp (3.9e-3) of the largest |log-probs| (4 .. 8).
    assert err.max() < 1.5e-2
    assert err.max() > 0  # really rounded: an fp16 program cannot reproduce fp32 exactly
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def test_fp16_rounding_and_overflow_are_those_of_fp16(tmp_path):
    class Ops(nn.Module):
        def forward(self, feats):
            # 1 + 1e-4 rounds back to 1 in fp16 (ulp 2^-10); 300 * 300 = 9e4 overflows fp16's 65504.
            return torch.stack([feats + 1e-4, feats * 300.0 * 300.0], dim=-1).flatten(2)

    x = np.ones((1, 8, 80), np.float32)
    for precision in ("fp16", "fp32"):
        path = tmp_path / f"ops_{precision}.mlpackage"
        export_coreml(Ops(), path, precision=precision, metadata=META, shapes={"policy": "fixed", "fixed_length": 8})
        out = MILExecutor(load_program(path)).run({"feats": x})["log_probs"].astype(np.float64)
        rounded, big = out[..., 0::2], out[..., 1::2]
        if precision == "fp16":
            assert (rounded == 1.0).all() and np.isinf(big).all()
        else:
            np.testing.assert_allclose(rounded, 1.0001, rtol=1e-6)
            np.testing.assert_allclose(big, 9e4, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=20, deadline=None)
@given(
    nd=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 4]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    kernel=st.integers(1, 4),
    pad=st.integers(0, 2),
    size=st.integers(9, 16),
    pad_type=st.sampled_from(["custom", "valid", "same"]),
)
def test_conv_kernel_matches_torch(nd, groups, stride, dilation, kernel, pad, size, pad_type):
    g = torch.Generator().manual_seed(nd * 1000 + groups * 100 + stride * 10 + kernel)
    c_in, c_out = 4, 8
    x = torch.randn(2, c_in, *([size] * nd), generator=g)
    w = torch.randn(c_out, c_in // groups, *([kernel] * nd), generator=g)
    b = torch.randn(c_out, generator=g)
    conv = F.conv1d if nd == 1 else F.conv2d
    if pad_type == "same":
        stride = 1  # PyTorch's padding="same" exists for stride 1 only
        ref = conv(x, w, b, stride=stride, padding="same", dilation=dilation, groups=groups)
    elif pad_type == "valid":
        ref = conv(x, w, b, stride=stride, dilation=dilation, groups=groups)
    else:
        ref = conv(x, w, b, stride=stride, padding=pad, dilation=dilation, groups=groups)
    args = {
        "x": x.numpy(),
        "weight": w.numpy(),
        "bias": b.numpy(),
        "strides": [stride] * nd,
        "dilations": [dilation] * nd,
        "groups": groups,
        "pad_type": pad_type,
        "pad": [pad, pad] * nd,
    }
    out = milsim.KERNELS["conv"](None, args)
    assert out.shape == tuple(ref.shape)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=1e-5)


def _saved_program(tmp_path, build):
    # A hand-built MIL program saved as an .mlpackage, as coremltools would save a converted model.
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 2, 2), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return build(x)

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    path = tmp_path / "hand.mlpackage"
    model.save(str(path))
    return load_program(path)


def test_unknown_op_is_named(tmp_path):
    # pixel_shuffle has neither a coremltools value_inference nor a MIL-sim kernel.
    program = _saved_program(tmp_path, lambda x: mb.pixel_shuffle(x=x, upscale_factor=2))
    with pytest.raises(UnsupportedOpError, match="'pixel_shuffle'"):
        MILExecutor(program)


def test_failing_reference_falls_back_to_a_kernel_or_names_the_op(tmp_path, monkeypatch):
    program = _saved_program(tmp_path, lambda x: mb.silu(x=x))  # silu: no value_inference, MIL-sim kernel
    x = np.linspace(-6, 6, 32, dtype=np.float32).reshape(1, 8, 2, 2)
    out = next(iter(MILExecutor(program).run({"x": x}).values()))
    np.testing.assert_allclose(out, x / (1 + np.exp(-x)), rtol=1e-6)
    monkeypatch.delitem(milsim.KERNELS, "silu")
    with pytest.raises(UnsupportedOpError, match="'silu'.*KERNELS"):
        MILExecutor(program)


def test_inputs_are_checked(programs):
    with pytest.raises(ValueError, match="missing \\['feats'\\]"):
        programs["fp32"].run({"x": np.zeros((1, 48, 80), np.float32)})
    with pytest.raises(ValueError, match="shape \\(1, 48, 40\\)"):
        programs["fp32"].run({"feats": np.zeros((1, 48, 40), np.float32)})


def test_load_program_rejects_what_is_not_a_package(tmp_path):
    with pytest.raises(ValueError, match="not an .mlpackage"):
        load_program(tmp_path)


@pytest.mark.parametrize("mode", ["update", "add", "max"])
def test_scatter_kernels_match_torch(mode):
    g = torch.Generator().manual_seed(3)
    data, upd = torch.randn(5, 4, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    idx = torch.tensor([3, 0])  # distinct: repeated indices have no single meaning in every framework
    reduce = {"update": None, "add": "sum", "max": "amax"}[mode]
    index = idx[None, :, None].expand(5, 2, 3)
    ref = data.scatter(1, index, upd) if reduce is None else data.scatter_reduce(1, index, upd, reduce)
    out = milsim.KERNELS["scatter"](
        None, {"data": data.numpy(), "indices": idx.numpy(), "updates": upd.numpy(), "axis": 1, "mode": mode}
    )
    np.testing.assert_array_equal(out, ref.numpy())

    nd_idx = torch.tensor([[0, 1], [4, 3], [2, 2]])  # (N, K=2) into the first two axes
    nd_upd = torch.randn(3, 3, generator=g)
    ref = data.clone()
    for (i, j), u in zip(nd_idx.tolist(), nd_upd):
        ref[i, j] = u if mode == "update" else (ref[i, j] + u if mode == "add" else torch.maximum(ref[i, j], u))
    out = milsim.KERNELS["scatter_nd"](
        None, {"data": data.numpy(), "indices": nd_idx.numpy(), "updates": nd_upd.numpy(), "mode": mode}
    )
    np.testing.assert_array_equal(out, ref.numpy())


def test_lut_softmax_graph_runs_like_pytorch(tmp_path):
    # The LUT softmax is data dependent (table lookups with computed indices, conditional re-scaling): MIL-sim runs
    # its converted graph, including what coremltools makes of it (gathers, and whatever masking ops appear).
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/model/small.yaml").read_text())
    del cfg["defaults"]  # Hydra's defaults list (the structured schema), not a model key
    cfg.update(subsampling="dws", subsampling_channels=8)
    cfg["encoder"].update(d_model=32, n_layers=1, n_heads=1, ff_dim=64, kernel_size=5)
    cfg["decoder"].update(ff_dim=64, n_heads=1)
    torch.manual_seed(0)
    ane = ANEConformer.from_asr(build_model(cfg, 16).eval(), prenorm="mad", softmax="lut", lut_max_squarings="auto")
    x = features(64, seed=2)
    with torch.no_grad():
        ref = ane(x).numpy()
    # FP32 only: conversion is the slow part, and FP32 is where a wrong kernel would show (FP16 measured 0.014).
    path = tmp_path / "lut.mlpackage"
    report = export_coreml(ane, path, precision="fp32", metadata=META, shapes={"policy": "fixed", "fixed_length": 64})
    out = MILExecutor(load_program(path)).run({"feats": x.numpy()})["log_probs"]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert "gather" in report["ops"]  # the table lookup
    assert {"select", "gather"} <= same_as_reference(path, [x, features(64, seed=3)])  # masks and lookups
