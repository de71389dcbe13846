import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.artifacts import resolve_model_dir
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.models.layout import MaskedSoftmax
from edgeconformer.stabilize.ane import ANEConformer
from edgeconformer.stabilize.audit import audit, compare_audits, format_limits, plot_audit, value_counts, write_audit
from edgeconformer.stabilize.prenorm import PreNormLayerNorm

REPO = Path(__file__).resolve().parents[1]
FP16 = format_limits("fp16")


def tiny_asr(seed=0, dws=False):
    torch.manual_seed(seed)
    enc = ConformerEncoder(
        idim=20,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ff_dim=64,
        kernel_size=7,
        dropout=0.0,
        subsampling_channels=8,
        dws_subsampling=dws,
    )
    return DualDecoderASR(enc, 12, None, ctc_weight=1.0).eval()


class Emit(nn.Module):
    """Returns a fixed tensor whatever the input: crafted outputs for the hooks to count."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def test_format_limits():
    assert FP16 == {"max": 65504.0, "min_normal": 2.0**-14, "min_subnormal": 2.0**-24}
    assert format_limits("bf16")["min_normal"] == 2.0**-126
    with pytest.raises(ValueError, match="fp17"):
        format_limits("fp17")


def test_value_counts_exact_on_crafted_tensor():
    # boundaries are exclusive: 65504 is finite, 2^-14 normal, 2^-24 the smallest subnormal (not flushed)
    x = torch.tensor(
        [
            0.0,
            65504.0,
            70000.0,
            -1e6,
            2.0**-14,
            2.0**-15,
            -1e-5,
            2.0**-24,
            1e-8,
            -1e-30,
            float("inf"),
            float("-inf"),
            float("nan"),
            3.0,
        ]
    )
    c = value_counts(x, FP16)
    assert c == {"max_abs": 1e6, "inf": 2, "nan": 1, "overflow": 2, "underflow": 5, "flush_to_zero": 2, "elements": 14}
    # an FP16 tensor: what overflowed is inf already, values below 2^-25 are zeros, subnormals survive
    h = x.half()
    c = value_counts(h, FP16)
    assert (c["inf"], c["nan"], c["overflow"], c["underflow"], c["flush_to_zero"]) == (4, 1, 0, 3, 0)
    assert c["max_abs"] == 65504.0


def test_hooks_sum_counts_over_calls_and_batches():
    out = torch.tensor([[1e-6, 1e5, float("nan")]])
    model = nn.Sequential(Emit(out)).eval()
    rep = audit(model, [torch.zeros(1, 3), torch.zeros(1, 3)])
    rec = rep["modules"]["0"]
    assert rec["calls"] == 2 and rec["elements"] == 6
    assert (rec["nan"], rec["overflow"], rec["underflow"], rec["flush_to_zero"]) == (2, 2, 2, 0)
    assert rec["out_max_abs"] == 1e5
    assert rep["batches"] == 2


def test_layernorm_sum_of_squares_is_the_hand_computed_one():
    # rows: [1, 2, 3, 10]: mean 4, deviations -3 -2 -1 6 -> 9 + 4 + 1 + 36 = 50;
    #       [300, -300, 300, -300]: 4 * 90000 = 360000 > 65504 (one overflowing row)
    x = torch.tensor([[[1.0, 2.0, 3.0, 10.0], [300.0, -300.0, 300.0, -300.0]]])
    rep = audit(nn.Sequential(nn.LayerNorm(4)).eval(), [x])
    rec = rep["modules"]["0"]
    assert rec["ln_sumsq_peak"] == 360000.0 and rec["ln_accumulated_peak"] == 360000.0
    assert rec["ln_rows_over"] == 1 and rec["ln_rows_nonfinite"] == 0
    assert rec["in_max_abs"] == 300.0
    worst = rep["summary"]["worst"]
    assert worst["module"] == "0" and worst["peak"] == 360000.0
    assert worst["headroom_bits"] == pytest.approx(math.log2(65504 / 360000), abs=1e-12)
    assert rep["summary"]["layernorm_rows_over"] == 1


def test_prenormalized_layernorm_reports_what_it_accumulates():
    # MAD pre-normalizer: row 1 s = (3+2+1+6)/4 = 3 -> 50/9; row 2 s = 300 -> 4 * 1 = 4
    x = torch.tensor([[[1.0, 2.0, 3.0, 10.0], [300.0, -300.0, 300.0, -300.0]]])
    ln = PreNormLayerNorm.from_layernorm(nn.LayerNorm(4), prenorm="mad")
    rec = audit(nn.Sequential(ln).eval(), [x])["modules"]["0"]
    assert rec["ln_sumsq_peak"] == 360000.0  # the input is as large as ever
    assert rec["ln_accumulated_peak"] == pytest.approx(50 / 9, rel=1e-12)
    assert rec["ln_rows_over"] == 0
    assert rec["peak"] == 300.0  # the input magnitude is now the worst quantity of the module


class ChannelLayerNorm(nn.Module):
    """A LayerNorm over the channels of (B, C, 1, S) without a `dim` attribute (found by its class name)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.layer_norm(x.transpose(1, 3), self.weight.shape, self.weight).transpose(1, 3)


