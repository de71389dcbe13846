import math

import pytest
import torch

from edgeconformer.evaluate.device import (
    available_profiles,
    count_ops,
    estimate_all,
    estimate_rtf,
    load_profile,
    roofline,
)
from edgeconformer.evaluate.flops import count_flops, count_params
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.models.decoder import TransformerDecoder

VOCAB, D = 50, 64


def tiny(dws=False, device="meta", channels=None):
    # The meta device has shapes but no data: counts come from shapes alone, so estimates cost no compute
    # (test_meta_device_gives_the_same_counts checks they equal those of real tensors).
    torch.manual_seed(0)
    with torch.device(device):
        encoder = ConformerEncoder(80, D, 2, 4, 128, 15, 0.1, 4, dws, subsampling_channels=channels)
        decoder = TransformerDecoder(VOCAB, D, 4, 128, 1)
        return DualDecoderASR(encoder, VOCAB, decoder, ctc_weight=0.3)


def profile(peak=1e12, efficiency=0.5, bandwidth=1e10, precision="fp16"):
    return {
        "name": "test-device",
        "peak_flops": {precision: {"value": peak}},
        "efficiency": {"value": efficiency},
        "memory_bandwidth": {"value": bandwidth},
    }


@pytest.mark.parametrize("shape", [(7, 40), (1, 7, 40)])
def test_single_linear_counts_by_hand(shape):
    lin = torch.nn.Linear(40, 24)
    T, i, o = 7, 40, 24
    for precision, width in (("fp16", 2), ("fp32", 4)):
        (rec,) = count_ops(lin, torch.randn(shape), precision=precision)  # reshapes and transposes move nothing
        assert rec["flops"] == 2 * i * o * T
        # reads bias, input, weight; writes the output
        assert rec["bytes"] == width * (o + T * i + i * o + T * o)
        assert rec["weight_bytes"] == width * (i * o + o)


def test_roofline_of_a_linear_by_hand():
    lin = torch.nn.Linear(40, 24)
    records = count_ops(lin, torch.randn(7, 40))
    flops, moved = 2 * 40 * 24 * 7, 2 * (24 + 280 + 960 + 168)
    memory = roofline(records, peak_flops=1e12, bandwidth=1e9)
    assert memory["seconds"] == pytest.approx(moved / 1e9) and memory["bound"] == "memory"
    compute = roofline(records, peak_flops=1e6, bandwidth=1e9)
    assert compute["seconds"] == pytest.approx(flops / 1e6) and compute["bound"] == "compute"


def test_estimate_agrees_with_the_flop_count_and_parameter_bytes():
    model = tiny()
    seconds = 2.0
    est = estimate_rtf(model, seconds, profile())
    assert est["flops_per_audio_second"] * seconds == count_flops(model, seconds)["total_flops"]
    # Every weight is read once, except the embedding table of which only the looked-up rows are read
    # (3 tokens per second -> 6 rows).
    tokens = 6
    assert est["weight_bytes_per_forward"] == 2 * (count_params(model) - VOCAB * D + tokens * D)
    assert est["activation_bytes_per_forward"] > est["weight_bytes_per_forward"]  # tiny weights, 200 frames
    fp32 = estimate_rtf(model, seconds, profile(precision="fp32"), precision="fp32")
    assert fp32["weight_bytes_per_forward"] == 2 * est["weight_bytes_per_forward"]
    assert fp32["flops_per_audio_second"] == est["flops_per_audio_second"]
    assert est["note"] == "estimate" and est["device"] == "test-device" and est["precision"] == "fp16"
    assert model.training  # restored


def test_roofline_bounds_and_limits():
    model = tiny()
    seconds = 2.0
    est = estimate_rtf(model, seconds, profile())
    # The per-op sum lies between the two single-resource bounds and their sum.
    assert max(est["rtf_compute_only"], est["rtf_memory_only"]) <= est["rtf"] + 1e-15
    assert est["rtf"] <= est["rtf_compute_only"] + est["rtf_memory_only"] + 1e-15
    assert est["rtf_whole_model"] == pytest.approx(max(est["rtf_compute_only"], est["rtf_memory_only"]))
    assert sum(est["rtf_by_part"].values()) == pytest.approx(est["rtf"], rel=1e-9)
    assert est["rtf_compute_only"] == pytest.approx(est["flops_per_audio_second"] / (1e12 * 0.5))
    assert est["rtf_memory_only"] == pytest.approx(est["bytes_per_audio_second"] / 1e10)

    no_memory_limit = estimate_rtf(model, seconds, profile(bandwidth=math.inf))
    assert no_memory_limit["bound"] == "compute"
    assert no_memory_limit["rtf"] == pytest.approx(est["flops_per_audio_second"] / (1e12 * 0.5))
    no_compute_limit = estimate_rtf(model, seconds, profile(peak=math.inf))
    assert no_compute_limit["bound"] == "memory"
    assert no_compute_limit["rtf"] == pytest.approx(est["bytes_per_audio_second"] / 1e10)
    faster = estimate_rtf(model, seconds, profile(bandwidth=2e10, efficiency=1.0))
    assert faster["rtf"] < est["rtf"]


