from pathlib import Path

import pytest
import torch

from edgeconformer.artifacts import resolve_model_dir
from edgeconformer.data.features import GlobalCMVN
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.scoring import greedy_text
from edgeconformer.stabilize.ane import ANEConformer
from edgeconformer.stabilize.audit import audit
from edgeconformer.stabilize.precision import precision_model
from edgeconformer.stabilize.stress import safe_gain, scale_activations

REPO = Path(__file__).resolve().parents[1]
GAIN = 512.0


def tiny_asr(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(
        idim=20, d_model=32, n_layers=2, n_heads=2, ff_dim=64, kernel_size=7, dropout=0.0, subsampling_channels=8
    )
    args.update(kw)
    return DualDecoderASR(ConformerEncoder(**args), 12, None, ctc_weight=1.0).eval()


def tiny_cmvn(seed=0):
    g = torch.Generator().manual_seed(seed)
    return GlobalCMVN(20, torch.randn(20, generator=g), torch.rand(20, generator=g) + 0.5)


def block_io(asr, feats):
    # inputs and outputs of every encoder block, and the encoder's outputs (both passes of a cascade)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for b in asr.encoder.blocks]
    with torch.no_grad():
        first, final, _ = asr.encoder.forward_passes(feats, torch.tensor([feats.size(1)]))
    for h in hooks:
        h.remove()
    return seen, first, final


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_residual_stream_is_gain_times_larger_and_outputs_unchanged():
    asr = tiny_asr()
    before = {k: v.clone() for k, v in asr.state_dict().items()}
    scaled = scale_activations(asr, GAIN)
    assert all(torch.equal(v, asr.state_dict()[k]) for k, v in before.items())  # the original is untouched
    feats = torch.randn(1, 60, 20)
    (orig, _, out), (big, _, out_big) = block_io(asr, feats), block_io(scaled, feats)
    for i, ((x, y), (xs, ys)) in enumerate(zip(orig, big)):
        assert rel_err(xs, GAIN * x) < 1e-5, f"block {i} input"
        expected = y if i == len(orig) - 1 else GAIN * y
        assert rel_err(ys, expected) < 1e-5, f"block {i} output"
    # LN(g x; eps) = LN(x; eps / g^2): only eps differs; measured 2e-6 on this model
    assert (out_big - out).abs().max() < 1e-4
    assert torch.equal(scaled.ctc.weight, asr.ctc.weight)


@pytest.mark.parametrize(
    "kw",
    [
        dict(conv_only_layers=1),  # a block without self-attention
        dict(n_layers=3, block_dims=[(32, 2, 64), (48, 2, 96), (48, 2, 96)]),  # a width projection in front of block 1
        dict(n_layers=3, first_pass_layers=1, block_dims=[(32, 2, 64), (32, 2, 64), (48, 2, 96)]),  # cascade
        dict(n_layers=3, first_pass_layers=2),  # cascade without projection: the second pass stays unscaled
    ],
)
def test_practical_encoders_keep_their_outputs(kw):
    asr = tiny_asr(1, **kw)
    feats = torch.randn(1, 60, 20)
    (orig, first, out), (big, first_big, out_big) = block_io(asr, feats), block_io(scale_activations(asr, GAIN), feats)
    assert (first_big - first).abs().max() < 1e-4 and (out_big - out).abs().max() < 1e-4
    assert rel_err(big[0][0], GAIN * orig[0][0]) < 1e-5  # block 0 runs g times larger
    cascade = kw.get("first_pass_layers", 0)
    if cascade and "block_dims" not in kw:  # the second pass reads the unscaled first-pass output
        assert rel_err(big[cascade][0], orig[cascade][0]) < 1e-5


def test_bad_input_is_refused():
    asr = tiny_asr()
    for gain in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="gain"):
            scale_activations(asr, gain)
    with pytest.raises(ValueError, match="relative positional encoding"):
        scale_activations(tiny_asr(pos="abs"), GAIN)

    class Module:  # an ASRModule-like wrapper
        model = asr

    with pytest.raises(ValueError, match="module.model"):
        scale_activations(Module(), GAIN)


def test_safe_gain():
    def report(headroom):
        return {"summary": {"worst_activation": {"headroom_bits": headroom}}}

    assert safe_gain(report(9.04)) == 256.0  # the trained DWS model: peak 125 -> 2^floor(9.04 - 1)
    assert safe_gain(report(12.5)) == 512.0 and safe_gain(report(12.5), max_gain=1e9) == 2048.0
    with pytest.raises(ValueError, match="headroom"):
        safe_gain(report(0.5))


