"""Practical-Conformer figures of the evaluate stage: the attention state a streaming step reads
(evaluate/state.py), the cascade's first pass evaluated alone (stages/evaluate.py) and their printout."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from edgeconformer.evaluate.state import attention_state_bytes, context_frames
from edgeconformer.models.conformer import ConformerEncoder

REPO = Path(__file__).resolve().parents[1]
IDIM = 20
VOCAB = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(**kwargs):
    args = dict(
        idim=IDIM, d_model=32, n_layers=3, n_heads=2, ff_dim=64, kernel_size=5, dropout=0.0, causal=True, chunk_size=3
    )
    args.update(kwargs)
    return ConformerEncoder(**args).eval()


def streamed_state(enc, seconds, piece=13):
    # Streams `seconds` of random features (100 frames per second) in pieces that do not line up with chunks,
    # the last call with final=True (releases the last partial chunk), and returns the state.
    x = torch.randn(1, round(seconds * 100), IDIM)
    state = enc.stream_init()
    with torch.no_grad():
        for s in range(0, x.size(1), piece):
            _, state = enc.stream(x[:, s : s + piece], state, final=s + piece >= x.size(1))
    return state


# ------------------------------------------------------------------------------------------ attention state
STATE_VARIANTS = [
    dict(conv_only_layers=1),  # softmax, relative positions
    dict(conv_only_layers=1, left_chunks=2),  # limited left context: the caches stop growing
    dict(pos="abs", left_chunks=1, conv_only_layers=1),  # no position table
    dict(attention="performer", conv_only_layers=1, performer_features=16),
    dict(attention="performer", conv_only_layers=1, block_dims=[(32, 2, 64), (48, 4, 96), (24, 2, 48)]),
    dict(
        n_layers=4,
        conv_only_layers=1,
        first_pass_layers=3,
        block_dims=[(32, 2, 64), (48, 2, 96), (48, 2, 96), (32, 2, 64)],
    ),  # a cascade's first pass
]


@pytest.mark.parametrize("variant", STATE_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("seconds", [0.05, 0.3, 1.37])
def test_state_equals_the_bytes_of_a_real_streamed_state(variant, seconds):
    torch.manual_seed(0)
    enc = tiny_encoder(**variant)
    real = ConformerEncoder.stream_state_bytes(streamed_state(enc, seconds))
    counted = attention_state_bytes(enc, seconds)
    assert {k: counted[k] for k in real} == real
    assert counted["encoder_frames"] == int(enc.subsampling.subsample_lengths(round(seconds * 100)))
    assert counted["blocks"] == len(enc.stream_blocks()) and counted["streamable"]
    assert sum(r["attention"] for r in counted["per_block"]) == counted["attention"]
    assert counted["per_block"][0] == {
        "block": 0,
        "kind": "conv_only",
        "attention": 0,
        "positions": 0,
        "conv": 4 * 32 * 4,
    }  # no attention: only (kernel - 1) frames x D x float32


def test_performer_state_is_constant_and_softmax_state_grows_linearly():
    # Formula only, so minutes of audio cost nothing; models on the meta device.
    with torch.device("meta"):
        softmax = tiny_encoder(n_layers=3, conv_only_layers=1)
        performer = tiny_encoder(n_layers=3, conv_only_layers=1, attention="performer", performer_features=16)
    seconds = [1.0, 10.0, 60.0]
    s = [attention_state_bytes(softmax, t) for t in seconds]
    p = [attention_state_bytes(performer, t) for t in seconds]
    # Performer: 2 blocks x H x m x (d_head + 1) x 4 bytes, whatever the context
    assert [x["attention"] for x in p] == [2 * 2 * 16 * (16 + 1) * 4] * 3
    assert all(x["positions"] == 0 for x in p)
    # softmax: K and V of every frame seen, 2 blocks x 2 x T' x D x 4 bytes; positions (T' + chunk - 1) x D x 4
    for x in s:
        T = x["encoder_frames"]
        assert x["attention"] == 2 * 2 * T * 32 * 4
        assert x["positions"] == 2 * (T + 3 - 1) * 32 * 4
    assert s[2]["encoder_frames"] > 50 * s[0]["encoder_frames"] and s[2]["attention"] > 50 * s[0]["attention"]
    assert s[0]["conv"] == p[0]["conv"] == s[2]["conv"] == 3 * 4 * 32 * 4  # every streamed block, constant


def test_documented_baseline_and_practical_states_at_10_seconds():
    # docs/practical.md, benchmarks/bench_practical.py: 10 s, DWS front end, causal, 8-frame chunks.
    with torch.device("meta"):
        baseline = ConformerEncoder(80, 144, 4, 4, 576, 15, 0.1, 4, True, causal=True, chunk_size=8)
        practical = ConformerEncoder(
            80,
            144,
            6,
            4,
            576,
            15,
            0.1,
            4,
            True,
            causal=True,
            chunk_size=8,
            conv_only_layers=2,
            attention="performer",
            block_dims=[(144, 4, 576)] * 2 + [(96, 4, 384)] * 2 + [(144, 4, 576)] * 2,
            first_pass_layers=4,
        )
    b, p = attention_state_bytes(baseline, 10.0), attention_state_bytes(practical, 10.0)
    assert (b["attention"], b["positions"]) == (1_147_392, 589_824)
    assert (p["attention"], p["positions"], p["blocks"]) == (51_200, 0, 4)  # only the first pass streams
    assert [r["kind"] for r in p["per_block"]] == ["conv_only", "conv_only", "performer", "performer"]


def test_offline_models_are_counted_as_if_streamed_frame_by_frame():
    with torch.device("meta"):
        offline = ConformerEncoder(80, 32, 2, 2, 64, 5, 0.0, 4, False)  # centred kernels, no chunks
    r = attention_state_bytes(offline, 2.0)
    T = r["encoder_frames"]
    assert not r["streamable"] and r["chunk_size"] == 1
    assert r["attention"] == 2 * 2 * T * 32 * 4 and r["positions"] == 2 * T * 32 * 4
    json.dumps(r)  # goes into metrics/<variant>.json
    with pytest.raises(ValueError, match="seconds must be > 0"):
        attention_state_bytes(offline, 0.0)


def test_context_frames_with_limited_left_context():
    # 10 frames in chunks of 4 (4, 4, 2), 1 chunk of left context: caches 4 -> 4 -> 4 frames (trimmed after each
    # step), the longest context a step attends to is 4 cached + 4 new.
    assert context_frames(10, 4, 4) == (4, 8)
    assert context_frames(10, 4, -1) == (10, 10)
    assert context_frames(0, 4, -1) == (0, 0)
    assert context_frames(3, 4, 0) == (0, 3)


# ------------------------------------------------------------------------------------------ first pass alone
class WordTokenizer:
    """Token ids -> words; never empty, so every hypothesis can also serve as a reference."""

    def decode(self, ids):
        return " ".join(["U"] + [f"W{i}" for i in ids])


def tiny_module(cascade: bool):
    from edgeconformer.config import compose
    from edgeconformer.models.lightning import ASRModule

    overrides = [
        "model.encoder.d_model=32",
        "model.encoder.n_heads=2",
        "model.encoder.ff_dim=64",
        "model.encoder.kernel_size=5",
        "model.subsampling_channels=8",
        "model.decoder.n_heads=2",
        "model.decoder.ff_dim=64",
        "model.encoder.n_layers=2",
        "model.encoder.conv_only_layers=1",
        "model.encoder.causal=true",
        "model.encoder.chunk_size=4",
    ]
    if cascade:
        overrides += [
            "model.encoder.attention=performer",
            "model.encoder.performer_features=16",
            "model.cascade.enabled=true",
            "model.cascade.n_layers=1",
            "model.cascade.d_model=48",
        ]
    cfg = compose(overrides)
    torch.manual_seed(0)
    module = ASRModule(OmegaConf.to_container(cfg.model, resolve=True), {}, VOCAB).eval()
    module.tokenizer = WordTokenizer()
    return module


def utterances(module, n=3):
    # Random waveforms of 0.5-0.9 s as the evaluate stage holds them: raw log-mels (1, T, F), batch 1.
    from edgeconformer.scoring import EvalUtterance

    gen = torch.Generator().manual_seed(1)
    audios = [0.1 * torch.randn(8000 + 2000 * i, generator=gen) for i in range(n)]
    utts = []
    for i, audio in enumerate(audios):
        feats, _ = module.fbank(audio[None], torch.tensor([audio.numel()]))
        utts.append(EvalUtterance(f"u{i}", "U W1 W2", audio.numel() / 16000, feats))
    return utts, [(a, a.numel() / 16000) for a in audios]


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_first_pass_metrics_of_a_cascade_decode_the_first_pass_alone():
    from edgeconformer.scoring import score
    from edgeconformer.stages.evaluate import first_pass_metrics

    module = tiny_module(cascade=True)
    utts, audio = utterances(module)
    # References: the first pass's own transcript for u0 (0 errors), something else for the others.
    with torch.inference_mode():
        expected = [module.transcribe(a[None], torch.tensor([a.numel()]), first_pass=True)[0] for a, _ in audio]
    utts[0] = type(utts[0])("u0", expected[0], utts[0].seconds, utts[0].feats)
    second_pass_block = count_calls(module.model.encoder.blocks[-1])
    rtf = OmegaConf.create({"warmup": 1, "repeats": 1, "threads": 1})
    m = first_pass_metrics(module, utts, audio, rtf)
    assert second_pass_block == []  # neither the WER nor the timed recogniser ran the second pass
    assert [r["hypothesis"] for r in m["rows"]] == expected  # = ASRModule.transcribe(..., first_pass=True)
    assert m["rows"][0]["errors"] == 0 and [r["id"] for r in m["rows"]] == ["u0", "u1", "u2"]
    assert m["wer_first_pass_fp32"] == score([u.text for u in utts], expected, ["u0", "u1", "u2"])["wer"]
    assert 0 < m["rtf_cpu_first_pass"] < 10
    # the whole model does run its second pass
    with torch.inference_mode():
        module.transcribe(audio[0][0][None], torch.tensor([audio[0][0].numel()]))
    assert second_pass_block == [1]


def test_first_pass_metrics_are_null_without_a_cascade():
    from edgeconformer.stages.evaluate import first_pass_metrics, is_cascade

    module = tiny_module(cascade=False)
    utts, audio = utterances(module, n=1)
    assert not is_cascade(module) and is_cascade(tiny_module(cascade=True))
    assert first_pass_metrics(module, utts, audio, None) == {
        "wer_first_pass_fp32": None,
        "rtf_cpu_first_pass": None,
        "rows": None,
    }


# ------------------------------------------------------------------------------------------ printout
def metrics_fixture(**extra):
    d = json.loads((REPO / "tests" / "fixtures" / "metrics" / "dws.json").read_text())
    return dict(d, split="test", rtf_protocol={"threads": 1}, **extra)


def test_format_metrics_prints_the_practical_figures_and_reads_old_metrics():
    from edgeconformer.stages.evaluate import format_metrics

    state = {"seconds": 10.0, "attention": 51_200, "positions": 0, "conv": 26_880}
    text = format_metrics(
        metrics_fixture(
            gflops_per_audio_second_streamed=0.0799,
            attention_state_bytes=state,
            wer_first_pass_fp32=41.5,
            rtf_cpu_first_pass=0.0123,
        )
    )
    assert "0.080 GFLOPs per audio second streamed" in text
    assert "51,200 B attention (+0 B positions, 26,880 B conv caches) at 10 s" in text
    assert "first pass  WER % fp32 41.50  RTF cpu 0.0123" in text
    old = format_metrics(metrics_fixture())  # written before these keys existed
    assert "n/a GFLOPs per audio second streamed; attention state n/a" in old and "first pass" not in old
    plain = format_metrics(metrics_fixture(wer_first_pass_fp32=None, rtf_cpu_first_pass=None))
    assert "first pass" not in plain  # non-cascaded models: the first-pass figures are null
