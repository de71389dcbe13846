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

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from edgeconformer.models.attention import (
    AbsolutePositionalEncoding,
    MultiHeadAttention,
    RelPositionalEncoding,
    RelPositionMultiHeadAttention,
    chunk_attention_mask,
    make_pad_mask,
    sinusoid,
)
from edgeconformer.models.performer import PerformerAttention
from edgeconformer.models.subsampling import Conv2dSubsampling

ATTENTION = ("softmax", "performer")


class FeedForward(nn.Module):
    def __init__(self, d_model, ff_dim, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, ff_dim)
        self.down = nn.Linear(ff_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # (B, T, D) -> (B, T, D)
        x = self.dropout(F.silu(self.up(self.norm(x))))
        return self.dropout(self.down(x))


class ConvolutionModule(nn.Module):
    """LN -> pointwise (2D) + GLU -> depthwise conv -> norm -> Swish -> pointwise -> dropout.

    Pointwise convolutions are written as nn.Linear on (B, T, D): identical maths and FLOPs, no transposes.

    norm="layer" (default) normalises every frame over channels. BatchNorm (the paper's choice) mixes
    statistics across frames and utterances: during training padded frames enter its statistics, and a
    streaming chunk or a lone utterance sees different statistics than the training batches did, so the
    output of a frame depends on what else is in the batch. LayerNorm has neither problem.
    """

    def __init__(self, d_model, kernel_size, dropout, norm="layer", causal=False):
        super().__init__()
        if not causal and kernel_size % 2 == 0:
            raise ValueError("a non-causal depthwise convolution needs an odd kernel_size to stay centred")
        self.causal = causal
        self.kernel_size = kernel_size
        self.norm_in = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)  # padding applied by hand
        if norm == "batch":
            self.norm = nn.BatchNorm1d(d_model)
        elif norm == "layer":
            self.norm = nn.LayerNorm(d_model)
        else:
            raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}")
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pad_mask):
        # x: (B, T, D), pad_mask: (B, T) True at padded frames
        x = F.glu(self.pointwise_in(self.norm_in(x)), dim=-1)  # (B, T, D)
        # Zero padded frames so the depthwise kernel reads exactly the zeros an unpadded utterance is padded with.
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0).transpose(1, 2)  # (B, D, T)
        # Causal: all context on the left, so a frame never reads the future (streaming).
        left = self.kernel_size - 1 if self.causal else (self.kernel_size - 1) // 2
        right = self.kernel_size - 1 - left
        x = self.depthwise(F.pad(x, (left, right)))  # (B, D, T)
        if isinstance(self.norm, nn.BatchNorm1d):
            x = self.norm(x).transpose(1, 2)
        else:
            x = self.norm(x.transpose(1, 2))  # (B, T, D)
        return self.dropout(self.pointwise_out(F.silu(x)))


