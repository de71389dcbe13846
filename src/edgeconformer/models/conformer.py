"""Conformer encoder (Gulati et al. 2020) with optional DWS subsampling (Xu et al. 2023) and chunked streaming.

Block: x + 1/2 FFN -> x + MHSA -> x + Conv -> x + 1/2 FFN -> LayerNorm.

Practical Conformer options (Botros et al. 2023, docs/practical.md), all off by default:
* the first `conv_only_layers` blocks are ConvOnlyBlocks (no self-attention);
* `block_dims`: per-block (d_model, n_heads, ff_dim), with a linear projection (`projections[str(i)]`) in front
  of every block i whose width differs from the previous one; `d_model` is then the output (last) width;
* `attention="performer"`: FAVOR+ linear attention (models/performer.py) instead of softmax attention;
* `first_pass_layers=N` (cascaded encoder): blocks 0..N-1 are the causal first pass (causal convolution and the
  chunk mask), blocks N.. the non-causal second pass over the first pass's output (full attention, centred
  convolution); `forward_passes` returns both outputs.
Streaming: `stream_init` / `stream` run the (first-pass) blocks chunk by chunk with carried state (convolution
caches, softmax key/value caches or constant-size Performer states), equal to the chunk-masked forward.

Padding never leaks into valid frames: attention masks padded keys, the convolution module zeroes padded
frames before its depthwise convolution, and the default LayerNorm in the convolution module normalises
each frame on its own. Together with the padding-free subsampling this makes an utterance's encoder output
identical whether it is encoded alone or padded inside a batch (tested).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.models.attention import (
    AbsolutePositionalEncoding,
    MultiHeadAttention,
    RelPositionalEncoding,
    RelPositionMultiHeadAttention,
    chunk_attention_mask,
    make_pad_mask,
    sinusoid,
)
from edgeconformer.models.config import ATTENTION, EncoderDims
from edgeconformer.models.layout import TRAINING
from edgeconformer.models.performer import PerformerAttention
from edgeconformer.models.subsampling import Conv2dSubsampling


class FeedForward(nn.Module):
    def __init__(self, d_model, ff_dim, dropout, layout=TRAINING):
        super().__init__()
        self.norm = layout.norm(d_model)
        self.up = layout.linear(d_model, ff_dim)
        self.down = layout.linear(ff_dim, d_model)
        self.dropout = layout.dropout(dropout)

    def forward(self, x):
        # (B, T, D) -> (B, T, D); channels-first (B, D, 1, T) -> (B, D, 1, T)
        x = self.dropout(F.silu(self.up(self.norm(x))))
        return self.dropout(self.down(x))


class ConvolutionModule(nn.Module):
    """LN -> pointwise (2D) + GLU -> depthwise conv -> norm -> Swish -> pointwise -> dropout.

    Pointwise convolutions are written as the layout's linear on (B, T, D) (identical maths and FLOPs, no
    transposes; channels-first: 1x1 convolutions).

    norm="layer" (default) normalises every frame over channels. BatchNorm (the paper's choice) mixes
    statistics across frames and utterances: during training padded frames enter its statistics, and a
    streaming chunk or a lone utterance sees different statistics than the training batches did, so the
    output of a frame depends on what else is in the batch. LayerNorm has neither problem.
    """

    def __init__(self, d_model, kernel_size, dropout, norm="layer", causal=False, layout=TRAINING):
        super().__init__()
        if not causal and kernel_size % 2 == 0:
            raise ValueError("a non-causal depthwise convolution needs an odd kernel_size to stay centred")
        if norm not in ("batch", "layer"):
            raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}")
        self.causal = causal
        self.kernel_size = kernel_size
        self.channels_first = layout.channels_first
        # Causal: all context on the left, so a frame never reads the future (streaming).
        self.left = kernel_size - 1 if causal else (kernel_size - 1) // 2
        self.right = kernel_size - 1 - self.left
        self.norm_in = layout.norm(d_model)
        self.pointwise_in = layout.linear(d_model, 2 * d_model)
        self.depthwise = layout.depthwise(d_model, kernel_size)  # padding applied by hand
        self.norm = layout.norm(d_model) if norm == "layer" else layout.batch_norm(d_model)
        self.pointwise_out = layout.linear(d_model, d_model)
        self.dropout = layout.dropout(dropout)

    def forward(self, x, pad_mask=None):
        # x: (B, T, D), pad_mask: (B, T) True at padded frames; channels-first: x (B, D, 1, T), unpadded
        if self.channels_first:
            x = F.glu(self.pointwise_in(self.norm_in(x)), dim=1)  # (B, 2D, 1, T) -> (B, D, 1, T)
            x = self.depthwise(F.pad(x, (self.left, self.right)))  # (B, D, 1, T + K - 1) -> (B, D, 1, T)
            return self.dropout(self.pointwise_out(F.silu(self.norm(x))))
        x = F.glu(self.pointwise_in(self.norm_in(x)), dim=-1)  # (B, T, D)
        # Zero padded frames so the depthwise kernel reads exactly the zeros an unpadded utterance is padded with.
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        x = self.depthwise_time_major(F.pad(x, (0, 0, self.left, self.right)))  # (B, T + K - 1, D) -> (B, T, D)
        return self.dropout(self.pointwise_out(F.silu(self.channel_norm(x))))

    def depthwise_time_major(self, x):
        # (B, T, D) -> (B, T', D) through the Conv1d's own kernel (D, 1, K): (B, T, D) memory *is* a channels-last
        # (B, D, 1, T) image, so a (1, K) Conv2d reads and writes it without a transpose. oneDNN's native layout:
        # measured on 2 threads, forward (1, 149, 144) 97 us vs 189 us for Conv1d on the transposed copy,
        # (16, 149, 144) 215 us vs 1.6 ms; forward + backward 3.4 vs 4.0 ms.
        w = self.depthwise.weight.unsqueeze(2)  # (D, 1, 1, K)
        y = F.conv2d(x.unsqueeze(1).permute(0, 3, 1, 2), w, self.depthwise.bias, groups=w.size(0))  # (B, D, 1, T')
        return y.squeeze(2).transpose(1, 2)  # (B, T', D), contiguous when the kernel kept channels-last

    def channel_norm(self, x):
        # (B, T, D) -> normalised (B, T, D): BatchNorm1d reads channels first, LayerNorm channels last
        if isinstance(self.norm, nn.BatchNorm1d):
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)

    def stream_step(self, x, cache):
        # One chunk through the causal module in eval mode. x: (B, c, D), cache: (B, D, kernel_size - 1) GLU outputs
        # of the previous frames (zeros at the start: the zeros the causal convolution is padded with)
        # -> (B, c, D), cache
        y = F.glu(self.pointwise_in(self.norm_in(x)), dim=-1).transpose(1, 2)  # (B, D, c)
        y = torch.cat([cache, y], dim=2)  # (B, D, kernel_size - 1 + c)
        cache = y[:, :, y.size(2) - (self.kernel_size - 1) :]
        # The depthwise convolution as a sum over sliding windows: same maths as self.depthwise(y), and on a few
        # frames it avoids the convolution kernel's fixed cost (measured ~2.5x faster for 8 frames, kernel 15).
        w = self.depthwise.weight[:, 0]  # (D, kernel_size)
        y = torch.einsum("bdtk,dk->bdt", y.unfold(2, self.kernel_size, 1), w) + self.depthwise.bias[:, None]
        return self.pointwise_out(F.silu(self.channel_norm(y.transpose(1, 2)))), cache


def make_attention(kind, d_model, n_heads, dropout, pos, performer_features, performer_seed, layout):
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {kind!r}")
    if kind == "performer":  # ignores pos_emb: relative positions need the explicit score matrix
        return PerformerAttention(d_model, n_heads, dropout, performer_features, performer_seed, layout=layout)
    attention = {"rel": RelPositionMultiHeadAttention, "abs": MultiHeadAttention}[pos]
    return attention(d_model, n_heads, dropout, layout=layout)


class Block(nn.Module):
    """x + 1/2 FFN -> x + MHSA -> x + Conv -> x + 1/2 FFN -> LayerNorm, in either layout (models/layout.py);
    without MHSA when attention is None. Built as ConformerBlock or ConvOnlyBlock."""

    def __init__(
        self,
        d_model,
        n_heads,
        ff_dim,
        kernel_size,
        dropout,
        pos="rel",
        causal=False,
        norm="layer",
        attention="softmax",
        performer_features=64,
        performer_seed=0,
        layout=TRAINING,
    ):
        super().__init__()
        self.d_model = d_model
        self.ffn1 = FeedForward(d_model, ff_dim, dropout, layout)
        if attention is not None:
            self.norm_mhsa = layout.norm(d_model)
            self.mhsa = make_attention(
                attention, d_model, n_heads, dropout, pos, performer_features, performer_seed, layout
            )
            self.dropout = layout.dropout(dropout)
        self.conv = ConvolutionModule(d_model, kernel_size, dropout, norm=norm, causal=causal, layout=layout)
        self.ffn2 = FeedForward(d_model, ff_dim, dropout, layout)
        self.norm = layout.norm(d_model)

    @property
    def has_attention(self) -> bool:
        return hasattr(self, "mhsa")

    def forward(self, x, pad_mask, attn_mask=None, pos_emb=None, chunk_size=0):
        # x: (B, T, D), pad_mask: (B, T) True = padding, attn_mask: (B, 1|T, T) True = may attend,
        # pos_emb: (1, 2T-1, D) for relative attention, None for absolute. chunk_size > 0 says attn_mask is the
        # chunk mask with unlimited left context: a Performer then uses its linear prefix-sum form instead.
        # Channels-first: x (B, D, 1, T), pad_mask None, attn_mask (1, T, 1, T) or None, pos_emb (1, D, 1, 2T-1).
        x = x + 0.5 * self.ffn1(x)  # macaron: two half-step feed-forwards around attention and conv
        if self.has_attention:
            h = self.norm_mhsa(x)
            if chunk_size > 0 and isinstance(self.mhsa, PerformerAttention):
                x = x + self.dropout(self.mhsa(h, h, h, attn_mask, pos_emb, chunk_size=chunk_size))
            else:
                x = x + self.dropout(self.mhsa(h, h, h, attn_mask, pos_emb))
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)

    def stream_init(self, batch, device=None):
        # {"conv": (B, D, kernel_size - 1) cache, "attn": attention state, "pos": position cache}
        d = self.conv.pointwise_out.in_features
        state = {"attn": None, "pos": None} if not self.has_attention else self.mhsa.stream_state(batch, device)
        return {"conv": torch.zeros(batch, d, self.conv.kernel_size - 1, device=device), **state}

    def stream_step(self, x, state, left_frames, chunk_size):
        # One chunk (B, c, D) in eval mode -> (B, c, D); state from stream_init, updated in place
        x = x + 0.5 * self.ffn1(x)
        if self.has_attention:
            x = x + self.mhsa.stream_step(self.norm_mhsa(x), state, left_frames, chunk_size)
        c, state["conv"] = self.conv.stream_step(x, state["conv"])
        x = x + c
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class ConformerBlock(Block):
    """The Conformer block (Gulati et al. 2020) with softmax ("softmax", `pos` relative or absolute) or Performer
    attention."""


class ConvOnlyBlock(Block):
    """Convolution-only block (Botros et al. 2023): a Conformer block without its self-attention module.

    x + 1/2 FFN -> x + Conv -> x + 1/2 FFN -> LayerNorm. The convolution module is the lightweight-convolution
    sublayer (LayerNorm, pointwise feed-forward to 2D, GLU, depthwise convolution, norm, Swish, pointwise
    feed-forward, residual). Attribute names match ConformerBlock, so per-part FLOP accounting and weight
    loading treat both alike. No attention means no attention state to stream: only the convolution's
    (kernel_size - 1) cached frames.
    """

    def __init__(self, d_model, ff_dim, kernel_size, dropout, causal=False, norm="layer", layout=TRAINING):
        super().__init__(
            d_model, 1, ff_dim, kernel_size, dropout, causal=causal, norm=norm, attention=None, layout=layout
        )


def make_blocks(dims: EncoderDims, layout=TRAINING) -> tuple[nn.ModuleList, nn.ModuleDict]:
    """The encoder's blocks and the linear projections in front of every block i whose width differs from block
    i-1's (keys: str(i)), in the given layout: shared by ConformerEncoder and the Neural Engine graph."""
    blocks = []
    for i, (d, h, f) in enumerate(dims.blocks):
        attention = dims.block_attention(i)
        causal = dims.block_causal(i)
        if attention is None:
            blocks.append(
                ConvOnlyBlock(d, f, dims.kernel_size, dims.dropout, causal=causal, norm=dims.norm, layout=layout)
            )
        else:
            blocks.append(
                ConformerBlock(
                    d,
                    h,
                    f,
                    dims.kernel_size,
                    dims.dropout,
                    pos=dims.pos,
                    causal=causal,
                    norm=dims.norm,
                    attention=attention,
                    performer_features=dims.performer_features,
                    performer_seed=dims.performer_seed + i,
                    layout=layout,
                )
            )
    widths = [b[0] for b in dims.blocks]
    projections = {
        str(i): layout.linear(widths[i - 1], widths[i]) for i in range(1, len(widths)) if widths[i] != widths[i - 1]
    }
    return nn.ModuleList(blocks), nn.ModuleDict(projections)


def check_dims(dims: EncoderDims) -> None:
    if dims.pos not in ("rel", "abs"):
        raise ValueError(f"pos must be 'rel' or 'abs', got {dims.pos!r}")
    blocks, n = dims.blocks, dims.n_layers
    if len(blocks) != n or any(len(b) != 3 for b in blocks):
        raise ValueError(f"block_dims needs n_layers={n} (d_model, n_heads, ff_dim) triples, got {blocks}")
    if not (dims.first_pass_layers == 0 or 0 < dims.first_pass_layers < n):
        raise ValueError(
            f"first_pass_layers={dims.first_pass_layers} must be 0 (no cascade) or in 1..{n - 1} "
            "so that both passes have blocks"
        )
    if not 0 <= dims.conv_only_layers <= dims.n_first:
        raise ValueError(
            f"conv_only_layers={dims.conv_only_layers} must be in 0..{dims.n_first} (the first-pass blocks)"
        )


class ConformerEncoder(nn.Module):
    """Built from EncoderDims' fields (in its order, or by keyword) or `from_dims`; `self.dims` records them, so
    every other form of the model reads its sizes there."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        dims = EncoderDims(*args, **kwargs)
        if dims.block_dims is not None:  # lists (from a config) -> a hashable, comparable record
            dims = dataclasses.replace(dims, block_dims=tuple(tuple(b) for b in dims.block_dims))
        self.dims = dims
        check_dims(dims)
        widths = [b[0] for b in dims.blocks]
        self.d_model = widths[-1]  # output width: what the CTC head and the decoder read
        self.pos = dims.pos
        self.chunk_size = dims.chunk_size
        self.left_chunks = dims.left_chunks
        self.dynamic_chunk = dims.dynamic_chunk
        self.max_dynamic_chunk = dims.max_dynamic_chunk
        self.first_pass_layers = dims.first_pass_layers
        self.first_pass_d_model = widths[dims.n_first - 1]

        self.subsampling = Conv2dSubsampling(
            dims.idim,
            widths[0],
            channels=dims.subsampling_channels,
            factor=dims.subsampling_factor,
            dws=dims.dws_subsampling,
        )
        # Relative positions enter every attention layer; absolute ones are added to x once, here.
        positional_encoding = RelPositionalEncoding if dims.pos == "rel" else AbsolutePositionalEncoding
        self.pos_enc = positional_encoding(widths[0], dims.dropout)
        self.blocks, self.projections = make_blocks(dims)

    @classmethod
    def from_dims(cls, dims: EncoderDims) -> ConformerEncoder:
        return cls(**dataclasses.asdict(dims))

    def sample_chunking(self, T):
        # WeNet's dynamic chunk training: per batch, full attention half of the time, otherwise a chunk of
        # 1..max_dynamic_chunk frames with unlimited left context, so one model serves every latency.
        # Drawn from torch's RNG so seeding makes runs reproducible. Pair it with causal=True: a centred
        # depthwise kernel would still read (kernel_size - 1) / 2 future frames per block.
        if torch.rand(()) < 0.5:
            return 0, -1
        return int(torch.randint(1, self.max_dynamic_chunk + 1, ())), -1

    def forward(self, feats, lengths, chunk_size=None, left_chunks=None):
        # feats: (B, T, F), lengths: (B,). chunk_size/left_chunks override the constructor's values,
        # e.g. to evaluate a dynamic-chunk model at a given latency.
        _, x, lengths = self.forward_passes(feats, lengths, chunk_size, left_chunks)
        return x, lengths

    def forward_passes(self, feats, lengths, chunk_size=None, left_chunks=None, second_pass=True):
        # -> first-pass output (B, T', D1), final output (B, T', D), lengths (B,). Without a cascade both are the
        # same tensor; second_pass=False stops after the first pass (final output None). Chunking applies to the
        # first pass only: the second pass attends to the whole utterance.
        x, lengths = self.subsampling(feats, lengths)  # (B, T', D0)
        x, pos_emb = self.pos_enc(x)
        T = x.size(1)

        if chunk_size is None and self.dynamic_chunk and self.training:
            chunk_size, left_chunks = self.sample_chunking(T)
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        left_chunks = self.left_chunks if left_chunks is None else left_chunks

        pad_mask = make_pad_mask(lengths, T)  # (B, T')
        full_mask = ~pad_mask.unsqueeze(1)  # (B, 1, T') keys that exist
        attn_mask = full_mask
        if chunk_size > 0:
            attn_mask = attn_mask & chunk_attention_mask(T, chunk_size, left_chunks, x.device)  # (B, T', T')

        # Chunk size for which attn_mask is exactly a chunk mask with unlimited left context (a Performer's
        # prefix-sum form); 0: any other mask.
        prefix_chunk = chunk_size if chunk_size > 0 and left_chunks < 0 else 0
        pos_embs = {x.size(-1): pos_emb}
        first = None
        for i, block in enumerate(self.blocks):
            if i and i == self.first_pass_layers:  # cascade: the first pass ends here
                first, attn_mask, prefix_chunk = x, full_mask, 0
                if not second_pass:
                    return first, None, lengths
            if str(i) in self.projections:
                x = self.projections[str(i)](x)
            x = block(x, pad_mask, attn_mask, self.position_embedding(pos_embs, x), chunk_size=prefix_chunk)
        return (x if first is None else first), x, lengths

    def position_embedding(self, cache, x):
        # Relative-position embeddings (1, 2T-1, D) at the width D of x (blocks may differ in width); None for
        # absolute positions. Computed once per width and forward.
        D = x.size(-1)
        if self.pos == "abs":
            return None
        if D not in cache:
            T = x.size(1)
            cache[D] = self.pos_enc.dropout(sinusoid(torch.arange(T - 1, -T, -1), D).to(x)[None])
        return cache[D]

    # ------------------------------------------------------------------------------------------ streaming
    def stream_blocks(self):
        return self.blocks[: self.first_pass_layers or len(self.blocks)]

    def stream_init(self, batch=1, chunk_size=None, left_chunks=None):
        """State for `stream`: the (first-pass) blocks run chunk by chunk, exactly like `forward` with the chunk
        mask (chunk_size frames after subsampling, left_chunks of left context, -1 = all)."""
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        left_chunks = self.left_chunks if left_chunks is None else left_chunks
        if self.training:
            raise ValueError("streaming is inference (no dropout, no chunk sampling): call .eval() first")
        if chunk_size <= 0:
            raise ValueError(
                "streaming needs chunk_size > 0 (encoder frames per chunk); pass chunk_size= or build "
                "the encoder with one"
            )
        blocks = self.stream_blocks()
        if not all(b.conv.causal for b in blocks):
            raise ValueError("streaming needs causal=True: a centred convolution kernel reads future frames")
        performer = any(isinstance(getattr(b, "mhsa", None), PerformerAttention) for b in blocks)
        if performer and left_chunks >= 0:
            raise ValueError("Performer streaming keeps the sum over all past frames: use left_chunks=-1")
        device = next(self.parameters()).device
        states = [b.stream_init(batch, device) for b in blocks]
        return {
            "chunk_size": chunk_size,
            "left_frames": left_chunks * chunk_size if left_chunks >= 0 else -1,
            "feats": None,
            "pending": None,
            "subsampled": 0,
            "blocks": states,
        }

    def stream(self, feats, state, final=False):
        """feats: (B, n, F) the next feature frames (any n >= 0, no padding) -> (B, n_out, D1) the encoder frames
        completed by them (first-pass width), and the updated state. Frames are released a whole chunk at a time;
        final=True also releases the last, partial chunk."""
        buf = feats if state["feats"] is None else torch.cat([state["feats"], feats], dim=1)
        n = int(self.subsampling.subsample_lengths(buf.size(1)))
        if n > 0:
            # The padding-free front end: output frame t reads input frames factor*t .. factor*t + 6 (factor 4).
            x, _ = self.subsampling(buf, torch.full((buf.size(0),), buf.size(1), device=buf.device))
            if self.pos == "rel":
                x = x * self.pos_enc.xscale
            else:
                x, _ = self.pos_enc(x, offset=state["subsampled"])
            state["subsampled"] += n
            buf = buf[:, self.subsampling.factor * n :]
            state["pending"] = x if state["pending"] is None else torch.cat([state["pending"], x], dim=1)
        state["feats"] = buf
        outs = []
        c = state["chunk_size"]
        pending = state["pending"]
        blocks = self.stream_blocks()
        while pending is not None and (pending.size(1) >= c or (final and pending.size(1) > 0)):
            x, pending = pending[:, :c], pending[:, c:]
            for i, (block, st) in enumerate(zip(blocks, state["blocks"])):
                if str(i) in self.projections:
                    x = self.projections[str(i)](x)
                x = block.stream_step(x, st, state["left_frames"], c)
            outs.append(x)
        state["pending"] = pending
        if not outs:
            return feats.new_zeros(feats.size(0), 0, self.first_pass_d_model), state
        return torch.cat(outs, dim=1), state

    @staticmethod
    def stream_state_bytes(state):
        """Bytes held by a streaming state: attention (softmax key/value caches grow with the context; Performer
        states are constant), projected relative positions (softmax with pos="rel": grow with the context, but
        depend on no input) and convolution caches (constant)."""

        def size(t):
            if isinstance(t, tuple):
                return sum(size(x) for x in t)
            return 0 if t is None else t.numel() * t.element_size()

        return {
            key: sum(size(st[part]) for st in state["blocks"])
            for key, part in (("attention", "attn"), ("positions", "pos"), ("conv", "conv"))
        }
