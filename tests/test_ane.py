"""The ANE (B, C, 1, S) graph equals the trained PyTorch model (FP32), keeps its layout contract, runs in float16
and converts to Core ML."""

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from edgeconformer.artifacts import resolve_model_dir
from edgeconformer.data.features import GlobalCMVN
from edgeconformer.decoding.ctc import ctc_greedy
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.attention import RelPositionMultiHeadAttention
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.models.dropout import Dropout
from edgeconformer.models.layout import ChannelsFirst
from edgeconformer.models.lightning import build_model
from edgeconformer.models.performer import PerformerAttention
from edgeconformer.stabilize.ane import ANEConformer

REPO = Path(__file__).resolve().parents[1]
N_MELS, VOCAB = 20, 30
ATOL = 1e-4  # FP32 equivalence (measured max |diff| about 2e-6 on these models; docs/stabilization.md section 3)


def tiny_model_config(**overrides):
    # conf/model/small.yaml shrunk; overrides go to the encoder section when they name one of its keys.
    m = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/small.yaml"))
    del m["defaults"]  # Hydra's defaults list (the structured schema), not a model key
    m.update(n_mels=N_MELS, subsampling_channels=8)
    m["encoder"].update(d_model=32, n_layers=2, n_heads=4, ff_dim=48, kernel_size=5, dropout=0.0)
    m["decoder"].update(n_layers=1, ff_dim=32, dropout=0.0)
    for key, value in overrides.items():
        (m["encoder"] if key in m["encoder"] else m)[key] = value
    return m


def randomize(module, seed=0):
    # Every parameter random, LayerNorm weights around 1 and biases, u/v biases, CTC bias included, and BatchNorm
    # statistics: a wrongly copied or ignored tensor cannot go unnoticed.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module.eval()


def tiny_asr(seed=0, **overrides):
    return randomize(build_model(tiny_model_config(**overrides), VOCAB), seed)


def features(T=61, seed=1):
    return torch.randn(1, T, N_MELS, generator=torch.Generator().manual_seed(seed))


def reference(asr, feats):
    with torch.no_grad():
        out, _ = asr.encode(feats, torch.tensor([feats.size(1)] * feats.size(0)))
        return out, asr.ctc_log_probs(out)  # (B, T', D), (B, T', V)


def ane_outputs(ane, feats):
    with torch.no_grad():
        return ane.encode(feats).squeeze(2).transpose(1, 2), ane(feats)  # (B, T', D), (B, T', V)


VARIANTS = {
    "vanilla-rel": {},
    "dws-rel": dict(subsampling="dws"),
    "vanilla-x8": dict(subsampling_factor=8),
    "dws-x8-abs": dict(subsampling="dws", subsampling_factor=8, pos="abs"),
    "chunked-causal": dict(causal=True, chunk_size=3, left_chunks=1),
    "chunked-abs-unlimited": dict(pos="abs", chunk_size=4, left_chunks=-1),
    "batchnorm": dict(norm="batch"),
    "performer-full": dict(attention="performer", performer_features=16),
    "performer-chunked": dict(attention="performer", causal=True, chunk_size=3),
}


# performer_shift only changes Performer blocks: both arithmetics are checked there
@pytest.mark.parametrize(
    "variant, performer_shift", [(v, True) for v in VARIANTS] + [(v, False) for v in VARIANTS if "performer" in v]
)
def test_fp32_equivalence(variant, performer_shift):
    asr = tiny_asr(**VARIANTS[variant])
    ane = ANEConformer.from_asr(asr, performer_shift=performer_shift)
    feats = features()
    enc_ref, lp_ref = reference(asr, feats)
    enc, lp = ane_outputs(ane, feats)
    assert enc.shape == enc_ref.shape and lp.shape == lp_ref.shape
    torch.testing.assert_close(enc, enc_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, lp_ref, atol=ATOL, rtol=0)
    assert enc_ref.abs().max() > 1.0  # a real signal, not a trivially small one


def test_equal_length_batch_is_per_utterance():
    asr = tiny_asr()
    ane = ANEConformer.from_asr(asr)
    feats = torch.cat([features(seed=1), features(seed=2)])
    enc_ref, lp_ref = reference(asr, feats)
    enc, lp = ane_outputs(ane, feats)
    torch.testing.assert_close(enc, enc_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp[1:], ane(feats[1:]).detach(), atol=ATOL, rtol=0)


