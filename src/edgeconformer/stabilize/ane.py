"""The Neural Engine graph of a trained encoder + CTC head (Xu et al. 2023, "memory-aware graph execution").

The same maths as models/conformer.py, rewritten in the layout of Apple's ml-ane-transformers and built from a
trained DualDecoderASR's weights without retraining (docs/stabilization.md section 3 has the reasons and the
measured differences):

* P1 layout: every activation between the edges is (B, C, 1, S), channels on dim 1, the sequence last. Every
  nn.Linear is a 1x1 Conv2d, LayerNorm normalises dim 1, GLU/SiLU act along channels, the depthwise convolution
  is a (1, K) Conv2d with explicit zero padding. Layouts change only at the edges (features in, CTC log-probs
  out) and inside attention, where the native einsum form wants its left operand channels-last.
* P2 split: attention runs one head at a time on channel slices, so each head's (T, T) scores stay small.
* P3 einsum: the products of a head ('bqhc,bchk->bqhk' and two more) are all in the one form Core ML lowers to
  its native einsum op (the left operand's last axis contracted with the right one's channel axis), not to
  transposes around a batched matmul.

Scores are query-major, (B, S_q, 1, S_k), softmax over dim 3: only there is a query's band of relative positions
contiguous in memory, so the Transformer-XL relative shift is a pad/reshape/slice that works at any length.

Names mirror the original (encoder.blocks.0.ffn1.norm, encoder.blocks.0.mhsa.softmax, ctc): state dicts and
per-module audit reports of the two models line up. Norms and softmaxes are submodules for the same reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.attention import (
    MultiHeadAttention,
    RelPositionMultiHeadAttention,
    chunk_attention_mask,
    sinusoid,
)
from edgeconformer.models.attention import RelPositionalEncoding as OriginalRelPositionalEncoding
from edgeconformer.models.performer import TINY as TRAINED_TINY
from edgeconformer.models.performer import PerformerAttention as OriginalPerformer
from edgeconformer.models.subsampling import KERNEL, STRIDE, conv_out_size
from edgeconformer.stabilize.prenorm import PreNormLayerNorm
from edgeconformer.stabilize.softmax import LUTSoftmax

SOFTMAXES = ("exact", "lut")


def conv1x1(c_in, c_out, bias=True):
    # A Linear over the channels of (B, C, 1, S); its weight is the Linear's, reshaped to (out, in, 1, 1).
    return nn.Conv2d(c_in, c_out, 1, bias=bias)


class ExactSoftmax(nn.Module):
    def forward(self, scores, dim, mask=None):
        # mask: True where a query may attend a key. Chunk masks always leave a query its own chunk, so no row is
        # fully masked and -inf never becomes NaN.
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=dim)


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
                layers += [nn.Conv2d(channels, channels, KERNEL, STRIDE, groups=channels),
                           nn.Conv2d(channels, channels, 1), nn.ReLU()]
            else:
                layers += [nn.Conv2d(channels, channels, KERNEL, STRIDE), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.freq = self.subsample(idim)
        if self.freq < 1:
            raise ValueError(f"idim={idim} is too small for {self.n_convs} stride-2 convolutions")
        self.out = conv1x1(channels * self.freq, odim)

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


def rel_shift(x):
    # x: (B, T, 1, 2T-1), column c = relative position (T-1) - c  ->  (B, T, 1, T) with [i, j] = position i - j.
    # Row i needs columns T-1-i .. 2T-2-i. With every row padded to 2T entries, element (i, T-1-i+j) sits at flat
    # index (T-1) + i(2T-1) + j: dropping the first T-1 entries and the last one leaves T rows of width 2T-1 whose
    # first T columns are the band. Pad, reshape and slice only (Core ML has no as_strided); valid for every T.
    B, T = x.size(0), x.size(1)
    x = F.pad(x, (0, 1)).flatten(1)[:, T - 1 : -1]  # (B, T(2T-1))
    return x.reshape(B, T, 1, 2 * T - 1)[..., :T]


class Attention(nn.Module):
    """Multi-head self-attention, absolute or Transformer-XL relative, one head at a time on channel slices."""

    def __init__(self, d_model, n_heads, rel, softmax):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.d_head, self.rel = n_heads, d_model // n_heads, rel
        self.scale = 1.0 / math.sqrt(self.d_head)
        self.query = conv1x1(d_model, d_model)
        self.key = conv1x1(d_model, d_model)
        self.value = conv1x1(d_model, d_model)
        self.out = conv1x1(d_model, d_model)
        if rel:
            self.linear_pos = conv1x1(d_model, d_model, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_head))  # Transformer-XL u and v, per head
            self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_head))
        self.softmax = softmax

    def forward(self, x, mask=None, pos=None):
        # x: (B, D, 1, T); mask: (1, T, 1, T) True where query i may attend key j, or None; pos: (1, D, 1, 2T-1)
        d = self.d_head
        # The native einsum's left operand is channels-last: q and v turn once per layer ((D, T)-sized copies,
        # never (T, T) ones), and the heads' outputs turn back once.
        q = self.query(x).transpose(1, 3)  # (B, T, 1, D)
        k = self.key(x).split(d, dim=1)  # H x (B, d, 1, T)
        v = self.value(x).transpose(1, 3).split(d, dim=3)  # H x (B, T, 1, d)
        if self.rel:
            # score(i, j) = ((q_i + u) k_j + (q_i + v) p_{i-j}) / sqrt(d). The 1/sqrt(d) goes on the queries: (D, T)
            # multiplies instead of (T, T) ones per head, and smaller FP16 partial sums in the products.
            q_u = ((q + self.pos_bias_u.flatten()) * self.scale).split(d, dim=3)  # H x (B, T, 1, d)
            q_v = ((q + self.pos_bias_v.flatten()) * self.scale).split(d, dim=3)
            p = self.linear_pos(pos).split(d, dim=1)  # H x (1, d, 1, 2T-1)
        else:
            q_u = (q * self.scale).split(d, dim=3)
        heads = []
        for h in range(self.n_heads):
            scores = torch.einsum("bqhc,bchk->bqhk", q_u[h], k[h])  # (B, Tq, 1, Tk)
            if self.rel:
                scores = scores + rel_shift(torch.einsum("bqhc,bchp->bqhp", q_v[h], p[h]))  # (B, Tq, 1, 2T-1) -> Tk
            probs = self.softmax(scores, dim=3, mask=mask)
            heads.append(torch.einsum("bqhk,bkhc->bqhc", probs, v[h]))  # (B, Tq, 1, d)
        return self.out(torch.cat(heads, dim=3).transpose(1, 3))  # (B, T, 1, D) -> (B, D, 1, T)


MASKED = 1.0e4  # subtracted from the key shifts of masked keys: exp(-1e4) = 0 in every format, and finite in FP16


def nonzero(x):
    # x where x != 0, else 1: a divisor that leaves every nonzero value exact (no floor constant, which FP16 would
    # round to 0 or which would change tiny FP32 values) and turns 0/0 into 0/1.
    return x + (x == 0).to(x.dtype)


class Performer(nn.Module):
    """FAVOR+ attention (models/performer.py) on (B, C, 1, S), in the masked parallel form, one head at a time.

    With a(q)_f = w_f.q' - |q'|^2/2 and b(k)_f = w_f.k' - |k'|^2/2 (x' = x / d^(1/4)), the trained model weighs key
    j for query i by A_ij = sum_f exp(a_if) exp(b_jf) / m (a per-query constant removed from a_i). The key
    features reach exp(|w_f|^2/2), about e^36 at d = 36, far past FP16's 65504 (e^11.1). `shift=True` computes
    the same ratio from bounded factors (docs/stabilization.md section 8):

        A_ij = c_i * exp(beta_j - M_i) * sum_f exp(a_if - alpha_i) exp(b_jf - beta_j)

    alpha_i = max_f a_if, beta_j = max_f b_jf (each key's own maximum: no key underflows as a whole) and
    M_i = the maximum of beta_j over the keys query i sees, like a softmax's row maximum; c_i (one number per query)
    cancels in the normalised ratio, and so does the division of each row by its maximum. So every weight is <= 1
    and the normaliser <= T: nothing overflows in FP16, for any input. Shifting keys by their own maximum couples a
    key to nothing else, and M_i is taken over the visible keys only, so the chunk mask keeps its meaning exactly.
    `shift=False` is the trained model's arithmetic (per-query maximum only), which overflows in FP16.

    The parallel form costs O(T^2 m) per head, the order of a softmax layer: the graph is run once per utterance.
    (Streaming on device would carry the recurrent (S, z) state of models/performer.py instead.)
    """

    def __init__(self, d_model, n_heads, n_features, shift=True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.d_head, self.n_features, self.shift = n_heads, d_model // n_heads, n_features, shift
        self.query = conv1x1(d_model, d_model)
        self.key = conv1x1(d_model, d_model)
        self.value = conv1x1(d_model, d_model)
        self.out = conv1x1(d_model, d_model)
        self.register_buffer("features", torch.zeros(n_features, self.d_head))  # W: (m, d_head), the trained draw

    def logits(self, x):
        # x: (B, d, 1, T) one head's queries or keys -> (B, m, 1, T): w_f.x' - |x'|^2 / 2, a 1x1 convolution by W
        x = x * self.d_head ** -0.25
        return F.conv2d(x, self.features[:, :, None, None]) - 0.5 * (x * x).sum(1, keepdim=True)

    def forward(self, x, mask=None, pos=None):
        # x: (B, D, 1, T); mask: (1, T, 1, T) True where query i may attend key j, or None; pos: unused (a Performer
        # has no score matrix to add relative positions to, as in the trained model)
        d = self.d_head
        q = self.query(x).split(d, dim=1)  # H x (B, d, 1, T)
        k = self.key(x).split(d, dim=1)
        v = self.value(x).transpose(1, 3).split(d, dim=3)  # H x (B, T, 1, d)
        # the mask as 1/0 numbers, once per layer: a multiplier (plain) or a -1e4 bias on masked keys' shifts
        keep = None if mask is None else mask.to(x.dtype)  # (1, Tq, 1, Tk)
        heads = []
        for h in range(self.n_heads):
            a = self.logits(q[h])
            qf = torch.exp(a - a.amax(1, keepdim=True)).transpose(1, 3)  # (B, Tq, 1, m), max 1 per query
            b = self.logits(k[h])  # (B, m, 1, Tk)
            if self.shift:
                beta = b.amax(1, keepdim=True)  # (B, 1, 1, Tk)
                # The feature sum in (0, m], unscaled: the trained model's 1/m would push small weights into FP16's
                # subnormals (measured: 8x the log-prob error). Then row i's per-key factors, and the row scaled
                # to a maximum of 1 (a per-query constant), so the normaliser stays <= T for any input.
                weights = torch.einsum("bqhc,bchk->bqhk", qf, torch.exp(b - beta))  # (B, Tq, 1, Tk)
                if keep is not None:
                    beta = beta + (keep - 1.0) * MASKED  # (B, Tq, 1, Tk)
                weights = weights * torch.exp(beta - beta.amax(3, keepdim=True))  # 0 for masked keys
                weights = weights / nonzero(weights.amax(3, keepdim=True))
                norm = nonzero(weights.sum(3, keepdim=True))  # >= 1 unless every weight of the row is 0
            else:  # the trained model's arithmetic, its floor included (0 in FP16: 0/0 where all weights underflow)
                weights = torch.einsum("bqhc,bchk->bqhk", qf, torch.exp(b)) * (1.0 / self.n_features)
                if keep is not None:
                    weights = weights * keep
                norm = weights.sum(3, keepdim=True).clamp_min(TRAINED_TINY)  # (B, Tq, 1, 1)
            heads.append(torch.einsum("bqhk,bkhc->bqhc", weights, v[h]) / norm)  # (B, Tq, 1, d)
        return self.out(torch.cat(heads, dim=3).transpose(1, 3))  # (B, T, 1, D) -> (B, D, 1, T)


class FeedForward(nn.Module):
    def __init__(self, d_model, ff_dim, norm):
        super().__init__()
        self.norm = norm(d_model)
        self.up = conv1x1(d_model, ff_dim)
        self.down = conv1x1(ff_dim, d_model)

    def forward(self, x):
        return self.down(F.silu(self.up(self.norm(x))))  # (B, D, 1, T)


class ConvolutionModule(nn.Module):
    def __init__(self, d_model, kernel_size, causal, conv_norm, norm):
        super().__init__()
        self.norm_in = norm(d_model)
        self.pointwise_in = conv1x1(d_model, 2 * d_model)
        self.depthwise = nn.Conv2d(d_model, d_model, (1, kernel_size), groups=d_model)  # padding applied by hand
        self.norm = norm(d_model) if conv_norm == "layer" else nn.BatchNorm2d(d_model)
        self.pointwise_out = conv1x1(d_model, d_model)
        self.left = kernel_size - 1 if causal else (kernel_size - 1) // 2  # causal: all context on the left
        self.right = kernel_size - 1 - self.left

    def forward(self, x):
        x = F.glu(self.pointwise_in(self.norm_in(x)), dim=1)  # (B, 2D, 1, T) -> (B, D, 1, T)
        x = self.depthwise(F.pad(x, (self.left, self.right)))  # (B, D, 1, T + K - 1) -> (B, D, 1, T)
        return self.pointwise_out(F.silu(self.norm(x)))


class ConformerBlock(nn.Module):
    """x + 1/2 FFN -> x + MHSA -> x + Conv -> x + 1/2 FFN -> LayerNorm; without MHSA when attention is None
    (the convolution-only blocks of Botros et al. 2023)."""

    def __init__(self, d_model, ff_dim, kernel_size, causal, conv_norm, norm, attention=None):
        super().__init__()
        self.d_model = d_model
        self.ffn1 = FeedForward(d_model, ff_dim, norm)
        if attention is not None:
            self.norm_mhsa = norm(d_model)
            self.mhsa = attention
        self.conv = ConvolutionModule(d_model, kernel_size, causal, conv_norm, norm)
        self.ffn2 = FeedForward(d_model, ff_dim, norm)
        self.norm = norm(d_model)

    def forward(self, x, mask, pos):
        x = x + 0.5 * self.ffn1(x)
        if hasattr(self, "mhsa"):
            x = x + self.mhsa(self.norm_mhsa(x), mask, pos.get(self.d_model))
        x = x + self.conv(x)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class Encoder(nn.Module):
    def __init__(self, idim, dims, kernel_size, subsampling_factor, dws, subsampling_channels, pos, causal,
                 chunk_size, left_chunks, conv_norm, conv_only_layers, first_pass_layers, max_len, norm, softmax,
                 performer_blocks=(), performer_features=64, performer_shift=True):
        super().__init__()
        self.chunk_size, self.left_chunks, self.first_pass_layers = chunk_size, left_chunks, first_pass_layers
        d0 = dims[0][0]
        self.subsampling = Subsampling(idim, d0, subsampling_channels or d0, subsampling_factor, dws)
        if pos == "rel":
            widths = [d for i, (d, _, _) in enumerate(dims) if i >= conv_only_layers and i not in performer_blocks]
            self.pos_enc = RelPositionalEncoding(d0, widths, max_len)
        else:
            self.pos_enc = AbsolutePositionalEncoding(d0, max_len)
        n_first = first_pass_layers or len(dims)
        blocks = []
        for i, (d, h, f) in enumerate(dims):
            if i < conv_only_layers:
                attention = None
            elif i in performer_blocks:
                attention = Performer(d, h, performer_features, performer_shift)
            else:
                attention = Attention(d, h, pos == "rel", softmax())
            # second-pass blocks of a cascade see the whole utterance: centred kernel, full attention
            blocks.append(ConformerBlock(d, f, kernel_size, causal and i < n_first, conv_norm, norm, attention))
        self.blocks = nn.ModuleList(blocks)
        self.projections = nn.ModuleDict({str(i): conv1x1(dims[i - 1][0], dims[i][0])
                                          for i in range(1, len(dims)) if dims[i][0] != dims[i - 1][0]})

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
            x = block(x, mask, pos)
        return x


class ANEConformer(nn.Module):
    """Conformer encoder + CTC head in (B, C, 1, S) layout; build it with `ANEConformer.from_asr(asr)`.

    Hyperparameters are ConformerEncoder's. Unpadded input only (batch 1, or utterances of equal length): there
    are no length masks.
    """

    def __init__(self, idim, vocab_size, d_model=256, n_layers=16, n_heads=4, ff_dim=1024, kernel_size=31,
                 subsampling_factor=4, dws_subsampling=False, subsampling_channels=None, pos="rel", causal=False,
                 chunk_size=0, left_chunks=-1, norm="layer", conv_only_layers=0, block_dims=None,
                 first_pass_layers=0, max_len=5000, cmvn=False, prenorm="none", p=2, fmt="fp16", softmax="exact",
                 lut_size=256, lut_range=16.0, lut_interp="linear", lut_max_squarings=None, performer_blocks=(),
                 performer_features=64, performer_shift=False):
        super().__init__()
        if pos not in ("rel", "abs"):
            raise ValueError(f"pos must be 'rel' or 'abs', got {pos!r}")
        if softmax not in SOFTMAXES:
            raise ValueError(f"softmax must be one of {SOFTMAXES}, got {softmax!r}")
        if norm not in ("layer", "batch"):
            raise ValueError(f"norm must be 'layer' or 'batch', got {norm!r}")
        if subsampling_factor not in (4, 8):
            raise ValueError(f"subsampling_factor must be 4 or 8, got {subsampling_factor}")
        dims = [(d_model, n_heads, ff_dim)] * n_layers if block_dims is None else [tuple(b) for b in block_dims]
        if len(dims) != n_layers:
            raise ValueError(f"block_dims has {len(dims)} entries for n_layers={n_layers}")

        def layer_norm(d):
            return PreNormLayerNorm(d, prenorm=prenorm, p=p, fmt=fmt, dim=1)

        def make_softmax():
            if softmax == "exact":
                return ExactSoftmax()
            return LUTSoftmax(lut_size, lut_range, lut_interp, lut_max_squarings)

        self.idim = idim
        self.cmvn = InputCMVN(idim) if cmvn else None
        self.encoder = Encoder(idim, dims, kernel_size, subsampling_factor, dws_subsampling, subsampling_channels, pos,
                               causal, chunk_size, left_chunks, norm, conv_only_layers, first_pass_layers, max_len,
                               layer_norm, make_softmax, tuple(performer_blocks), performer_features, performer_shift)
        self.ctc = conv1x1(dims[-1][0], vocab_size)

    @classmethod
    def from_asr(cls, asr, cmvn=None, prenorm="none", p=2, fmt="fp16", softmax="exact", lut_size=256,
                 lut_range=16.0, lut_interp="linear", lut_max_squarings=None, performer_shift=False,
                 max_len=None) -> ANEConformer:
        """A trained DualDecoderASR's encoder + CTC head (and GlobalCMVN, if given) -> ANEConformer in eval mode.

        performer_shift: the FP16-safe arithmetic of Performer blocks (see `Performer`); False is the trained
        model's own, which overflows FP16 (both are the same function in exact arithmetic).
        max_len: encoder frames the position table covers (default: the trained model's); an export sizes it to
        its longest input, since the table ships as weights."""
        if not isinstance(asr, DualDecoderASR):
            hint = " (an ASRModule? pass module.model and cmvn=module.cmvn)" if hasattr(asr, "model") else ""
            raise ValueError(f"from_asr needs a DualDecoderASR, got {type(asr).__name__}{hint}")
        enc = asr.encoder
        sub = enc.subsampling
        has_attention = [hasattr(b, "mhsa") for b in enc.blocks]
        conv_only = has_attention.index(True) if any(has_attention) else len(has_attention)
        if not all(has_attention[conv_only:]):
            raise ValueError("convolution-only blocks must all come before the attention blocks")
        performers = [i for i, b in enumerate(enc.blocks) if isinstance(getattr(b, "mhsa", None), OriginalPerformer)]
        for b in enc.blocks[conv_only:]:
            if type(b.mhsa) not in (MultiHeadAttention, RelPositionMultiHeadAttention, OriginalPerformer):
                raise ValueError(f"{type(b.mhsa).__name__} has no ANE form; supported: softmax attention "
                                 "(MultiHeadAttention, RelPositionMultiHeadAttention) and PerformerAttention")
        n_features = {enc.blocks[i].mhsa.n_features for i in performers}
        if len(n_features) > 1:
            raise ValueError(f"Performer blocks with different feature counts {sorted(n_features)}")
        rel = isinstance(enc.pos_enc, OriginalRelPositionalEncoding)
        # per block (width, heads, feed-forward size); heads are unused in convolution-only blocks
        dims = [(b.ffn1.up.in_features, b.mhsa.n_heads if i >= conv_only else 1, b.ffn1.up.out_features)
                for i, b in enumerate(enc.blocks)]
        first = enc.blocks[0]
        channels = sub.conv[0].out_channels
        if cmvn is not None:
            idim = cmvn.mean.numel()
        else:  # the front end reads F' columns of features; the smallest F with that many
            idim = sub.out.in_features // channels
            for _ in range(sub.n_convs):
                idim = (idim - 1) * STRIDE + KERNEL
        pos_enc = enc.pos_enc
        ane = cls(
            idim, asr.ctc.out_features, d_model=dims[0][0], n_layers=len(dims), n_heads=dims[0][1],
            ff_dim=dims[0][2], kernel_size=first.conv.kernel_size, subsampling_factor=sub.factor,
            dws_subsampling=sub.dws, subsampling_channels=channels, pos="rel" if rel else "abs",
            causal=first.conv.causal, chunk_size=enc.chunk_size, left_chunks=enc.left_chunks,
            norm="batch" if isinstance(first.conv.norm, nn.BatchNorm1d) else "layer", conv_only_layers=conv_only,
            block_dims=dims, first_pass_layers=getattr(enc, "first_pass_layers", 0),
            max_len=max_len or (pos_enc.max_len if rel else pos_enc.pe.size(0)), cmvn=cmvn is not None,
            prenorm=prenorm, p=p,
            fmt=fmt, softmax=softmax, lut_size=lut_size, lut_range=lut_range,
            lut_interp=lut_interp, lut_max_squarings=lut_max_squarings, performer_blocks=performers,
            performer_features=n_features.pop() if n_features else 64, performer_shift=performer_shift,
        )

        # Same names on both sides, only shapes change (Linear (o, i) -> (o, i, 1, 1), depthwise (D, 1, K) ->
        # (D, 1, 1, K)), except the front end's kernels: transposed to run on (F, T) instead of (T, F).
        source = {**enc.state_dict(prefix="encoder."), **asr.ctc.state_dict(prefix="ctc.")}
        if cmvn is not None:
            source.update({"cmvn.mean": cmvn.mean, "cmvn.inv_std": cmvn.inv_std})
        state = {}
        for name, target in ane.state_dict().items():
            if name not in source:
                raise ValueError(f"the trained model has no {name!r}: its encoder is not one ane.py knows")
            w = source.pop(name)
            if name.startswith("encoder.subsampling.conv.") and w.dim() == 4:
                w = w.transpose(2, 3)
            if w.numel() != target.numel():
                raise ValueError(f"{name}: trained shape {tuple(w.shape)} does not fit {tuple(target.shape)}")
            state[name] = w.reshape(target.shape)
        if source:
            raise ValueError(f"trained tensors without an ANE counterpart: {sorted(source)[:5]}")
        ane.load_state_dict(state)
        originals = dict(asr.named_modules())
        for name, module in ane.named_modules():
            if isinstance(module, (PreNormLayerNorm, nn.BatchNorm2d)):
                module.eps = originals[name].eps
        for i, block in enumerate(enc.blocks):  # the per-block kernel placement, should blocks ever differ
            if block.conv.causal != (ane.encoder.blocks[i].conv.left == block.conv.kernel_size - 1):
                raise ValueError(f"block {i}: causal={block.conv.causal} is not what the encoder's options imply")
        return ane.eval()

    def _check(self, feats):
        if feats.dim() != 3:
            raise ValueError(f"expected features of shape (B, T, F), got {tuple(feats.shape)}")
        sub = self.encoder.subsampling
        if sub.subsample(feats.size(2)) != sub.freq or (self.cmvn is not None and feats.size(2) != self.idim):
            raise ValueError(f"features have {feats.size(2)} bins; this model takes {self.idim} (n_mels)")
        if sub.subsample(feats.size(1)) < 1:
            raise ValueError(f"{feats.size(1)} frames are too few for the {2 ** sub.n_convs}x subsampling "
                             f"(it needs at least {2 ** (sub.n_convs + 1) - 1})")

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
