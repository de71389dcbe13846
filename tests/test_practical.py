"""Practical Conformer variants (Botros et al. 2023): convolution-only blocks, per-block sizes, FAVOR+ Performer
attention (forms, streaming state, convergence to softmax, fine-tuning from softmax), the cascaded encoder, the
experiment config and the latency benchmark."""

import importlib.util
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from edgeconformer.config import compose
from edgeconformer.errors import ConfigError
from edgeconformer.evaluate.flops import count_flops, count_params
from edgeconformer.models.attention import chunk_attention_mask
from edgeconformer.models.cascade import CascadedASR
from edgeconformer.models.conformer import ConformerBlock, ConformerEncoder, ConvOnlyBlock
from edgeconformer.models.decoder import TransformerDecoder
from edgeconformer.models.lightning import build_model, load_matching_weights
from edgeconformer.models.performer import (
    PerformerAttention,
    causal_linear_attention,
    linear_attention,
    masked_linear_attention,
    orthogonal_gaussian,
    positive_features,
)

IDIM = 20
VOCAB = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(**kwargs):
    args = dict(idim=IDIM, d_model=32, n_layers=3, n_heads=2, ff_dim=64, kernel_size=5, dropout=0.0)
    args.update(kwargs)
    return ConformerEncoder(**args)


def right_edge(t):
    # Last input frame read by subsampled frame t (two 3x3 stride-2 layers).
    return 4 * t + 6


def model_cfg(*overrides):
    cfg = compose(
        [
            "model.encoder.d_model=32",
            "model.encoder.n_heads=2",
            "model.encoder.ff_dim=64",
            "model.encoder.kernel_size=5",
            "model.subsampling_channels=8",
            "model.decoder.n_heads=2",
            "model.decoder.ff_dim=64",
            *overrides,
        ]
    )
    return OmegaConf.to_container(cfg.model, resolve=True)


# ---------------------------------------------------------------- 1. convolution-only blocks


def test_conv_only_block_is_a_conformer_block_without_attention():
    D, F = 32, 64
    full = ConformerBlock(D, 2, F, 5, 0.0)
    conv_only = ConvOnlyBlock(D, F, 5, 0.0)
    assert not hasattr(conv_only, "mhsa") and not hasattr(conv_only, "norm_mhsa")
    # Removed: q/k/v/out (4 (D^2 + D)), linear_pos (D^2), pos_bias_u/v (2 D), norm_mhsa (2 D).
    assert count_params(full) - count_params(conv_only) == 5 * D * D + 8 * D
    enc = tiny_encoder(conv_only_layers=2)
    assert [type(b) for b in enc.blocks] == [ConvOnlyBlock, ConvOnlyBlock, ConformerBlock]
    with pytest.raises(ValueError, match="conv_only_layers"):
        tiny_encoder(conv_only_layers=4)


PADDING_VARIANTS = [
    dict(conv_only_layers=2),
    dict(conv_only_layers=3, causal=True),
    dict(conv_only_layers=1, attention="performer"),
    dict(conv_only_layers=1, attention="performer", causal=True, chunk_size=4),
    dict(attention="performer", causal=True, chunk_size=3, left_chunks=1, pos="abs"),
    dict(conv_only_layers=1, block_dims=[(32, 2, 64), (48, 4, 96), (24, 2, 48)]),
    dict(conv_only_layers=1, attention="performer", causal=True, chunk_size=4, first_pass_layers=2),
]


