"""The Neural Engine graph of a trained encoder + CTC head (Xu et al. 2023, "memory-aware graph execution").

Not a second model: the blocks and attention variants are models/conformer.py's, built in the channels-first
layout (models/layout.py `ChannelsFirst`) and loaded from a trained DualDecoderASR's weights without retraining
(docs/stabilization.md section 3 has the reasons and the measured differences):

* P1 layout: every activation between the edges is (B, C, 1, S), channels on dim 1, the sequence last. Every
  projection is a 1x1 Conv2d, LayerNorm normalises dim 1, GLU/SiLU act along channels, the depthwise convolution
  is a (1, K) Conv2d with explicit zero padding. Layouts change only at the edges (this file: features in, CTC
  log-probs out) and inside attention, where the native einsum form wants its left operand channels-last.
* P2 split: attention runs one head at a time on channel slices, so each head's (T, T) scores stay small.
* P3 einsum: the products of a head ('bqhc,bchk->bqhk' and two more) are all in the one form Core ML lowers to
  its native einsum op (the left operand's last axis contracted with the right one's channel axis), not to
  transposes around a batched matmul.

The FP16 numerics plug into the same modules: the LayerNorms are stabilize/prenorm.py's (pre-normalized or
plain), the attention softmax is exact or stabilize/softmax.py's LUT softmax, and Performer blocks use the
FP16-safe key shift (`performer_shift`). This file holds only the edges: CMVN folded into the graph, the front end
with its kernels transposed to run on (F, T), and the position tables in channels-first layout.

Names mirror the original (encoder.blocks.0.ffn1.norm, encoder.blocks.0.mhsa.softmax, ctc): state dicts and
per-module audit reports of the two models line up.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.attention import RelPositionalEncoding as TrainedRelPositionalEncoding
from edgeconformer.models.attention import chunk_attention_mask, sinusoid
from edgeconformer.models.config import EncoderDims
from edgeconformer.models.conformer import make_blocks
from edgeconformer.models.layout import ChannelsFirst, MaskedSoftmax
from edgeconformer.models.subsampling import KERNEL, STRIDE, conv_out_size
from edgeconformer.stabilize.prenorm import PreNormLayerNorm
from edgeconformer.stabilize.softmax import LUTSoftmax

SOFTMAXES = ("exact", "lut")


def check_attention_modules(trained, built) -> None:
    """The graph is built from the encoder's recorded dims: a module swapped into the trained encoder afterwards is
    not described by them, so refuse it rather than replace it silently."""
    for i, (t, b) in enumerate(zip(trained.blocks, built.blocks)):
        a, c = getattr(t, "mhsa", None), getattr(b, "mhsa", None)
        if type(a) is not type(c):
            raise ValueError(
                f"block {i}: {type(a).__name__} has no ANE form; the encoder's dims build "
                f"{type(c).__name__} (attention variants live in models/, built from EncoderDims)"
            )


def channels_first_state(source: dict, target: dict) -> dict:
    """A trained state dict -> the channels-first graph's: same names, only shapes change (Linear (o, i) ->
    (o, i, 1, 1), depthwise (D, 1, K) -> (D, 1, 1, K)), except the front end's kernels, transposed to run on (F, T)
    instead of (T, F)."""
    source, state = dict(source), {}
    for name, like in target.items():
        if name not in source:
            raise ValueError(f"the trained model has no {name!r}: its encoder is not one ane.py knows")
        w = source.pop(name)
        if name.startswith("encoder.subsampling.conv.") and w.dim() == 4:
            w = w.transpose(2, 3)
        if w.numel() != like.numel():
            raise ValueError(f"{name}: trained shape {tuple(w.shape)} does not fit {tuple(like.shape)}")
        state[name] = w.reshape(like.shape)
    if source:
        raise ValueError(f"trained tensors without an ANE counterpart: {sorted(source)[:5]}")
    return state


class InputCMVN(nn.Module):
    """GlobalCMVN folded into the graph: (x - mean) * inv_std per mel bin of (B, 1, F, T) features."""

    def __init__(self, n_feats):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_feats))
        self.register_buffer("inv_std", torch.ones(n_feats))

    def forward(self, x):
        return (x - self.mean[:, None]) * self.inv_std[:, None]


class Subsampling(nn.Module):
    """models/subsampling.py on (B, 1, F, T): the kernels are stored transposed, so time stays the last axis and
    flattening to (B, C*F', 1, T') is a reshape, channel c*F' + f as in the original's "b t (c f)"."""

    def __init__(self, idim, odim, channels, factor, dws):
        super().__init__()
        self.n_convs = {4: 2, 8: 3}[factor]
        layers = [nn.Conv2d(1, channels, KERNEL, STRIDE), nn.ReLU()]
        for _ in range(self.n_convs - 1):
            if dws:
                layers += [
                    nn.Conv2d(channels, channels, KERNEL, STRIDE, groups=channels),
                    nn.Conv2d(channels, channels, 1),
                    nn.ReLU(),
                ]
            else:
                layers += [nn.Conv2d(channels, channels, KERNEL, STRIDE), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.freq = self.subsample(idim)
        if self.freq < 1:
            raise ValueError(f"idim={idim} is too small for {self.n_convs} stride-2 convolutions")
        self.out = nn.Conv2d(channels * self.freq, odim, 1)  # the Linear over (C, F') features

    def subsample(self, size):
        for _ in range(self.n_convs):
            size = conv_out_size(size)
        return size

    def forward(self, x):
        # (B, 1, F, T) -> (B, C, F', T') -> (B, C*F', 1, T') -> (B, D, 1, T')
        return self.out(self.conv(x).flatten(1, 2).unsqueeze(2))


class RelPositionalEncoding(nn.Module):
    """x * sqrt(D0) and, per attention width D, the embeddings of relative positions T'-1 .. -(T'-1)."""

    def __init__(self, d_model, widths, max_len=5000):
        super().__init__()
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        self.widths = sorted(set(widths))
        positions = torch.arange(max_len - 1, -max_len, -1)  # column k: relative position (max_len - 1) - k
        for d in self.widths:
            pe = sinusoid(positions, d).t()[None, :, None, :].contiguous()  # (1, D, 1, 2L-1), channels first
            self.register_buffer(f"pe{d}", pe, persistent=False)

    def forward(self, x):
        T = x.size(3)
        if T > self.max_len:
            raise ValueError(f"{T} encoder frames exceed the position table ({self.max_len}); split the audio")
        center = self.max_len - 1  # column of relative position 0
        return x * self.xscale, {d: getattr(self, f"pe{d}")[..., center - T + 1 : center + T] for d in self.widths}


class AbsolutePositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=5000):
        super().__init__()
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        pe = sinusoid(torch.arange(max_len), d_model).t()[None, :, None, :].contiguous()  # (1, D, 1, L)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x):
        if x.size(3) > self.max_len:
            raise ValueError(f"{x.size(3)} encoder frames exceed the position table ({self.max_len}); split the audio")
        return x * self.xscale + self.pe[..., : x.size(3)], {}


class Encoder(nn.Module):
    """models/conformer.py's encoder in channels-first layout: this file's edges around the shared blocks."""

    def __init__(self, dims: EncoderDims, layout: ChannelsFirst, max_len: int):
        super().__init__()
        self.chunk_size, self.left_chunks, self.first_pass_layers = (
            dims.chunk_size,
            dims.left_chunks,
            dims.first_pass_layers,
        )
        d0 = dims.blocks[0][0]
        self.subsampling = Subsampling(
            dims.idim, d0, dims.subsampling_channels or d0, dims.subsampling_factor, dims.dws_subsampling
        )
        if dims.pos == "rel":  # a table per width of the softmax blocks (Performers ignore relative positions)
            widths = [d for i, (d, _, _) in enumerate(dims.blocks) if dims.block_attention(i) == "softmax"]
            self.pos_enc = RelPositionalEncoding(d0, widths, max_len)
        else:
            self.pos_enc = AbsolutePositionalEncoding(d0, max_len)
        self.blocks, self.projections = make_blocks(dims, layout)

    def forward(self, x):
        # x: (B, 1, F, T) -> (B, D, 1, T')
        x, pos = self.pos_enc(self.subsampling(x))  # pos: {width: (1, width, 1, 2T'-1)}, empty for "abs"
        mask = None
        if self.chunk_size > 0:  # the original's static streaming mask, built for this T'
            mask = chunk_attention_mask(x.size(3), self.chunk_size, self.left_chunks, x.device)[None, :, None, :]
        for i, block in enumerate(self.blocks):
            if i == self.first_pass_layers > 0:  # cascade: the second pass attends to the whole utterance
                mask = None
            if str(i) in self.projections:
                x = self.projections[str(i)](x)
            x = block(x, None, mask, pos.get(block.d_model))
        return x


class ANEConformer(nn.Module):
    """Conformer encoder + CTC head in (B, C, 1, S) layout; build it with `ANEConformer.from_asr(asr)`.

    Built from the trained encoder's recorded sizes (EncoderDims) and the stabilization options. Unpadded input
    only (batch 1, or utterances of equal length): there are no length masks.
    """

    def __init__(
        self,
        dims: EncoderDims,
        vocab_size: int,
        max_len: int = 5000,
        cmvn: bool = False,
        prenorm: str = "none",
        p: int = 2,
        fmt: str = "fp16",
        softmax: str = "exact",
        lut_size: int = 256,
        lut_range: float = 16.0,
        lut_interp: str = "linear",
        lut_max_squarings=None,
        performer_shift: bool = False,
    ):
        super().__init__()
        if softmax not in SOFTMAXES:
            raise ValueError(f"softmax must be one of {SOFTMAXES}, got {softmax!r}")
        if dims.subsampling_factor not in (4, 8):
            raise ValueError(f"subsampling_factor must be 4 or 8, got {dims.subsampling_factor}")
        dims = dataclasses.replace(dims, dropout=0.0)

        def layer_norm(d):
            return PreNormLayerNorm(d, prenorm=prenorm, p=p, fmt=fmt, dim=1)

        def make_softmax():
            if softmax == "exact":
                return MaskedSoftmax()
            return LUTSoftmax(lut_size, lut_range, lut_interp, lut_max_squarings)

        self.idim = dims.idim
        self.cmvn = InputCMVN(dims.idim) if cmvn else None
        self.encoder = Encoder(dims, ChannelsFirst(layer_norm, make_softmax, performer_shift), max_len)
        self.ctc = nn.Conv2d(dims.blocks[-1][0], vocab_size, 1)  # the CTC head's Linear over channels

    @classmethod
    def from_asr(cls, asr, cmvn=None, max_len=None, **options) -> ANEConformer:
        """A trained DualDecoderASR's encoder + CTC head (and GlobalCMVN, if given) -> ANEConformer in eval mode.

        options: the graph's numerics, as ANEConformer takes them (prenorm, p, fmt, softmax, lut_size, lut_range,
        lut_interp, lut_max_squarings, performer_shift). performer_shift: the FP16-safe arithmetic of Performer
        blocks (PerformerAttention.forward_heads); False is the trained model's own, which overflows FP16 (both are
        the same function in exact arithmetic).
        max_len: encoder frames the position table covers (default: the trained model's); an export sizes it to
        its longest input, since the table ships as weights."""
        if not isinstance(asr, DualDecoderASR):
            hint = " (an ASRModule? pass module.model and cmvn=module.cmvn)" if hasattr(asr, "model") else ""
            raise ValueError(f"from_asr needs a DualDecoderASR, got {type(asr).__name__}{hint}")
        enc = asr.encoder
        if not hasattr(enc, "dims"):
            raise ValueError(f"{type(enc).__name__} has no ANE form: build the encoder as a ConformerEncoder")
        pos_enc = enc.pos_enc
        trained_len = pos_enc.max_len if isinstance(pos_enc, TrainedRelPositionalEncoding) else pos_enc.pe.size(0)
        ane = cls(enc.dims, asr.vocab_size, max_len=max_len or trained_len, cmvn=cmvn is not None, **options)
        check_attention_modules(enc, ane.encoder)
        source = {**enc.state_dict(prefix="encoder."), **asr.ctc.state_dict(prefix="ctc.")}
        if cmvn is not None:
            source.update({"cmvn.mean": cmvn.mean, "cmvn.inv_std": cmvn.inv_std})
        ane.load_state_dict(channels_first_state(source, ane.state_dict()))
        originals = dict(asr.named_modules())
        for name, module in ane.named_modules():  # the trained norms' eps (same names on both sides)
            if isinstance(module, (PreNormLayerNorm, nn.BatchNorm2d)):
                module.eps = originals[name].eps
        return ane.eval()

    def _check(self, feats):
        if feats.dim() != 3:
            raise ValueError(f"expected features of shape (B, T, F), got {tuple(feats.shape)}")
        sub = self.encoder.subsampling
        if sub.subsample(feats.size(2)) != sub.freq or (self.cmvn is not None and feats.size(2) != self.idim):
            raise ValueError(f"features have {feats.size(2)} bins; this model takes {self.idim} (n_mels)")
        if sub.subsample(feats.size(1)) < 1:
            raise ValueError(
                f"{feats.size(1)} frames are too few for the {2**sub.n_convs}x subsampling "
                f"(it needs at least {2 ** (sub.n_convs + 1) - 1})"
            )

    def encode(self, feats):
        # feats: (B, T, F) raw log-mels when CMVN is folded in, else normalised -> (B, D, 1, T')
        self._check(feats)
        x = feats.transpose(1, 2).unsqueeze(1)  # input edge: (B, 1, F, T), time last from here on
        if self.cmvn is not None:
            x = self.cmvn(x)
        return self.encoder(x)

    def forward(self, feats):
        # (B, T, F) -> CTC log-probs (B, T', V)
        logits = self.ctc(self.encode(feats))  # (B, V, 1, T')
        return F.log_softmax(logits, dim=1).squeeze(2).transpose(1, 2)  # output edge