def test_meta_device_gives_the_same_counts():
    real = estimate_rtf(tiny(dws=True, device="cpu"), 1.0, profile())
    meta = estimate_rtf(tiny(dws=True, device="meta"), 1.0, profile())
    for key in ("rtf", "flops_per_audio_second", "bytes_per_audio_second", "weight_bytes_per_forward", "n_ops"):
        assert real[key] == meta[key]


def test_short_forwards_pay_the_weights_more_often():
    # Weights are read once per forward: a 0.5 s streaming chunk moves more bytes per audio second than 4 s.
    model = tiny()
    short, long = (estimate_rtf(model, s, profile()) for s in (0.5, 4.0))
    assert short["weight_bytes_per_forward"] == pytest.approx(long["weight_bytes_per_forward"], rel=0.01)
    weights_per_second = [e["weight_bytes_per_forward"] / e["seconds"] for e in (short, long)]
    assert weights_per_second[0] > 7 * weights_per_second[1]
    assert short["bytes_per_audio_second"] > long["bytes_per_audio_second"]


def test_dws_subsampling_costs_less_on_the_device():
    vanilla = estimate_rtf(tiny(dws=False, device="meta", channels=D), 4.0, "iphone-xr")
    dws = estimate_rtf(tiny(dws=True, device="meta", channels=D), 4.0, "iphone-xr")
    assert dws["rtf_by_part"]["subsampling"] < vanilla["rtf_by_part"]["subsampling"]
    assert dws["rtf_by_part"]["mhsa"] == pytest.approx(vanilla["rtf_by_part"]["mhsa"])


def test_bundled_profiles_document_every_figure():
    names = available_profiles()
    assert {"apple-watch-s7", "iphone-xr", "mac-m1"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p["name"] == name and p["sources"], name
        figures = [p["efficiency"], p["memory_bandwidth"], *p["peak_flops"].values()]
        for fig in figures:
            assert set(fig) >= {"value", "estimate", "basis"}, name
            assert fig["value"] > 0 and isinstance(fig["estimate"], bool) and len(fig["basis"]) > 20
        assert 0 < p["efficiency"]["value"] <= 1
    watch = load_profile("apple-watch-s7")  # Apple publishes no S7 figures: all estimates
    assert all(f["estimate"] for f in (watch["efficiency"], watch["memory_bandwidth"], watch["peak_flops"]["fp16"]))
    for name, published in (("iphone-xr", 5e12), ("mac-m1", 11e12)):  # Apple's published TOPS
        peak = load_profile(name)["peak_flops"]["fp16"]
        assert peak["value"] == published and peak["estimate"] is False


def test_bad_profile_or_precision_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="not found; choose one of"):
        estimate_rtf(model, 1.0, "pixel-9000")
    with pytest.raises(ValueError, match="no fp32 peak"):
        estimate_rtf(model, 1.0, "apple-watch-s7", precision="fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        estimate_rtf(model, 1.0, "apple-watch-s7", precision="int4")
    with pytest.raises(ValueError, match="seconds must be > 0"):
        estimate_rtf(model, 0.0, "apple-watch-s7")


def test_estimate_all_counts_once_and_matches_single_estimates():
    model = tiny()
    both = estimate_all(model, 1.0, ["iphone-xr", "mac-m1"])
    assert list(both) == ["iphone-xr", "mac-m1"]
    for name, est in both.items():
        assert est == estimate_rtf(model, 1.0, name)
    # the faster device (more peak, more bandwidth, same efficiency) is estimated faster
    assert both["mac-m1"]["rtf"] < both["iphone-xr"]["rtf"]
    with pytest.raises(ValueError, match="no fp32 peak"):
        estimate_all(model, 1.0, ["mac-m1"], precision="fp32")
