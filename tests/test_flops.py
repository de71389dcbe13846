import pytest
import torch

from edgeconformer.evaluate.flops import AGGREGATES, count_flops, count_params, counted_flops, format_table
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.models.decoder import TransformerDecoder
from edgeconformer.models.subsampling import Conv2dSubsampling

# Gulati et al. 2020 sizes: (d_model, n_layers, n_heads, ff_dim)
CONFORMER = {"S": (144, 16, 4, 576), "M": (256, 16, 4, 1024), "L": (512, 17, 8, 2048)}


def build(d_model, n_layers, n_heads, ff_dim, dws, vocab=256, decoder_layers=0, device="cpu"):
    # Models built on the meta device have shapes but no data: FLOPs are counted from shapes alone,
    # so paper-size models cost nothing to count.
    with torch.device(device):
        encoder = ConformerEncoder(80, d_model, n_layers, n_heads, ff_dim, 31, 0.1, 4, dws)
        decoder = TransformerDecoder(vocab, d_model, n_heads, 4 * d_model, decoder_layers) if decoder_layers else None
        return DualDecoderASR(encoder, vocab, decoder, ctc_weight=0.3 if decoder else 1.0)


def test_linear_flops_are_counted_exactly():
    linear = torch.nn.Linear(40, 24)
    total, per_module = counted_flops(linear, torch.randn(3, 7, 40))
    assert total == 2 * 40 * 24 * 3 * 7
    assert per_module[""] == total


def test_convolution_module_flops_match_formula():
    # Depthwise convolution is counted with its groups: 2 * T * D * k, not 2 * T * D * D * k.
    T, D, k = 50, 32, 15
    enc = ConformerEncoder(80, D, 1, 4, 64, k, 0.0, 4, False).eval()
    _, per_module = counted_flops(enc.blocks[0].conv, torch.randn(1, T, D), torch.zeros(1, T, dtype=torch.bool))
    assert per_module[""] == 2 * T * D * (2 * D) + 2 * T * D * k + 2 * T * D * D


def test_shares_sum_to_one_and_blocks_add_up():
    torch.manual_seed(0)
    model = build(64, 2, 4, 128, dws=False, vocab=50, decoder_layers=2)
    result = count_flops(model, seconds=2.0, tokens_per_second=4.0)
    assert set(result["shares"]) == set(AGGREGATES)
    assert sum(result["shares"].values()) == pytest.approx(1.0, abs=1e-12)
    assert sum(result["flops"].values()) == result["total_flops"]
    assert all(v >= 0 for v in result["flops"].values())
    for part in ("ffn", "mhsa", "conv"):
        blocks = [v for k, v in result["block_flops"].items() if k.endswith("." + part)]
        assert len(blocks) == 2 and sum(blocks) == result["flops"][part]
    assert result["flops"]["attention_decoder"] > 0 and result["decoder_tokens"] == 8
    assert result["encoder_frames"] == 49
    assert result["gflops_per_audio_second"] == pytest.approx(result["total_flops"] / 2e9)
    # the CTC head is one Linear over the encoder frames
    assert result["flops"]["ctc_head"] == 2 * 64 * 50 * 49
    assert model.training  # restored after counting
    table = format_table(result, per_block=True)
    assert "subsampling" in table and "block1.conv" in table and "GFLOPs" in table


def test_meta_device_counts_match_real_tensors():
    torch.manual_seed(0)
    real = count_flops(build(64, 2, 4, 128, dws=True), seconds=3.0)
    meta = count_flops(build(64, 2, 4, 128, dws=True, device="meta"), seconds=3.0)
    assert real["flops"] == meta["flops"]


@pytest.mark.parametrize("d_model", [144, 256, 512])
def test_dws_subsampling_cuts_flops_at_paper_sizes(d_model):
    x = torch.randn(1, 1000, 80, device="meta")
    lengths = torch.tensor([1000], device="meta")
    flops = {}
    for dws in (False, True):
        with torch.device("meta"):
            sub = Conv2dSubsampling(80, d_model, dws=dws)
        flops[dws], _ = counted_flops(sub, x, lengths)
    assert flops[False] >= 4 * flops[True]