@pytest.mark.parametrize("norm", [PreNormLayerNorm(4, prenorm="none", dim=1), ChannelLayerNorm(4)])
def test_channel_layernorm_normalises_dim_1(norm):
    # (B, C, 1, S) = (1, 4, 1, 2): frame 0 holds [1, 2, 3, 10] over channels (sum 50), frame 1 [0, 0, 0, 8]
    # (mean 2: 4 + 4 + 4 + 36 = 48). Normalising the last dim instead would give other numbers.
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [10.0, 8.0]]).reshape(1, 4, 1, 2)
    rec = audit(nn.Sequential(norm).eval(), [x])["modules"]["0"]
    assert rec["ln_sumsq_peak"] == 50.0 and rec["ln_rows_over"] == 0


def test_softmax_logit_range_ignores_masked_entries():
    scores = torch.tensor([[0.0, 5.0, -3.0], [1.0, 1.0, float("-inf")]])
    rec = audit(nn.Sequential(nn.Softmax(dim=-1)).eval(), [scores])["modules"]["0"]
    assert rec["softmax_logit_range"] == 8.0 and rec["softmax_max_abs_logit"] == 5.0

    class Scores(nn.Module):  # the ANE graph calls softmax(scores, dim=3, mask=...)
        def __init__(self):
            super().__init__()
            self.softmax = MaskedSoftmax()

        def forward(self, s):
            mask = torch.tensor([True, True, False]).reshape(1, 1, 1, 3)
            return self.softmax(s, dim=3, mask=mask)

    s = torch.tensor([0.0, 5.0, -100.0]).reshape(1, 1, 1, 3)  # the masked -100 is not a logit of the row
    rec = audit(Scores().eval(), [s])["modules"]["softmax"]
    assert rec["softmax_logit_range"] == 5.0 and rec["softmax_max_abs_logit"] == 5.0


def test_original_model_audit_shows_no_softmax_and_every_layernorm():
    asr = tiny_asr()
    feats = torch.randn(1, 60, 20)
    rep = audit(asr, [feats])
    s = rep["summary"]
    assert s["softmax_modules"] == 0 and s["softmax_max_logit_range"] is None
    assert any("fused" in n for n in rep["notes"])
    assert s["layernorm_modules"] == 2 * 6  # ffn1.norm, norm_mhsa, conv.norm_in, conv.norm, ffn2.norm, norm
    assert not any(k.startswith("decoder") for k in rep["modules"])
    assert rep["modules"]["ctc"]["calls"] == 1
    # the LayerNorm record equals the centred sum of squares of the block input, recomputed here
    seen = {}
    h = asr.encoder.blocks[1].ffn1.norm.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    with torch.no_grad():
        asr.encode(feats, torch.tensor([60]))
    h.remove()
    x = seen["x"].double()
    expected = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1).max().item()
    assert rep["modules"]["encoder.blocks.1.ffn1.norm"]["ln_sumsq_peak"] == pytest.approx(expected, rel=1e-12)