def test_cmvn_folded_in():
    asr = tiny_asr()
    g = torch.Generator().manual_seed(3)
    cmvn = GlobalCMVN(
        N_MELS, mean=torch.randn(N_MELS, generator=g) * 3 - 5, std=torch.rand(N_MELS, generator=g) * 2 + 0.5
    )
    ane = ANEConformer.from_asr(asr, cmvn=cmvn)
    raw = features() * 2 - 5  # log-mel-like: offset and spread per bin
    normalised = cmvn(raw, torch.tensor([raw.size(1)]))
    enc_ref, lp_ref = reference(asr, normalised)
    enc, lp = ane_outputs(ane, raw)
    torch.testing.assert_close(enc, enc_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, lp_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prenorm", ["mad", "linf"])
def test_prenorm_is_exact_in_fp32(prenorm):
    asr = tiny_asr(causal=True, chunk_size=3)
    ane = ANEConformer.from_asr(asr, prenorm=prenorm)
    assert all(m.prenorm == prenorm for n, m in ane.named_modules() if n.endswith("norm") and hasattr(m, "prenorm"))
    feats = features()
    enc_ref, lp_ref = reference(asr, feats)
    enc, lp = ane_outputs(ane, feats)
    torch.testing.assert_close(enc, enc_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, lp_ref, atol=ATOL, rtol=0)


# 256-entry table over [-16, 0], linear interpolation: measured 1.6e-4 / 2.9e-4 (docs/stabilization.md section 3)
LUT_ATOL = 1e-3


def test_lut_softmax_close():
    asr = tiny_asr(chunk_size=3)
    ane = ANEConformer.from_asr(asr, softmax="lut", lut_size=256, lut_range=16.0)
    feats = features()
    enc_ref, lp_ref = reference(asr, feats)
    enc, lp = ane_outputs(ane, feats)
    torch.testing.assert_close(enc, enc_ref, atol=LUT_ATOL, rtol=0)
    torch.testing.assert_close(lp, lp_ref, atol=LUT_ATOL, rtol=0)
    assert (enc - enc_ref).abs().max() > 0  # the table really replaced exp
    coarse = ANEConformer.from_asr(asr, softmax="lut", lut_size=16, lut_range=16.0)
    assert (ane_outputs(coarse, feats)[0] - enc_ref).abs().max() > (enc - enc_ref).abs().max()


def test_rel_shift_matches_original_and_any_length():
    from edgeconformer.models.attention import rel_shift as original
    from edgeconformer.models.attention import rel_shift_query_major as rel_shift

    for T in (1, 2, 3, 8, 17):
        x = torch.randn(2, 3, T, 2 * T - 1)  # original layout (B, H, T, 2T-1)
        want = original(x)  # (B, H, T, T)
        got = rel_shift(x.flatten(0, 1)[:, :, None, :])  # ours on (B*H, T, 1, 2T-1)
        assert torch.equal(got[:, :, 0].reshape(2, 3, T, T), want)


def test_layout_contract():
    asr = tiny_asr(causal=True, chunk_size=3, subsampling="dws")
    ane = ANEConformer.from_asr(asr)
    assert not any(isinstance(m, nn.Linear) for m in ane.modules())
    assert not any(isinstance(m, (nn.Conv1d, nn.LayerNorm, nn.Dropout, Dropout)) for m in ane.modules())
    # every original Linear became a 1x1 Conv2d of the same name
    ane_modules = dict(ane.named_modules())
    linears = [n for n, m in asr.named_modules() if isinstance(m, nn.Linear) and not n.startswith("decoder")]
    assert linears and all(
        isinstance(ane_modules[n], nn.Conv2d) and ane_modules[n].kernel_size == (1, 1) for n in linears
    )
    # norms and softmaxes are named like the original's modules (softmax: where the fused kernel ran)
    assert {
        "encoder.blocks.0.ffn1.norm",
        "encoder.blocks.0.norm_mhsa",
        "encoder.blocks.0.conv.norm",
        "encoder.blocks.1.norm",
        "encoder.blocks.0.mhsa.softmax",
    } <= set(ane_modules)

    feats = features()
    T_out = ane.encoder.subsampling.subsample(feats.size(1))
    seen = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = tuple(output.shape)

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in ane.named_modules()
        if (n.startswith("encoder.blocks.") or n in ("encoder.subsampling.out", "ctc"))
    ]
    with torch.no_grad():
        ane(feats)
    for h in handles:
        h.remove()
    assert len(seen) == len(handles)
    D = 32
    for name, shape in seen.items():
        assert len(shape) == 4 and shape[0] == 1 and shape[2] == 1, (name, shape)  # (B, C, 1, S)
        if name.endswith(("mhsa.softmax",)):
            assert shape == (1, T_out, 1, T_out), name  # query-major scores (B, S_q, 1, S_k)
        elif name.endswith("linear_pos"):
            assert shape == (1, D, 1, 2 * T_out - 1), name
        elif name == "ctc":
            assert shape == (1, VOCAB, 1, T_out)
        elif not name.endswith(("up", "pointwise_in")):
            assert shape == (1, D, 1, T_out), name