def test_stress_breaks_unstabilized_fp16_and_not_stabilized():
    asr, cmvn = tiny_asr(2), tiny_cmvn(2)
    scaled = scale_activations(asr, GAIN)
    feats = [torch.randn(1, T, 20) * 3 for T in (50, 90)]
    ref = precision_model(asr, "fp32", cmvn)
    stressed = {mode: precision_model(scaled, mode, cmvn) for mode in ("fp32", "fp16_unstabilized", "fp16")}
    err = {
        mode: max(float((pm(f) - ref(f)).abs().nan_to_num(1e9).max()) for f in feats) for mode, pm in stressed.items()
    }
    # measured: fp32 7e-6 (eps), stabilized 0.003 (FP16 rounding, as without stress), unstabilized 1.3
    assert err["fp32"] < 1e-4
    assert err["fp16"] < 0.02
    assert err["fp16_unstabilized"] > 0.5
    # the audit of the stressed FP32 graph names the cause: LayerNorm sums of squares past 65504, none once
    # pre-normalized
    x = feats[0]
    plain = audit(ANEConformer.from_asr(scaled, cmvn, prenorm="none"), [x])["summary"]
    mad = audit(ANEConformer.from_asr(scaled, cmvn, prenorm="mad", softmax="lut"), [x])["summary"]
    assert plain["layernorm_rows_over"] > 0 and plain["worst_layernorm_sumsq"]["headroom_bits"] < 0
    assert mad["layernorm_rows_over"] == 0 and mad["worst_layernorm_sumsq"]["headroom_bits"] > 0


TRAINED = [resolve_model_dir(REPO / "models/dws") / "best.ckpt", REPO / "data/prepared/manifests/test.jsonl"]


@pytest.mark.skipif(
    not all(p.exists() for p in TRAINED),
    reason="needs a trained checkpoint models/dws/s<seed>/best.ckpt and the prepared test split "
    "data/prepared/manifests/test.jsonl (dvc repro train@dws)",
)
def test_trained_model_under_stress():
    from edgeconformer.cli import load_trained
    from edgeconformer.data.dataset import load_audio
    from edgeconformer.files import read_jsonl

    module = load_trained(REPO / "models/dws")
    asr, cmvn, tok = module.model, module.cmvn, module.tokenizer
    utts = []
    for r in read_jsonl(TRAINED[1])[:3]:
        audio = load_audio(r["audio_filepath"])
        feats, _ = module.fbank(audio[None], torch.tensor([audio.numel()]))
        utts.append({"id": r["id"], "feats": feats})
    # the gain: at most 512, and one bit of headroom left for the residual stream (256 for the shipped model,
    # whose residual stream peaks at 125: 512 x 125 is within 3% of 65504)
    fp32 = precision_model(asr, "fp32", cmvn)
    report = audit(fp32.module, [(cmvn(u["feats"], torch.tensor([u["feats"].size(1)])), None) for u in utts])
    gain = safe_gain(report)
    assert gain >= 64
    scaled = scale_activations(asr, gain)
    modes = {m: precision_model(scaled, m, cmvn) for m in ("fp32", "fp16_unstabilized", "fp16")}
    ref = {id(u["feats"]): fp32(u["feats"]) for u in utts}
    out = {m: {k: pm(u["feats"]) for k, u in zip(ref, utts)} for m, pm in modes.items()}
    err = {m: max(float((o[k] - ref[k]).abs().nan_to_num(1e9).max()) for k in ref) for m, o in out.items()}
    assert err["fp32"] < 1e-3  # measured 9e-5: LayerNorm's eps
    assert err["fp16"] < 0.1  # measured 0.039 at every gain (FP16 rounding and the LUT softmax)

    def hypotheses(log_probs):  # CTC greedy on the log-probs computed above, one utterance at a time
        return [greedy_text(log_probs[id(u["feats"])][0], tok) for u in utts]

    ref_hyps = hypotheses(ref)
    assert hypotheses(out["fp32"]) == ref_hyps and hypotheses(out["fp16"]) == ref_hyps
    # unstabilized: every LayerNorm whose y^2 overflows returns its bias; the transcripts collapse
    collapsed = hypotheses(out["fp16_unstabilized"])
    assert all(h != r for h, r in zip(collapsed, ref_hyps)), collapsed