@pytest.mark.parametrize("variant", PADDING_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_encoder_output_independent_of_batch_padding(variant):
    torch.manual_seed(0)
    enc = tiny_encoder(**variant).eval()
    lengths = [61, 140, 97]
    feats = [torch.randn(n, IDIM) for n in lengths]
    batch = 10 * torch.randn(len(lengths), max(lengths), IDIM)  # padding is garbage, not zeros
    for i, f in enumerate(feats):
        batch[i, : len(f)] = f
    with torch.no_grad():
        first, out, out_lengths = enc.forward_passes(batch, torch.tensor(lengths))
        for i, f in enumerate(feats):
            first_alone, alone, n = enc.forward_passes(f[None], torch.tensor([len(f)]))
            assert int(n) == int(out_lengths[i]) == alone.size(1)
            torch.testing.assert_close(out[i, : int(n)], alone[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(first[i, : int(n)], first_alone[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- 2. per-block sizes


def test_stages_build_downsized_blocks_with_projections_and_counted_flops():
    m = model_cfg("model.encoder.n_layers=3", "model.encoder.stages=[{n_layers:1},{n_layers:2,d_model:24,ff_dim:40}]")
    model = build_model(m, VOCAB).eval()
    enc = model.encoder
    assert [b.ffn1.up.in_features for b in enc.blocks] == [32, 24, 24]
    assert [b.ffn1.up.out_features for b in enc.blocks] == [64, 40, 40]
    assert list(enc.projections) == ["1"] and enc.projections["1"].weight.shape == (24, 32)
    assert enc.d_model == 24 and model.ctc.in_features == 24 and model.decoder.embed.embedding_dim == 24

    uniform = build_model(model_cfg("model.encoder.n_layers=3"), VOCAB)

    # Per-block parameter difference, closed form: FFN 2 x (2 D F + F + D), conv module, norms, attention.
    def block_params(D, F, H=2, k=5):
        ffn = 2 * (2 * D + 2 * D * F + F + D)  # two FeedForward: LayerNorm + up + down
        conv = 2 * D + (2 * D * D + 2 * D) + (D * k + D) + 2 * D + (D * D + D)
        mhsa = 2 * D + 4 * (D * D + D) + D * D + 2 * D
        return ffn + conv + mhsa + 2 * D

    assert count_params(enc.blocks[1]) == block_params(24, 40)
    assert count_params(uniform.encoder.blocks[1]) == block_params(32, 64)

    r = count_flops(model, 4.0, idim=80)
    T = r["encoder_frames"]
    for i, (D, F) in enumerate([(32, 64), (24, 40), (24, 40)]):
        assert r["block_flops"][f"block{i}.ffn"] == 8 * D * F * T  # 2 FFNs x (up + down) x 2 FLOPs per MAC
    assert r["flops"]["projection"] == 2 * 32 * 24 * T  # the one 32 -> 24 projection, counted as its own part
    assert r["flops"]["other"] == 0
    assert r["total_flops"] < count_flops(uniform, 4.0, idim=80)["total_flops"]


def test_stage_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="cover 2 blocks but model.encoder.n_layers=4"):
        build_model(model_cfg("model.encoder.stages=[{n_layers:2}]"), VOCAB)
    with pytest.raises(ConfigError, match=r"stages\[0\] has unknown keys \['width'\]"):
        build_model(model_cfg("model.encoder.stages=[{n_layers:4,width:3}]"), VOCAB)
    with pytest.raises(ConfigError, match="model.encoder.attention='linear'"):
        build_model(model_cfg("model.encoder.attention=linear"), VOCAB)


# ---------------------------------------------------------------- 3. Performer (FAVOR+)


def random_qkv(B=2, H=2, T=37, d=8, m=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    w = orthogonal_gaussian(m, d, seed)
    s = d**-0.25
    return positive_features(q * s, w, True), positive_features(k * s, w, False), v


@pytest.mark.parametrize("chunk", [1, 4])
def test_performer_causal_forms_agree(chunk):
    qf, kf, v = random_qkv()
    T = qf.size(2)
    mask = chunk_attention_mask(T, chunk)[None].expand(2, T, T)
    parallel = masked_linear_attention(qf, kf, v, mask)
    prefix = causal_linear_attention(qf, kf, v, chunk)
    torch.testing.assert_close(prefix, parallel, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    attn = PerformerAttention(16, 2, n_features=32, seed=3).eval()
    x = torch.randn(2, T, 16)
    with torch.no_grad():
        full = attn(x, x, x, mask)
        state, steps = attn.init_state(2), []
        for s in range(0, T, chunk):
            out, state = attn.step(x[:, s : s + chunk], state)
            steps.append(out)
        chunked = attn(x, x, x, mask, chunk_size=chunk)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    assert state[0].shape == (2, 2, 32, 8) and state[1].shape == (2, 2, 32)  # constant size: (S, z)
    assert attn.state_bytes(2) == 4 * (state[0].numel() + state[1].numel())


def test_performer_causal_output_ignores_future_frames():
    torch.manual_seed(0)
    attn = PerformerAttention(16, 2, n_features=32).eval()
    x = torch.randn(1, 30, 16)
    y = x.clone()
    y[:, 20:] += 5 * torch.randn(1, 10, 16)
    causal = torch.ones(30, 30, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        a = attn(x, x, x, causal, chunk_size=1)
        b = attn(y, y, y, causal, chunk_size=1)
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.allclose(a[:, 20:], b[:, 20:])


def test_performer_padding_keys_are_excluded():
    torch.manual_seed(0)
    attn = PerformerAttention(16, 2, n_features=16).eval()
    x = torch.randn(1, 20, 16)
    padded = torch.cat([x, 100 * torch.randn(1, 7, 16)], dim=1)
    valid = torch.arange(27)[None] < 20
    with torch.no_grad():
        alone = attn(x, x, x, torch.ones(1, 1, 20, dtype=torch.bool))
        batch = attn(padded, padded, padded, valid[:, None])
        chunked = attn(padded, padded, padded, valid[:, None] & chunk_attention_mask(27, 20), chunk_size=20)
    torch.testing.assert_close(batch[:, :20], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[:, :20], alone, atol=1e-5, rtol=0)


# Relative error of FAVOR+ against exact softmax attention, mean over 8 feature draws (T=128, d=32, 4 heads,
# q, k ~ N(0, 0.5^2)): measured 0.80, 0.44, 0.25, 0.15 (docs/practical.md); the estimator's error falls as 1/sqrt(m).
FEATURES = (16, 64, 256, 1024)


def test_performer_converges_to_softmax_attention():
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 1, 4, 128, 32
    q, k = (0.5 * torch.randn(B, H, T, d, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, d, generator=g)
    exact = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v
    s = d**-0.25
    errors = []
    for m in FEATURES:
        e = []
        for seed in range(8):
            w = orthogonal_gaussian(m, d, seed)
            out = linear_attention(
                positive_features(q * s, w, True),
                positive_features(k * s, w, False),
                v,
                torch.ones(B, T, dtype=torch.bool),
            )
            e.append(float((out - exact).norm() / exact.norm()))
        errors.append(sum(e) / len(e))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.2 and errors[0] / errors[-1] > 4, errors  # 64x the features: ~8x less error


def test_features_are_orthogonal_redrawable_and_saved():
    w = orthogonal_gaussian(20, 8, seed=1)
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.equal(w, orthogonal_gaussian(20, 8, seed=1)) and not torch.equal(w, orthogonal_gaussian(20, 8, 2))
    attn = PerformerAttention(16, 2, n_features=20, seed=1)
    assert torch.equal(attn.features, orthogonal_gaussian(20, 8, seed=1))
    attn.redraw_features(5)
    assert torch.equal(attn.features, orthogonal_gaussian(20, 8, seed=5))
    assert "features" in attn.state_dict()  # inference must use the features the model was trained with


def test_performer_flops_are_attention_flops_and_linear_in_length():
    def mhsa_flops(attention, seconds):
        model = build_model(
            model_cfg(
                "model.encoder.n_layers=1",
                f"model.encoder.attention={attention}",
                "model.encoder.causal=true",
                "model.encoder.chunk_size=4",
                "model.ctc_weight=1.0",
            ),
            VOCAB,
        )
        r = count_flops(model, seconds, idim=80)
        assert r["flops"]["other"] == 0  # every counted op is claimed by a part
        return r["flops"]["mhsa"]

    performer = mhsa_flops("performer", 8.0) / mhsa_flops("performer", 4.0)
    softmax = mhsa_flops("softmax", 8.0) / mhsa_flops("softmax", 4.0)
    assert 1.95 < performer < 2.05 and softmax > 2.5  # 199 vs 99 encoder frames: linear vs quadratic


def stream(enc, x, piece):
    state, outs = enc.stream_init(), []
    with torch.no_grad():
        for s in range(0, x.size(1), piece):
            out, state = enc.stream(x[:, s : s + piece], state, final=s + piece >= x.size(1))
            outs.append(out)
    return torch.cat(outs, 1), state


STREAM_VARIANTS = [
    dict(),
    dict(pos="abs", left_chunks=1),
    dict(attention="performer", conv_only_layers=1),
    dict(attention="performer", block_dims=[(32, 2, 64), (48, 4, 96), (24, 2, 48)], conv_only_layers=1),
    dict(attention="performer", first_pass_layers=2),
]


@pytest.mark.parametrize("variant", STREAM_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_streaming_equals_the_chunk_masked_forward(variant):
    torch.manual_seed(0)
    enc = tiny_encoder(causal=True, chunk_size=3, **variant).eval()
    x = torch.randn(1, 157, IDIM)
    with torch.no_grad():
        first, _, _ = enc.forward_passes(x, torch.tensor([157]))
    out, _ = stream(enc, x, 13)  # pieces that do not line up with chunks
    assert out.shape == first.shape
    torch.testing.assert_close(out, first, atol=1e-5, rtol=0)


def test_attention_state_grows_for_softmax_and_is_constant_for_performer():
    torch.manual_seed(0)
    sizes = {}
    for attention in ("softmax", "performer"):
        enc = tiny_encoder(causal=True, chunk_size=4, attention=attention, performer_features=16).eval()
        sizes[attention] = [
            ConformerEncoder.stream_state_bytes(stream(enc, torch.randn(1, T, IDIM), 32)[1]) for T in (63, 123)
        ]
    for T, s in zip((63, 123), sizes["softmax"]):
        frames = (T - 3) // 4  # encoder frames seen (all chunks cached: left_chunks=-1)
        assert s["attention"] == 3 * 2 * frames * 32 * 4  # 3 blocks x (K, V) x frames x D x float32
        assert s["positions"] == 3 * (frames + 4 - 1) * 32 * 4  # positions frames-1 .. -(chunk-1), projected
    p = sizes["performer"]
    assert p[0]["attention"] == p[1]["attention"] == 3 * 4 * 2 * 16 * (16 + 1)  # blocks x H x m x (d + 1)
    assert p[0]["positions"] == p[1]["positions"] == 0
    assert p[0]["conv"] == p[1]["conv"] == sizes["softmax"][0]["conv"] == 3 * 32 * 4 * 4  # (kernel - 1) frames


def test_streaming_needs_causal_convolutions_and_chunks():
    with pytest.raises(ValueError, match="eval"):
        tiny_encoder(causal=True, chunk_size=4).stream_init()
    with pytest.raises(ValueError, match="causal=True"):
        tiny_encoder(chunk_size=4).eval().stream_init()
    with pytest.raises(ValueError, match="chunk_size > 0"):
        tiny_encoder(causal=True).eval().stream_init()
    with pytest.raises(ValueError, match="left_chunks=-1"):
        tiny_encoder(causal=True, chunk_size=4, left_chunks=2, attention="performer").eval().stream_init()


def test_init_from_softmax_checkpoint_into_performer(tmp_path):
    import lightning as L

    from edgeconformer.models.lightning import ASRModule

    softmax = model_cfg("model.encoder.n_layers=2", "model.encoder.conv_only_layers=1")
    optim = OmegaConf.to_container(compose([]).train, resolve=True)
    torch.manual_seed(0)
    source = ASRModule(softmax, optim, VOCAB)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "softmax.ckpt")

    performer = {**softmax, "encoder": {**softmax["encoder"], "attention": "performer"}}
    torch.manual_seed(1)
    target = ASRModule(performer, {**optim, "init_from": str(tmp_path / "softmax.ckpt")}, VOCAB)
    target.trainer = L.Trainer(
        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    before = {k: v.clone() for k, v in target.state_dict().items()}
    target.setup("fit")

    report = json.loads((tmp_path / "init_from.json").read_text())
    assert report == target.init_report
    a = "model.encoder.blocks.1.mhsa."
    assert report["unexpected"] == [a + "linear_pos.weight", a + "pos_bias_u", a + "pos_bias_v"]
    assert report["missing"] == [a + "features"] and report["shape_mismatch"] == []
    assert report["loaded"] == report["total"] - 2  # all but the features and the skipped-batch counter
    src, now = source.state_dict(), target.state_dict()
    for k in now:
        if k == a + "features":
            torch.testing.assert_close(now[k], before[k])  # the Performer keeps its own draw
        elif k != "skipped_batches":
            assert torch.equal(now[k], src[k]), k
    assert not torch.equal(before[a + "query.weight"], src[a + "query.weight"])  # the init really changed

    with pytest.raises(Exception, match="no checkpoint there"):
        load_matching_weights(target, tmp_path / "missing.ckpt")


# ---------------------------------------------------------------- 4. cascaded encoder


def tiny_cascade(first_pass_weight=0.5, attention="performer"):
    enc = tiny_encoder(
        n_layers=4,
        conv_only_layers=1,
        attention=attention,
        causal=True,
        chunk_size=4,
        first_pass_layers=2,
        block_dims=[(32, 2, 64), (32, 2, 64), (48, 2, 96), (48, 2, 96)],
    )
    dec = TransformerDecoder(VOCAB, d_model=48, n_heads=2, ff_dim=64, n_layers=1, dropout=0.0)
    return CascadedASR(enc, VOCAB, dec, ctc_weight=0.5, first_pass_weight=first_pass_weight)


def test_cascade_structure_and_config():
    model = build_model(
        model_cfg(
            "model.cascade.enabled=true",
            "model.cascade.n_layers=1",
            "model.cascade.d_model=48",
            "model.encoder.causal=true",
            "model.encoder.chunk_size=4",
        ),
        VOCAB,
    )
    enc = model.encoder
    assert isinstance(model, CascadedASR) and enc.first_pass_layers == 4 and len(enc.blocks) == 5
    assert [b.conv.causal for b in enc.blocks] == [True] * 4 + [False]
    assert model.ctc_first.in_features == 32 and model.ctc.in_features == 48 and list(enc.projections) == ["4"]
    with pytest.raises(ConfigError, match="model.cascade.n_layers"):
        build_model(model_cfg("model.cascade.enabled=true", "model.cascade.n_layers=0"), VOCAB)


def test_cascade_first_pass_is_causal_and_second_pass_is_not():
    torch.manual_seed(0)
    model = tiny_cascade().eval()
    chunk, T, p = 4, 160, 90
    x = torch.randn(1, T, IDIM)
    y = x.clone()
    y[:, p:] += torch.randn(1, T - p, IDIM)
    first_touched = next(t for t in range(T) if right_edge(t) >= p)
    safe = (first_touched // chunk) * chunk  # frames of earlier chunks cannot see frame p
    with torch.no_grad():
        a1, a2, _ = model.encoder.forward_passes(x, torch.tensor([T]))
        b1, b2, _ = model.encoder.forward_passes(y, torch.tensor([T]))
        alone, _ = model.encode_first_pass(x, torch.tensor([T]))
    assert safe > 2 * chunk
    torch.testing.assert_close(b1[:, :safe], a1[:, :safe], atol=1e-5, rtol=0)
    assert not torch.allclose(b1[:, safe : safe + chunk], a1[:, safe : safe + chunk], atol=1e-4)
    assert not torch.allclose(b2[:, :safe], a2[:, :safe], atol=1e-4)  # the second pass sees the future
    torch.testing.assert_close(alone, a1, atol=0, rtol=0)


def test_cascade_trains_and_both_losses_decrease():
    torch.manual_seed(0)
    model = tiny_cascade()
    lengths = torch.tensor([120, 100, 90])
    feats = torch.randn(3, 120, IDIM)
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, 9, -1], [10, 11, -1, -1]])
    token_lengths = torch.tensor([4, 3, 2])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        out = model(feats, lengths, tokens, token_lengths)
        w = model.first_pass_weight
        torch.testing.assert_close(out["loss"], w * out["loss_first_pass"] + (1 - w) * out["loss_second_pass"])
        history.append({k: out[k].item() for k in ("loss", "loss_first_pass", "loss_second_pass")})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for k in history[0]:
        assert history[-1][k] < 0.5 * history[0][k], (k, history[0][k], history[-1][k])


TINY_PRACTICAL = [
    "model.encoder.d_model=32",
    "model.encoder.n_heads=2",
    "model.encoder.ff_dim=64",
    "model.encoder.kernel_size=5",
    "model.subsampling_channels=8",
    "model.encoder.chunk_size=4",
    "model.encoder.stages=[{n_layers:2},{n_layers:2,d_model:24,ff_dim:48}]",
    "model.encoder.performer_features=16",
    "model.cascade.n_layers=1",
    "model.cascade.d_model=32",
    "model.cascade.n_heads=2",
    "model.cascade.ff_dim=64",
    "model.decoder.n_heads=2",
    "model.decoder.ff_dim=64",
    "data.tokenizer.vocab_size=24",
    "train.max_batch_seconds=4",
    "train.warmup_steps=2",
    "train.max_epochs=1",
    "train.average_last=1",
    "logger=csv",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.num_threads=1",
]
TEXTS = [
    "SING UNTO THE LORD",
    "ALL THE EARTH",
    "AND GOD SAID",
    "LET THERE BE LIGHT",
    "IN THE BEGINNING",
    "THE WORD WAS WITH GOD",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Manifests of tone+noise clips (no synthesis: seconds, not minutes) and a tokenizer trained on them."""
    from conftest import write_flac
    from edgeconformer.data.prepare import tokenize
    from edgeconformer.files import write_jsonl_atomic

    root = tmp_path_factory.mktemp("practical")
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        rows = [
            {
                "id": f"{split}-{i}",
                "audio_filepath": str(write_flac(root / split / f"{i}.flac", 1.0, seed=i)),
                "duration": 1.0,
                "text": TEXTS[i],
            }
            for i in range(n)
        ]
        write_jsonl_atomic(root / "prepared" / "manifests" / f"{split}.jsonl", rows)
    tokenize(compose([f"data.out_dir={root / 'prepared'}", "data.tokenizer.vocab_size=24"]))
    return root


@pytest.mark.slow
def test_train_cascade_reports_both_passes_and_fine_tunes_into_the_performer(tiny_data, tmp_path, capsys):
    from edgeconformer.stages.train import train

    base = ["+experiment=practical", f"data.out_dir={tiny_data / 'prepared'}", *TINY_PRACTICAL]
    softmax = tmp_path / "softmax"
    metrics = train(
        compose(
            [
                *base,
                "model.encoder.attention=softmax",
                f"out_dir={softmax}",
                "train.test_methods=[ctc_greedy,attention]",
            ]
        )
    )
    assert json.loads((softmax / "train_metrics.json").read_text()) == metrics
    assert "test_wer_first_pass_attention" not in metrics  # the first pass has only a CTC head
    for key in ("test_wer_ctc_greedy", "test_wer_attention", "test_wer_first_pass_ctc_greedy"):
        assert metrics[key] >= 0, key
    header = (softmax / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/wer", "val/wer_first_pass", "val/loss_first_pass", "train/loss_first_pass_step"} <= set(header)

    performer = tmp_path / "performer"
    train(compose([*base, f"train.init_from={softmax}", f"out_dir={performer}", "train.test_after_fit=false"]))
    report = json.loads((performer / "init_from.json").read_text())
    assert report["path"] == str(softmax / "best.ckpt") and report["shape_mismatch"] == []
    blocks = ("model.encoder.blocks.2.mhsa.", "model.encoder.blocks.3.mhsa.")  # the first pass's attention blocks
    assert report["missing"] == [b + "features" for b in blocks]
    assert report["unexpected"] == [b + k for b in blocks for k in ("linear_pos.weight", "pos_bias_u", "pos_bias_v")]

    # the command line decodes the first pass alone: the same text as ASRModule.transcribe(first_pass=True)
    from edgeconformer.cli import load_trained, main, read_any_audio

    audio = str(tiny_data / "test" / "0.flac")
    capsys.readouterr()
    assert main(["transcribe", audio, "--model", str(softmax), "--first-pass"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\t")
    module = load_trained(softmax)
    x = read_any_audio(audio)
    assert printed == [audio, module.transcribe(x[None], torch.tensor([x.numel()]), first_pass=True)[0]]
    assert main(["transcribe", audio, "--model", str(softmax), "--first-pass", "--method", "joint"]) == 1
    assert "--method must be one of ctc_greedy, ctc_beam" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. experiment config and benchmark


def test_practical_experiment_composes_into_the_documented_model():
    cfg = compose(["+experiment=practical"])
    assert cfg.out_dir == "models/practical" and cfg.train.init_from is None
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), 128)
    enc = model.encoder
    kinds = [(type(b).__name__, b.ffn1.up.in_features, type(getattr(b, "mhsa", None)).__name__) for b in enc.blocks]
    assert (
        kinds
        == [("ConvOnlyBlock", 144, "NoneType")] * 2
        + [("ConformerBlock", 96, "PerformerAttention")] * 2
        + [("ConformerBlock", 144, "RelPositionMultiHeadAttention")] * 2
    )
    assert isinstance(model, CascadedASR) and enc.chunk_size == 8 and enc.first_pass_layers == 4


def test_default_config_builds_todays_model():
    m = model_cfg()
    for key in ("conv_only_layers", "stages", "attention", "performer_features", "performer_seed"):
        del m["encoder"][key]
    del m["cascade"]
    torch.manual_seed(0)
    old_keys = build_model(m, VOCAB).state_dict()
    torch.manual_seed(0)
    new_keys = build_model(model_cfg(), VOCAB).state_dict()
    assert list(old_keys) == list(new_keys) and all(torch.equal(old_keys[k], new_keys[k]) for k in old_keys)
    assert not any("projections" in k or "features" in k or "ctc_first" in k for k in new_keys)


def test_bench_practical_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_practical", REPO / "benchmarks" / "bench_practical.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--quick", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert printed[2].split()[:2] == ["model", "params"] and printed[5].startswith("baseline/practical:")
    r = report["result"]
    assert report["quick"] and report["threads"] == 1 and r["config"]["calls"] == 7  # 200 frames / 32 per call
    for name in ("baseline", "practical"):
        m = r["models"][name]
        for key in (
            "stream_call_ms",
            "stream_rtf",
            "full_rtf",
            "gflops_per_audio_second",
            "first_pass_gflops_per_audio_second",
        ):
            assert math.isfinite(m[key]) and m[key] > 0, (name, key)
        assert len(m["stream_call_ms_all"]) == 1 and len(m["stream_call_ms_all"][0]) == 7
    base, prac = r["models"]["baseline"], r["models"]["practical"]
    # softmax caches grow with the context (1 s -> 2 s: 24 -> 49 encoder frames); Performer states do not
    assert base["attention_state_bytes"] == {"1": 2 * 2 * 24 * 32 * 4, "2": 2 * 2 * 49 * 32 * 4}
    assert prac["attention_state_bytes"]["1"] == prac["attention_state_bytes"]["2"] == 2 * 16 * (12 + 1) * 4
    assert base["position_state_bytes"] == {"1": 2 * (24 + 7) * 32 * 4, "2": 2 * (49 + 7) * 32 * 4}
    assert prac["position_state_bytes"] == {"1": 0, "2": 0}  # Performer blocks use no relative positions
    assert set(r["ratios"]) >= {"stream_call_latency", "stream_rtf", "full_utterance_latency", "attention_state"}
    assert all(v > 0 for v in r["ratios"].values())
