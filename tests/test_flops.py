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
        print(f"\nConformer-M, 10 s: subsampling share vanilla {vanilla['shares']['subsampling']:.1%} "
              f"({vanilla['gflops_per_audio_second']:.2f} GFLOPs/s), DWS {dws['shares']['subsampling']:.1%} "
              f"({dws['gflops_per_audio_second']:.2f} GFLOPs/s)")
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