def test_ane_audit_matches_the_original_per_module():
    asr = tiny_asr(1)
    feats = torch.randn(1, 60, 20)
    ane = ANEConformer.from_asr(asr, prenorm="none", softmax="exact")
    a, b = audit(asr, [feats]), audit(ane, [feats])
    assert b["summary"]["softmax_modules"] == 2 and b["notes"] == []
    assert b["summary"]["softmax_max_logit_range"] > 0
    for name in ("encoder.blocks.0.ffn1.norm", "encoder.blocks.1.norm", "encoder.blocks.0.conv.norm"):
        # same names, same inputs (up to FP32 rounding of a different op order): same statistics
        assert b["modules"][name]["ln_sumsq_peak"] == pytest.approx(a["modules"][name]["ln_sumsq_peak"], rel=1e-4)
    assert b["modules"]["ctc"]["out_max_abs"] == pytest.approx(a["modules"]["ctc"]["out_max_abs"], rel=1e-4)


def test_bad_input_is_refused():
    asr = tiny_asr()
    with pytest.raises(ValueError, match="eval"):
        audit(asr.train(), [torch.randn(1, 60, 20)])
    with pytest.raises(ValueError, match="no batches"):
        audit(asr.eval(), [])


def test_write_and_plot_are_atomic(tmp_path):
    reports = {
        "vanilla": audit(tiny_asr(2), [torch.randn(1, 40, 20)]),
        "dws": audit(tiny_asr(2, dws=True), [torch.randn(1, 40, 20)]),
    }
    path = write_audit(reports["dws"], tmp_path / "out" / "audit.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(reports["dws"]))
    png = plot_audit(reports, tmp_path / "audit.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["audit.json", "audit.png", "out"]  # no temp files left
    with pytest.raises(ValueError, match="no reports"):
        plot_audit({}, tmp_path / "x.png")


def _report(peaks):
    return {"modules": {k: {"peak": v} for k, v in peaks.items()}}


def test_compare_audits_ratios():
    a = _report({"encoder.subsampling.conv.0": 4.0, "encoder.subsampling.conv.2": 32.0, "ctc": 10.0})
    b = _report({"encoder.subsampling.conv.0": 4.0, "encoder.subsampling.conv.3": 8.0, "ctc": 20.0})
    c = compare_audits(a, b)
    assert c["modules"]["ctc"] == {"a_peak": 10.0, "b_peak": 20.0, "ratio": 2.0, "bits": 1.0}
    fe = c["front_end"]
    assert (fe["a_peak"], fe["b_peak"], fe["ratio"], fe["bits"]) == (32.0, 8.0, 0.25, -2.0)
    assert (fe["a_worst"], fe["b_worst"]) == ("encoder.subsampling.conv.2", "encoder.subsampling.conv.3")
    assert c["only_in_a"] == ["encoder.subsampling.conv.2"] and c["only_in_b"] == ["encoder.subsampling.conv.3"]
    with pytest.raises(ValueError, match="front_end"):
        compare_audits(a, _report({"ctc": 1.0}))


@pytest.mark.skipif(
    not all(
        (REPO / p).exists()
        for p in (
            resolve_model_dir(REPO / "models/vanilla") / "best.ckpt",
            resolve_model_dir(REPO / "models/dws") / "best.ckpt",
            "data/prepared/manifests/test.jsonl",
        )
    ),
    reason="needs trained checkpoints models/{vanilla,dws}/s<seed>/best.ckpt and the prepared test "
    "split (dvc repro train)",
)
def test_trained_front_ends_vanilla_vs_dws():
    # Paper 1, claim 7, measured on the shipped checkpoints: the DWS front end has the smaller peak activation.
    from edgeconformer.cli import load_trained
    from edgeconformer.data.dataset import load_audio
    from edgeconformer.files import read_jsonl

    rows = read_jsonl(REPO / "data/prepared/manifests/test.jsonl")[:3]
    reports = {}
    for variant in ("vanilla", "dws"):
        module = load_trained(REPO / "models" / variant)
        batches = []
        for r in rows:
            audio = load_audio(r["audio_filepath"])
            feats, lengths = module.fbank(audio[None], torch.tensor([audio.numel()]))
            batches.append((module.cmvn(feats, lengths), lengths))
        # the front end alone: its module names get no "encoder." prefix
        reports[variant] = audit(module.model.encoder.subsampling, batches)
    c = compare_audits(reports["vanilla"], reports["dws"], front_end="conv")
    assert c["front_end"]["bits"] < 0, c["front_end"]
    for r in reports.values():
        assert r["summary"]["inf"] == r["summary"]["nan"] == r["summary"]["overflow"] == 0