class ConformerBlock(nn.Module):
    def __init__(self, d_model, n_heads, ff_dim, kernel_size, dropout, pos="rel", causal=False, norm="layer",
                 attention="softmax", performer_features=64, performer_seed=0):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.ffn1 = FeedForward(d_model, ff_dim, dropout)
        self.norm_mhsa = nn.LayerNorm(d_model)
        if attention == "performer":  # ignores pos_emb: relative positions need the explicit score matrix
            self.mhsa = PerformerAttention(d_model, n_heads, dropout, performer_features, performer_seed)
        else:
            self.mhsa = {"rel": RelPositionMultiHeadAttention, "abs": MultiHeadAttention}[pos](d_model, n_heads,
                                                                                               dropout)
        self.dropout = nn.Dropout(dropout)
        self.conv = ConvolutionModule(d_model, kernel_size, dropout, norm=norm, causal=causal)
        self.ffn2 = FeedForward(d_model, ff_dim, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, pad_mask, attn_mask, pos_emb=None, chunk_size=0):
        # x: (B, T, D), pad_mask: (B, T) True = padding, attn_mask: (B, 1|T, T) True = may attend,
        # pos_emb: (1, 2T-1, D) for relative attention, None for absolute. chunk_size > 0 says attn_mask is the
        # chunk mask with unlimited left context: a Performer then uses its linear prefix-sum form instead.
        x = x + 0.5 * self.ffn1(x)  # macaron: two half-step feed-forwards around attention and conv
        h = self.norm_mhsa(x)
        if chunk_size > 0 and isinstance(self.mhsa, PerformerAttention):
            x = x + self.dropout(self.mhsa(h, h, h, attn_mask, pos_emb, chunk_size=chunk_size))
        else:
            x = x + self.dropout(self.mhsa(h, h, h, attn_mask, pos_emb))
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class ConvOnlyBlock(nn.Module):
    """Convolution-only block (Botros et al. 2023): a Conformer block without its self-attention module.

    x + 1/2 FFN -> x + Conv -> x + 1/2 FFN -> LayerNorm. The convolution module is the lightweight-convolution
    sublayer (LayerNorm, pointwise feed-forward to 2D, GLU, depthwise convolution, norm, Swish, pointwise
    feed-forward, residual). Attribute names match ConformerBlock, so per-part FLOP accounting and weight
    loading treat both alike. No attention means no attention state to stream: only the convolution's
    (kernel_size - 1) cached frames.
    """

    def __init__(self, d_model, ff_dim, kernel_size, dropout, causal=False, norm="layer"):
        super().__init__()
        self.ffn1 = FeedForward(d_model, ff_dim, dropout)
        self.conv = ConvolutionModule(d_model, kernel_size, dropout, norm=norm, causal=causal)
        self.ffn2 = FeedForward(d_model, ff_dim, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, pad_mask, attn_mask=None, pos_emb=None, chunk_size=0):
        # Same signature as ConformerBlock (attention arguments unused): x (B, T, D), pad_mask (B, T) -> (B, T, D)
        x = x + 0.5 * self.ffn1(x)
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


def rel_band(x, L):
    # x: (B, H, c, L+c-1) scores against relative positions L-1 .. -(c-1) (column k = position L-1-k) of c queries
    # that follow L-c cached frames -> (B, H, c, L) with [i, j] = position (L-c+i) - j. rel_shift is the case L = c.
    x = x.contiguous()
    B, H, c, P = x.shape
    s = x.stride()
    return x.as_strided((B, H, c, L), (s[0], s[1], s[2] - s[3], s[3]), x.storage_offset() + s[3] * (c - 1))


def relative_positions(mhsa, table, L, c, chunk_size, like):
    # Projected relative-position embeddings p = linear_pos(PE) for positions L-1 .. -(c-1): (1, H, L+c-1, d), and
    # the cache they come from. They depend on no input, so the cache (positions top .. -(chunk_size-1),
    # descending) is only extended when the context grows: every position is projected once per stream.
    have = 0 if table is None else table.size(2) - (chunk_size - 1)  # positions 0 .. have-1 are cached
    if L > have:
        positions = torch.arange(L - 1, have - 1 if table is not None else -chunk_size, -1)
        new = mhsa.split_heads(mhsa.linear_pos(sinusoid(positions, like.size(-1)).to(like)[None]))
        table = new if table is None else torch.cat([new, table], dim=2)
    start = table.size(2) - chunk_size - (L - 1)  # row of position L-1
    return table[:, :, start:start + L + c - 1], table


