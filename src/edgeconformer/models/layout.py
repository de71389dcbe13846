"""Tensor layouts of the one Conformer definition: which modules implement a block's projections, norms and
depthwise convolution, and along which axis its channels lie.

The blocks (models/conformer.py) and attention variants (models/attention.py, models/performer.py) are written
once and take a layout when built:

* `Layout` (the default): activations (B, T, D), nn.Linear projections, LayerNorm over the last axis, a Conv1d
  depthwise kernel on (B, D, T) and fused scaled-dot-product attention. Training, streaming and PyTorch inference.
* `ChannelsFirst`: activations (B, C, 1, S), channels on dim 1 and the sequence last (the P1 layout of Apple's
  ml-ane-transformers): every projection a 1x1 Conv2d, the depthwise kernel a (1, K) Conv2d, attention one head
  at a time in the einsum forms Core ML lowers natively, with an explicit (pluggable) softmax. No length masks:
  unpadded input only. stabilize/ane.py builds the Neural Engine graph with it, plugging in the FP16 numerics
  (pre-normalized LayerNorm, LUT softmax, the FP16-safe Performer) through `norm`, `softmax` and `performer_shift`.

A state dict moves between layouts by reshaping only: a Linear's (out, in) weight is a 1x1 convolution's
(out, in, 1, 1), a Conv1d's (D, 1, K) kernel a (D, 1, 1, K) one (stabilize/ane.py `from_asr`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from edgeconformer.models.dropout import Dropout


class MaskedSoftmax(nn.Module):
    """Softmax over `dim` with keys masked out (mask: True where a query may attend a key). Chunk masks always
    leave a query its own chunk, so no row is fully masked and -inf never becomes NaN."""

    def forward(self, scores, dim, mask=None):
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=dim)


class Layout:
    channels_first = False
    channel_dim = -1
    performer_shift = False  # the Performer's FP16-safe key shift (ChannelsFirst only)

    def linear(self, d_in: int, d_out: int, bias: bool = True) -> nn.Module:
        return nn.Linear(d_in, d_out, bias=bias)

    def norm(self, d_model: int) -> nn.Module:
        return nn.LayerNorm(d_model)

    def batch_norm(self, d_model: int) -> nn.Module:
        return nn.BatchNorm1d(d_model)

    def depthwise(self, d_model: int, kernel_size: int) -> nn.Module:
        return nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)  # padding applied by hand

    def dropout(self, p: float) -> nn.Module:
        return Dropout(p)  # nn.Dropout with cheaper CPU masks

    def softmax(self) -> nn.Module | None:
        return None  # fused into scaled_dot_product_attention


TRAINING = Layout()


class ChannelsFirst(Layout):
    """(B, C, 1, S). `norm(d)` builds a LayerNorm over dim 1 (stabilize/prenorm.py's, plain or pre-normalized),
    `softmax()` the attention's softmax module (default: exact)."""

    channels_first = True
    channel_dim = 1

    def __init__(
        self,
        norm: Callable[[int], nn.Module],
        softmax: Callable[[], nn.Module] = MaskedSoftmax,
        performer_shift: bool = False,
    ):
        self.make_norm, self.make_softmax, self.performer_shift = norm, softmax, performer_shift

    def linear(self, d_in: int, d_out: int, bias: bool = True) -> nn.Module:
        return nn.Conv2d(d_in, d_out, 1, bias=bias)  # a Linear over the channels of (B, C, 1, S)

    def norm(self, d_model: int) -> nn.Module:
        return self.make_norm(d_model)

    def batch_norm(self, d_model: int) -> nn.Module:
        return nn.BatchNorm2d(d_model)

    def depthwise(self, d_model: int, kernel_size: int) -> nn.Module:
        return nn.Conv2d(d_model, d_model, (1, kernel_size), groups=d_model)

    def dropout(self, p: float) -> nn.Module:
        return nn.Identity()  # inference only: nothing in the traced graph

    def softmax(self) -> nn.Module:
        return self.make_softmax()