def test_conformer_m_subsampling_share(capsys):
    results = {dws: count_flops(build(*CONFORMER["M"], dws=dws, device="meta"), seconds=10.0) for dws in (False, True)}
    vanilla, dws = results[False], results[True]
    with capsys.disabled():
        print(
            f"\nConformer-M, 10 s: subsampling share vanilla {vanilla['shares']['subsampling']:.1%} "
            f"({vanilla['gflops_per_audio_second']:.2f} GFLOPs/s), DWS {dws['shares']['subsampling']:.1%} "
            f"({dws['gflops_per_audio_second']:.2f} GFLOPs/s)"
        )
    assert vanilla["flops"]["subsampling"] >= 4 * dws["flops"]["subsampling"]
    assert vanilla["shares"]["subsampling"] > 0.2  # the reason the paper replaces it
    # everything but the front end is unchanged
    for part in ("ffn", "mhsa", "conv", "ctc_head"):
        assert vanilla["flops"][part] == dws["flops"][part]


def test_count_params():
    linear = torch.nn.Linear(10, 3)
    assert count_params(linear) == 33
    m = build(*CONFORMER["M"], dws=False, device="meta")
    assert 25e6 < count_params(m.encoder) < 35e6  # Conformer-M is ~30 M parameters


def test_dws_cuts_subsampling_flops_4x_at_every_paper_size():
    from omegaconf import OmegaConf

    from edgeconformer.config import compose
    from edgeconformer.evaluate.flops import count_flops
    from edgeconformer.models.lightning import build_model

    for name in ("conformer_s", "conformer_m", "conformer_l", "paper"):
        sub = {}
        for variant in ("vanilla", "dws"):
            cfg = compose([f"model={name}", f"model.subsampling={variant}"])
            with torch.device("meta"):
                model = build_model(OmegaConf.to_container(cfg.model, resolve=True), 256).eval()
            sub[variant] = count_flops(model, 10.0)["flops"]["subsampling"]
        assert sub["vanilla"] >= 4 * sub["dws"], name


# ------------------------------------------------------------------------------------- Practical Conformer parts
VOCAB = 30


def tiny_cascade():
    # First pass: block 0 convolution-only at width 32, blocks 1-2 Performer at 48 (projection 1: 32 -> 48);
    # second pass: block 3 softmax at 32 (projection 3: 48 -> 32, in front of the second pass).
    from edgeconformer.models.cascade import CascadedASR

    enc = ConformerEncoder(
        80,
        32,
        n_layers=4,
        n_heads=2,
        ff_dim=64,
        kernel_size=5,
        dropout=0.0,
        conv_only_layers=1,
        block_dims=[(32, 2, 64), (48, 2, 96), (48, 2, 96), (32, 2, 64)],
        first_pass_layers=3,
        attention="performer",
        performer_features=16,
        causal=True,
        chunk_size=4,
    )
    dec = TransformerDecoder(VOCAB, 32, 2, 64, 1)
    return CascadedASR(enc, VOCAB, dec, ctc_weight=0.5)


class FirstPass(torch.nn.Module):
    # What a cascade streams, as one call: features -> first pass -> first-pass CTC log-probs.
    def __init__(self, asr):
        super().__init__()
        self.asr = asr

    def forward(self, feats, lengths):
        first, _ = self.asr.encode_first_pass(feats, lengths)
        return self.asr.first_pass_log_probs(first)