def attention_step(mhsa, h, state, left_frames, chunk_size):
    # One chunk through an attention module, updating state["attn"] (and state["pos"]). h: (B, c, D) -> (B, c, D).
    # Softmax: state["attn"] is the key/value cache (B, H, L, d) x 2 of the frames seen so far (the last
    # left_frames of them; -1 = all): it grows with the context; relative positions add state["pos"], the projected
    # position embeddings. Performer: the constant-size (S, z) pair.
    if isinstance(mhsa, PerformerAttention):
        out, state["attn"] = mhsa.step(h, state["attn"])
        return out
    B, c, D = h.shape
    k, v = mhsa.split_heads(mhsa.key(h)), mhsa.split_heads(mhsa.value(h))  # (B, H, c, d)
    if state["attn"] is not None:
        k, v = torch.cat([state["attn"][0], k], dim=2), torch.cat([state["attn"][1], v], dim=2)  # (B, H, L, d)
    L = k.size(2)
    everything = torch.ones(B, 1, L, dtype=torch.bool, device=h.device)  # the chunk sees all cached frames
    if isinstance(mhsa, RelPositionMultiHeadAttention):
        q = rearrange(mhsa.query(h), "b t (h d) -> b t h d", h=mhsa.n_heads)
        p, state["pos"] = relative_positions(mhsa, state["pos"], L, c, chunk_size, h)  # (1, H, L+c-1, d)
        q_u = (q + mhsa.pos_bias_u).transpose(1, 2)  # (B, H, c, d)
        q_v = (q + mhsa.pos_bias_v).transpose(1, 2)
        position = rel_band(q_v @ p.transpose(-2, -1), L) / math.sqrt(mhsa.d_head)  # (B, H, c, L)
        out = mhsa.attend(q_u, k, v, everything, bias=position)
    else:
        out = mhsa.attend(mhsa.split_heads(mhsa.query(h)), k, v, everything)
    if left_frames >= 0:
        k, v = k[:, :, k.size(2) - left_frames:], v[:, :, v.size(2) - left_frames:]
    state["attn"] = (k, v)
    return out


def conv_step(conv, x, cache):
    # One chunk through a causal ConvolutionModule. x: (B, c, D), cache: (B, D, kernel_size - 1) GLU outputs of
    # the previous frames (zeros at the start: the zeros the causal convolution is padded with) -> (B, c, D), cache
    y = F.glu(conv.pointwise_in(conv.norm_in(x)), dim=-1).transpose(1, 2)  # (B, D, c)
    y = torch.cat([cache, y], dim=2)  # (B, D, kernel_size - 1 + c)
    cache = y[:, :, y.size(2) - (conv.kernel_size - 1):]
    # The depthwise convolution as a sum over sliding windows: same maths as conv.depthwise(y), and on a few
    # frames it avoids the convolution kernel's fixed cost (measured ~2.5x faster for 8 frames, kernel 15).
    w = conv.depthwise.weight[:, 0]  # (D, kernel_size)
    y = torch.einsum("bdtk,dk->bdt", y.unfold(2, conv.kernel_size, 1), w) + conv.depthwise.bias[:, None]  # (B, D, c)
    if isinstance(conv.norm, nn.BatchNorm1d):
        y = conv.norm(y).transpose(1, 2)
    else:
        y = conv.norm(y.transpose(1, 2))  # (B, c, D)
    return conv.pointwise_out(F.silu(y)), cache


def block_step(block, x, state, left_frames, chunk_size):
    # One chunk through a ConformerBlock or ConvOnlyBlock in eval mode; state: {"conv", "attn", "pos"}, updated
    x = x + 0.5 * block.ffn1(x)
    if isinstance(block, ConformerBlock):
        x = x + attention_step(block.mhsa, block.norm_mhsa(x), state, left_frames, chunk_size)
    c, state["conv"] = conv_step(block.conv, x, state["conv"])
    x = x + c
    x = x + 0.5 * block.ffn2(x)
    return block.norm(x), state