def test_trace_works_at_other_lengths():
    # The traced graph has no baked-in length: relative shift, position table and chunk mask follow T'.
    asr = tiny_asr(causal=True, chunk_size=3, left_chunks=1)
    ane = ANEConformer.from_asr(asr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ane, features(T=61))
    for T in (31, 150):
        feats = features(T=T, seed=T)
        torch.testing.assert_close(traced(feats), reference(asr, feats)[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("prenorm,softmax", [("none", "exact"), ("mad", "lut")])
def test_runs_in_float16_on_cpu(prenorm, softmax):
    asr = tiny_asr(causal=True, chunk_size=3)
    ane = ANEConformer.from_asr(asr, prenorm=prenorm, softmax=softmax)
    feats = features()
    _, lp_ref = reference(asr, feats)
    with torch.no_grad():
        lp = ane.half()(feats.half())
    assert lp.dtype == torch.float16 and torch.isfinite(lp).all()
    # FP16 rounding through 2 blocks: measured max |diff| about 1e-2 on log-probs of magnitude up to 10
    torch.testing.assert_close(lp.float(), lp_ref, atol=5e-2, rtol=0)


def test_practical_conformer_blocks():
    # Botros et al. options of the encoder: convolution-only first blocks, per-block widths with projections, and a
    # cascade whose second pass is non-causal with full attention.
    encoder = ConformerEncoder(
        idim=N_MELS,
        d_model=24,
        n_layers=3,
        n_heads=4,
        ff_dim=40,
        kernel_size=5,
        dropout=0.0,
        subsampling_channels=8,
        causal=True,
        chunk_size=3,
        conv_only_layers=1,
        block_dims=[(32, 4, 48), (32, 4, 48), (24, 2, 40)],
        first_pass_layers=2,
    )
    asr = randomize(DualDecoderASR(encoder, VOCAB, ctc_weight=1.0))
    ane = ANEConformer.from_asr(asr)
    assert not hasattr(ane.encoder.blocks[0], "mhsa") and "2" in ane.encoder.projections
    feats = features()
    enc_ref, lp_ref = reference(asr, feats)
    enc, lp = ane_outputs(ane, feats)
    torch.testing.assert_close(enc, enc_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, lp_ref, atol=ATOL, rtol=0)


def test_bad_input_and_unsupported_models():
    asr = tiny_asr()
    ane = ANEConformer.from_asr(asr)
    with pytest.raises(ValueError, match=r"\(B, T, F\)"):
        ane(torch.randn(97, N_MELS))
    with pytest.raises(ValueError, match="bins"):
        ane(torch.randn(1, 97, 40))
    with pytest.raises(ValueError, match="too few"):
        ane(torch.randn(1, 6, N_MELS))
    with pytest.raises(ValueError, match="DualDecoderASR"):
        ANEConformer.from_asr(asr.encoder)
    with pytest.raises(ValueError, match="softmax"):
        ANEConformer.from_asr(asr, softmax="fast")
    with pytest.raises(ValueError, match="prenorm"):
        ANEConformer.from_asr(asr, prenorm="rms")


class _OtherAttention(nn.Module):
    n_heads = 4


def test_unknown_attention_has_no_ane_form():
    asr = tiny_asr()
    asr.encoder.blocks[1].mhsa = _OtherAttention()
    with pytest.raises(ValueError, match="_OtherAttention has no ANE form"):
        ANEConformer.from_asr(asr)


def test_practical_model_with_performer_and_cascade():
    # The practical variant's shape in small: conv-only block, a downsized causal Performer block, then a non-causal
    # softmax second pass. The graph reads the second pass (the exported output), equal to the trained model's.
    m = tiny_model_config(
        n_layers=2,
        conv_only_layers=1,
        attention="performer",
        performer_features=16,
        causal=True,
        chunk_size=3,
        stages=[{"n_layers": 1}, {"n_layers": 1, "d_model": 24, "ff_dim": 40}],
    )
    m["cascade"].update(enabled=True, n_layers=1, d_model=32, n_heads=4, ff_dim=48)
    asr = randomize(build_model(m, VOCAB))
    ane = ANEConformer.from_asr(asr, performer_shift=True)
    assert isinstance(ane.encoder.blocks[1].mhsa, PerformerAttention)
    assert isinstance(ane.encoder.blocks[2].mhsa, RelPositionMultiHeadAttention)
    assert ane.encoder.pos_enc.widths == [32]  # no position table for the Performer's width
    feats = features()
    enc_ref, lp_ref = reference(asr, feats)
    enc, lp = ane_outputs(ane, feats)
    torch.testing.assert_close(enc, enc_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lp, lp_ref, atol=ATOL, rtol=0)


class ChannelsFirstPerformer(PerformerAttention):
    """A Performer as the ANE graph builds it (channels-first layout), called on its (B, D, 1, T) input alone."""

    def __init__(self, d_model, n_heads, n_features, shift):
        super().__init__(d_model, n_heads, 0.0, n_features, layout=ChannelsFirst(nn.LayerNorm, performer_shift=shift))

    def forward(self, x, mask=None):
        return self.forward_heads(x, mask)


def _aligned_keys(d_head=32, heads=2, T=24, m=32, seed=0):
    # A Performer whose keys point along its own random features: the key features exp(w.k' - |k'|^2/2) reach
    # exp(|w|^2/2) ~ e^16 at d_head = 32, past FP16's 65504 = e^11.1, while the attention output is ordinary.
    from edgeconformer.models.performer import orthogonal_gaussian

    D = d_head * heads
    layer = ChannelsFirstPerformer(D, heads, m, shift=True).eval()
    w = orthogonal_gaussian(m, d_head, seed)
    with torch.no_grad():
        layer.features.copy_(w)
        for conv in (layer.query, layer.key, layer.value, layer.out):
            conv.weight.copy_(torch.eye(D)[:, :, None, None])
            conv.bias.zero_()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, D, 1, T, generator=g) * 0.5
    for t in range(0, T, 3):  # every third frame: head h's key = feature row (t + h) of W, in x' = x / d^(1/4)
        for h in range(heads):
            x[0, h * d_head : (h + 1) * d_head, 0, t] = w[(t + h) % m] * d_head**0.25
    return layer, x


def _performer_reference(layer, x, mask):
    # The trained model's arithmetic (models/performer.py: per-query maximum only), in float64, for identity
    # projections: (1, D, 1, T) -> (1, D, 1, T)
    H, d, T = layer.n_heads, layer.d_head, x.size(3)
    v = x[0, :, 0].T.double().reshape(T, H, d).transpose(0, 1)  # (H, T, d)
    xs = v * d**-0.25
    a = torch.einsum("htd,md->htm", xs, layer.features.double()) - 0.5 * (xs * xs).sum(-1, keepdim=True)
    qf, kf = torch.exp(a - a.amax(-1, keepdim=True)), torch.exp(a)  # (H, T, m)
    weights = qf @ kf.transpose(1, 2)  # (H, T, T)
    if mask is not None:
        weights = weights * mask[0, :, 0].double()
    out = (weights @ v) / weights.sum(-1, keepdim=True)  # (H, T, d)
    return out.transpose(0, 1).reshape(T, H * d).T[None, :, None, :]


@pytest.mark.parametrize("chunk", [0, 4])
def test_performer_fp16_shift_keeps_features_finite(chunk):
    from edgeconformer.models.attention import chunk_attention_mask

    layer, x = _aligned_keys()
    T = x.size(3)
    mask = chunk_attention_mask(T, chunk, -1, x.device)[None, :, None, :] if chunk else None
    ref = _performer_reference(layer, x, mask).float()
    with torch.no_grad():
        assert layer.logits(x[:, : layer.d_head]).max() > 11.1  # the unshifted key features overflow FP16
        fp32 = layer(x, mask)
        half = layer.half()
        shifted = half(x.half(), mask).float()
        half.shift = False
        plain = half(x.half(), mask).float()
    torch.testing.assert_close(fp32, ref, atol=1e-4, rtol=0)
    assert torch.isfinite(shifted).all()
    # What is left is FP16's rounding of the feature logits (w.k' ~ 32 rounds to 1/64): measured max |diff| 0.012
    # (chunk 0) / 0.034 (chunk 4) on outputs up to 7.6, relative error of the whole output 8e-4 / 1.4e-3.
    torch.testing.assert_close(shifted, ref, atol=0.1, rtol=0)
    assert (shifted - ref).norm() / ref.norm() < 5e-3
    assert not torch.isfinite(plain).all()  # inf / inf = NaN where the plain features overflow


def test_coreml_conversion():
    ct = pytest.importorskip("coremltools")
    asr = tiny_asr(n_layers=1, n_heads=2, causal=True, chunk_size=3)
    ane = ANEConformer.from_asr(asr)
    feats = features(T=31)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ane, feats)
        for length in (feats.size(1), ct.RangeDim(31, 3000, default=31)):
            mlmodel = ct.convert(
                traced,
                inputs=[ct.TensorType(name="feats", shape=(1, length, N_MELS))],
                convert_to="mlprogram",
                minimum_deployment_target=ct.target.iOS16,
                compute_precision=ct.precision.FLOAT32,
                skip_model_load=True,
            )
            ops = Counter(op.op_type for f in mlmodel._mil_program.functions.values() for op in f.operations)
            # P3: every per-head product is Core ML's native einsum (rel: content, position, output), none fell back
            # to transposes around a matmul; the Linears are convolutions; nothing gathers data (shape-only gathers
            # appear with a ranged length and index the shape vector).
            assert ops["einsum"] == 1 * 2 * 3
            assert ops["matmul"] == 0 and ops["linear"] == 0 and ops["gather_along_axis"] == 0
            assert ops["conv"] >= 9
            # transposes: the two edges and three per attention layer (q, v, heads' output)
            assert ops["transpose"] == 2 + 3