def test_projections_and_both_ctc_heads_are_counted_in_their_parts():
    torch.manual_seed(0)
    model = tiny_cascade().eval()
    r = count_flops(model, seconds=2.0)
    T = r["encoder_frames"]
    assert set(r["shares"]) == set(AGGREGATES) and sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-12)
    assert r["flops"]["other"] == 0  # every counted op now belongs to a named part
    # two projections, one per width change: (T', 32) @ (32, 48) and (T', 48) @ (48, 32)
    assert r["flops"]["projection"] == 2 * (2 * 32 * 48 * T)
    assert r["block_flops"]["block1.projection"] == r["block_flops"]["block3.projection"] == 2 * 32 * 48 * T
    assert "block2.projection" not in r["block_flops"]
    # ctc_head: the first pass's head (width 48) and the second pass's (width 32)
    assert r["flops"]["ctc_head"] == 2 * 48 * VOCAB * T + 2 * 32 * VOCAB * T
    for part in ("ffn", "mhsa", "conv", "projection"):
        assert sum(v for k, v in r["block_flops"].items() if k.endswith("." + part)) == r["flops"][part]
    table = format_table(r, per_block=True)
    assert "projection" in table and "block1.projection" in table and "streamed part" in table


def test_streamed_flops_of_a_cascade_are_its_first_pass_and_first_pass_head():
    torch.manual_seed(0)
    model = tiny_cascade().eval()
    seconds = 2.0
    r = count_flops(model, seconds=seconds)
    feats, lengths = torch.randn(1, 200, 80), torch.tensor([200])
    first_pass, _ = counted_flops(FirstPass(model), feats, lengths)  # an independent count of the streamed part
    assert r["streamed_flops"] == first_pass
    T = r["encoder_frames"]
    second_pass = r["block_flops"]["block3.projection"] + sum(
        r["block_flops"][f"block3.{p}"] for p in ("ffn", "mhsa", "conv")
    )
    # everything else: the second pass, its CTC head and the attention decoder
    assert r["total_flops"] - r["streamed_flops"] == (
        second_pass + 2 * 32 * VOCAB * T + r["flops"]["attention_decoder"]
    )
    assert r["gflops_per_audio_second_streamed"] == pytest.approx(first_pass / 1e9 / seconds)


@pytest.mark.parametrize("dws", [False, True])
def test_streamed_part_of_a_plain_model_is_everything_but_the_decoder(dws):
    torch.manual_seed(0)
    model = build(64, 2, 4, 128, dws=dws, vocab=50, decoder_layers=1)
    r = count_flops(model, seconds=2.0)
    assert r["streamed_flops"] == r["total_flops"] - r["flops"]["attention_decoder"]
    assert r["flops"]["projection"] == 0 and r["flops"]["other"] == 0  # uniform width: no projections
    assert not any(k.endswith(".projection") for k in r["block_flops"])


def test_practical_first_pass_streams_fewer_flops_than_the_baseline():
    # The documented configurations (docs/practical.md, 10 s, vocabulary 128), on the meta device.
    from edgeconformer.models.cascade import CascadedASR

    with torch.device("meta"):
        base_enc = ConformerEncoder(
            80, 144, 4, 4, 576, 15, 0.1, 4, True, causal=True, chunk_size=8, subsampling_channels=64
        )
        baseline = DualDecoderASR(base_enc, 128, TransformerDecoder(128, 144, 4, 576, 1), ctc_weight=0.5)
        enc = ConformerEncoder(
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
            subsampling_channels=64,
            conv_only_layers=2,
            attention="performer",
            block_dims=[(144, 4, 576)] * 2 + [(96, 4, 384)] * 2 + [(144, 4, 576)] * 2,
            first_pass_layers=4,
        )
        practical = CascadedASR(enc, 128, TransformerDecoder(128, 144, 4, 576, 1), ctc_weight=0.5)
    b, p = count_flops(baseline, 10.0), count_flops(practical, 10.0)
    assert round(b["gflops_per_audio_second_streamed"], 3) == 0.149
    assert round(p["gflops_per_audio_second_streamed"], 3) == 0.080
    assert p["gflops_per_audio_second_streamed"] < 0.6 * p["gflops_per_audio_second"]  # the second pass is not streamed
