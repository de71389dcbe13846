"""models/dropout.py: the cheaper CPU dropout keeps each element with probability 1 - p, preserves the mean,
is reproducible from the seed, differentiates as a mask, and the attention path built on it equals torch's
scaled_dot_product_attention when nothing is dropped."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgeconformer.models.attention import attention_with_dropout
from edgeconformer.models.dropout import LEVELS, Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    n = 1_000_001  # not a multiple of 4: the last int64 draw is used for one element only
    keep, scale = keep_mask(torch.Size([n]), p)
    p_eff = round(p * LEVELS) / LEVELS
    assert abs(p_eff - p) <= 0.5 / LEVELS
    assert scale == pytest.approx(1 / (1 - p_eff))
    sigma = math.sqrt(p_eff * (1 - p_eff) / n)
    assert abs((1 - keep.float().mean().item()) - p_eff) < 5 * sigma
    # the four 16-bit quarters of each 63-bit draw are uniform: elements 4i, 4i+1, 4i+2, 4i+3 drop alike
    for quarter in range(4):
        part = keep[quarter::4]
        assert abs((1 - part.float().mean().item()) - p_eff) < 5 * sigma * 2


def test_quarters_of_a_draw_are_uncorrelated():
    # the four elements made from one 64-bit draw must drop independently of each other
    torch.manual_seed(5)
    n = 400_000
    keep, _ = keep_mask(torch.Size([4 * n]), 0.5)
    corr = torch.corrcoef(keep.view(n, 4).T.float())
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5 / math.sqrt(n)


def test_output_is_masked_and_scaled_input_with_unbiased_mean():
    torch.manual_seed(1)
    x = torch.randn(64, 50, 144) + 3.0
    y = dropout(x, 0.1)
    kept = y != 0
    scale = LEVELS / (LEVELS - round(0.1 * LEVELS))
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert y.shape == x.shape and y.dtype == x.dtype
    ratio = y.mean().item() / x.mean().item()
    assert abs(ratio - 1) < 0.01


def test_seeded_masks_reproduce_and_differ_across_calls():
    x = torch.ones(4, 1000)
    torch.manual_seed(7)
    a, b = dropout(x, 0.2), dropout(x, 0.2)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.2), a)
    assert not torch.equal(a, b)


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(2)
    x = torch.randn(8, 300, requires_grad=True)
    y = dropout(x, 0.25)
    y.sum().backward()
    expected = torch.where(y != 0, torch.full_like(y, LEVELS / (LEVELS - round(0.25 * LEVELS))), 0.0)
    torch.testing.assert_close(x.grad, expected)


def test_module_is_identity_in_eval_and_for_p_zero():
    x = torch.randn(3, 5)
    m = Dropout(0.5).eval()
    assert m(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert Dropout(0.5).state_dict() == {}
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)


def test_attention_path_equals_sdpa_without_dropout():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 7, 16) for _ in range(3))
    lengths = torch.tensor([7, 4])
    key_mask = (torch.arange(7)[None] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    torch.testing.assert_close(
        attention_with_dropout(q, k, v, key_mask, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    )
    bias = torch.randn(2, 4, 7, 7)
    mask = key_mask & torch.ones(7, 7, dtype=torch.bool)  # (B, 1, Tq, Tk)
    mask[1, :, 2] = False  # a fully masked query row: zeros, not NaN
    out = attention_with_dropout(q, k, v, mask, 0.0, bias)
    assert torch.equal(out[1, :, 2], torch.zeros(4, 16))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(out, torch.nan_to_num(ref))
    # a bias shared by the batch (1, H, Tq, Tk) broadcasts
    shared = attention_with_dropout(q, k, v, key_mask, 0.0, bias[:1])
    torch.testing.assert_close(
        shared, F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:1].masked_fill(~key_mask, float("-inf")))
    )


def test_attention_dropout_drops_weights_in_training():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 50, 8) for _ in range(3))
    mask = torch.ones(1, 1, 1, 50, dtype=torch.bool)
    a = attention_with_dropout(q, k, v, mask, 0.5)
    b = attention_with_dropout(q, k, v, mask, 0.0)
    assert not torch.allclose(a, b)
    # the expectation over masks is the undropped output
    mean = torch.stack([attention_with_dropout(q, k, v, mask, 0.5) for _ in range(400)]).mean(0)
    assert (mean - b).abs().mean() < 0.05 * b.abs().mean() + 0.02