TRAINED = resolve_model_dir(REPO / "models/dws") / "best.ckpt"
TEST_MANIFEST = REPO / "data/prepared/manifests/test.jsonl"


@pytest.mark.skipif(
    not (TRAINED.exists() and TEST_MANIFEST.exists()),
    reason="needs the trained models/dws checkpoint and data/prepared/manifests/test.jsonl (dvc repro train@dws)",
)
def test_trained_model_transcripts_match():
    from edgeconformer.cli import load_trained
    from edgeconformer.data.dataset import load_audio

    module = load_trained(REPO / "models/dws")
    ane = ANEConformer.from_asr(module.model, cmvn=module.cmvn)
    rows = [json.loads(line) for line in TEST_MANIFEST.read_text().splitlines()[:10]]
    worst = 0.0
    for row in rows:
        audio = load_audio(row["audio_filepath"], uid=row["id"])
        with torch.no_grad():
            raw, lengths = module.fbank(audio[None])  # (1, T, 80) log-mels, batch 1: no padding
            enc_ref, lp_ref = reference(module.model, module.cmvn(raw, lengths))
            enc, lp = ane_outputs(ane, raw)
        worst = max(worst, float((enc - enc_ref).abs().max()))
        assert module.tokenizer.decode(ctc_greedy(lp[0])) == module.tokenizer.decode(ctc_greedy(lp_ref[0]))
    assert worst < ATOL, worst


@pytest.mark.parametrize("shift, scale", [(False, 4.0), (True, 4.0), (True, 8.0)])
def test_performer_fp32_with_tiny_weights(shift, scale):
    # Large keys and queries: at scale 4, |x'|^2 / 2 ~ 45 against w.x' up to ~20, every key feature is below e^-20
    # and the trained model's normaliser far below FP16's 2^-24; at scale 8 (|x'|^2 / 2 ~ 180) whole rows of the
    # shifted weights fall below 2^-24 too, and the plain features below FP32's range (e^-100), so only the
    # shifted arithmetic can still equal the float64 result there. Floors of 2^-24 on the divisors put scale 8
    # 10.6 off, and a trained Performer with d_head 36 0.1 off.
    layer, _ = _aligned_keys()
    layer.shift = shift
    x = torch.randn(1, 64, 1, 24, generator=torch.Generator().manual_seed(5)) * scale
    ref = _performer_reference(layer, x, None).float()
    with torch.no_grad():
        out = layer(x, None)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