class ConformerEncoder(nn.Module):
    def __init__(
        self,
        idim=80,
        d_model=256,
        n_layers=16,
        n_heads=4,
        ff_dim=1024,
        kernel_size=31,
        dropout=0.1,
        subsampling_factor=4,
        dws_subsampling=False,
        pos="rel",
        causal=False,
        chunk_size=0,
        left_chunks=-1,
        dynamic_chunk=False,
        norm="layer",
        max_dynamic_chunk=25,
        subsampling_channels=None,
        conv_only_layers=0,
        block_dims=None,
        attention="softmax",
        performer_features=64,
        performer_seed=0,
        first_pass_layers=0,
        second_pass_attention="softmax",
    ):
        super().__init__()
        if pos not in ("rel", "abs"):
            raise ValueError(f"pos must be 'rel' or 'abs', got {pos!r}")
        # Per-block (width, heads, feed-forward size); uniform unless block_dims is given.
        dims = [(d_model, n_heads, ff_dim)] * n_layers if block_dims is None else [tuple(b) for b in block_dims]
        if len(dims) != n_layers or any(len(b) != 3 for b in dims):
            raise ValueError(f"block_dims needs n_layers={n_layers} (d_model, n_heads, ff_dim) triples, got {dims}")
        if not (first_pass_layers == 0 or 0 < first_pass_layers < n_layers):
            raise ValueError(f"first_pass_layers={first_pass_layers} must be 0 (no cascade) or in 1..{n_layers - 1} "
                             "so that both passes have blocks")
        n_first = first_pass_layers or n_layers
        if not 0 <= conv_only_layers <= n_first:
            raise ValueError(f"conv_only_layers={conv_only_layers} must be in 0..{n_first} (the first-pass blocks)")
        self.d_model = dims[-1][0]  # output width: what the CTC head and the decoder read
        self.pos = pos
        self.chunk_size = chunk_size
        self.left_chunks = left_chunks
        self.dynamic_chunk = dynamic_chunk
        self.max_dynamic_chunk = max_dynamic_chunk
        self.first_pass_layers = first_pass_layers
        self.first_pass_d_model = dims[n_first - 1][0]

        self.subsampling = Conv2dSubsampling(idim, dims[0][0], channels=subsampling_channels,
                                             factor=subsampling_factor, dws=dws_subsampling)
        # Relative positions enter every attention layer; absolute ones are added to x once, here.
        positional_encoding = RelPositionalEncoding if pos == "rel" else AbsolutePositionalEncoding
        self.pos_enc = positional_encoding(dims[0][0], dropout)
        blocks = []
        for i, (d, h, f) in enumerate(dims):
            second = i >= n_first  # second-pass blocks see the whole utterance: centred kernel, full attention
            if i < conv_only_layers:
                blocks.append(ConvOnlyBlock(d, f, kernel_size, dropout, causal=causal and not second, norm=norm))
            else:
                blocks.append(ConformerBlock(d, h, f, kernel_size, dropout, pos=pos, causal=causal and not second,
                                             norm=norm, attention=second_pass_attention if second else attention,
                                             performer_features=performer_features,
                                             performer_seed=performer_seed + i))
        self.blocks = nn.ModuleList(blocks)
        # Linear projection in front of block i when its width differs from block i-1's (keys: str(i)).
        self.projections = nn.ModuleDict({str(i): nn.Linear(dims[i - 1][0], dims[i][0])
                                          for i in range(1, n_layers) if dims[i][0] != dims[i - 1][0]})

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
            raise ValueError("streaming needs chunk_size > 0 (encoder frames per chunk); pass chunk_size= or build "
                             "the encoder with one")
        blocks = self.stream_blocks()
        if not all(b.conv.causal for b in blocks):
            raise ValueError("streaming needs causal=True: a centred convolution kernel reads future frames")
        performer = any(isinstance(getattr(b, "mhsa", None), PerformerAttention) for b in blocks)
        if performer and left_chunks >= 0:
            raise ValueError("Performer streaming keeps the sum over all past frames: use left_chunks=-1")
        device = next(self.parameters()).device
        states = []
        for b in blocks:
            d = b.conv.pointwise_out.in_features
            st = {"conv": torch.zeros(batch, d, b.conv.kernel_size - 1, device=device), "attn": None, "pos": None}
            if isinstance(getattr(b, "mhsa", None), PerformerAttention):
                st["attn"] = b.mhsa.init_state(batch, device)
            states.append(st)
        return {"chunk_size": chunk_size, "left_frames": left_chunks * chunk_size if left_chunks >= 0 else -1,
                "feats": None, "pending": None, "subsampled": 0, "blocks": states}

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
            buf = buf[:, self.subsampling.factor * n:]
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
                x, _ = block_step(block, x, st, state["left_frames"], c)
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

        return {key: sum(size(st[part]) for st in state["blocks"])
                for key, part in (("attention", "attn"), ("positions", "pos"), ("conv", "conv"))}
