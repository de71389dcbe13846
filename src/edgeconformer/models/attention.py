"""Multi-head attention, sinusoidal positional encodings and the masks used by encoder and decoder.

Mask conventions (the same as WeNet/ESPnet, so code can be compared side by side):

* ``make_pad_mask`` returns True at *padded* positions (B, T).
* attention masks passed to the attention modules are True where a query *may attend* to a key; they
  have shape (B, 1, T_k) (key padding only) or (B, T_q, T_k) (e.g. padding & chunk/causal masks).

Relative positions follow Transformer-XL as implemented in ESPnet's RelPositionMultiHeadedAttention
(Dai et al. 2019, used by the Conformer paper): score(i, j) = (q_i + u) k_j + (q_i + v) W_p p_{i-j}.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from edgeconformer.models.dropout import Dropout, dropout
from edgeconformer.models.layout import TRAINING


def make_pad_mask(lengths, max_len=None):
    # (B,) -> (B, T), True at padded frames
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def known_all(mask):
    # bool(mask.all()), and False where values are unknown (meta tensors: FLOP counting without data)
    return mask.device.type != "meta" and bool(mask.all())


def chunk_attention_mask(T, chunk_size, left_chunks=-1, device=None):
    # (T, T), True where query frame i may attend key frame j. Frame i in chunk c = i // chunk_size sees
    # every frame of chunks max(0, c - left_chunks) .. c: full look-ahead inside its own chunk, none beyond.
    if chunk_size <= 0:
        return torch.ones(T, T, dtype=torch.bool, device=device)
    chunk = torch.arange(T, device=device) // chunk_size
    query, key = chunk[:, None], chunk[None, :]
    allowed = key <= query
    if left_chunks >= 0:
        allowed &= key >= query - left_chunks
    return allowed


def sinusoid(positions, d_model):
    # positions: (N,) float -> (N, D) with sin on even and cos on odd channels (Vaswani et al. 2017)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = positions[:, None].float() * inv_freq[None, :]  # (N, D/2)
    pe = torch.zeros(len(positions), d_model)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles)
    return pe


class PositionalEncoding(nn.Module):
    """What both encodings share: x is scaled by sqrt(D) (the embedding scale of Vaswani et al. 2017)."""

    def __init__(self, d_model, dropout=0.0):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = Dropout(dropout)


class AbsolutePositionalEncoding(PositionalEncoding):
    """x * sqrt(D) + PE(t); returns (x, None) so it is interchangeable with the relative variant."""

    def __init__(self, d_model, dropout=0.0, max_len=5000):
        super().__init__(d_model, dropout)
        # Precomputed in fp32 (sin of large arguments is inaccurate in fp16); not saved in checkpoints.
        self.register_buffer("pe", sinusoid(torch.arange(max_len), d_model), persistent=False)

    def forward(self, x, offset=0):
        # x: (B, T, D); offset shifts positions, e.g. for the decoder's incremental steps
        T = x.size(1)
        if offset + T > self.pe.size(0):
            self.pe = sinusoid(torch.arange(offset + T), self.d_model).to(self.pe.device)
        x = x * self.xscale + self.pe[offset : offset + T].to(x.dtype)
        return self.dropout(x), None


class RelPositionalEncoding(PositionalEncoding):
    """Scales x and returns embeddings of the relative positions T-1, T-2, ..., -(T-1): (1, 2T-1, D)."""

    def __init__(self, d_model, dropout=0.0, max_len=5000):
        super().__init__(d_model, dropout)
        self.max_len = max_len
        self.register_buffer("pe", self._table(max_len), persistent=False)

    def _table(self, max_len):
        # Row k holds relative position (max_len - 1) - k, i.e. from +(max_len-1) down to -(max_len-1).
        return sinusoid(torch.arange(max_len - 1, -max_len, -1), self.d_model)

    def forward(self, x):
        T = x.size(1)
        if T > self.max_len:
            self.max_len = T
            self.pe = self._table(T).to(self.pe.device)
        center = self.max_len - 1  # row of relative position 0
        pos_emb = self.pe[center - T + 1 : center + T].to(x.dtype)[None]  # (1, 2T-1, D)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


class MultiHeadAttention(nn.Module):
    """Multi-head attention in either layout (models/layout.py). (B, T, D): all heads in one fused
    scaled-dot-product kernel; channels-first (B, D, 1, T), self-attention only: one head at a time on channel
    slices (each head's (T, T) scores stay small) with the layout's softmax module. Subclasses add score terms
    through `head_queries` (both layouts' variants written side by side) and `step` (streaming)."""

    def __init__(self, d_model, n_heads, dropout=0.0, layout=TRAINING):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.channels_first = layout.channels_first
        self.query = layout.linear(d_model, d_model)
        self.key = layout.linear(d_model, d_model)
        self.value = layout.linear(d_model, d_model)
        self.out = layout.linear(d_model, d_model)
        if layout.channels_first:
            self.softmax = layout.softmax()  # explicit, pluggable (inference: no attention dropout)
        else:
            self.dropout = Dropout(dropout)  # its p: the fused kernel's off the CPU, attention_with_dropout's on it

    def split_heads(self, x):
        return rearrange(x, "b t (h d) -> b h t d", h=self.n_heads)

    def attend(self, q, k, v, mask, bias=None):
        # q: (B, H, Tq, d), k/v: (B, H, Tk, d), mask: (B, 1|Tq, Tk) True = may attend, bias: (B|1, H, Tq, Tk)
        # additive score terms (relative positions). Fused scaled-dot-product attention: one kernel instead of
        # scores, two masked fills, softmax and dropout as separate passes (measured: benchmarks/README.md).
        # A fully masked row (a padded query that sees only padding) comes out as zeros, not NaN.
        mask = mask.unsqueeze(1)  # (B, 1, 1|Tq, Tk) broadcast over heads
        p = self.dropout.p if self.training else 0.0
        if p > 0.0 and q.device.type == "cpu":
            x = attention_with_dropout(q, k, v, mask, p, bias)
        else:
            if bias is not None:
                mask = bias.masked_fill(~mask, float("-inf"))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Tq, d)
        return self.out(rearrange(x, "b h t d -> b t (h d)"))

    def forward(self, query, key, value, mask, pos_emb=None):
        # query: (B, Tq, D), key/value: (B, Tk, D); pos_emb is ignored (absolute positions are in x).
        # Channels-first: query = key = value (B, D, 1, T), mask (1, T, 1, T) or None.
        if self.channels_first:
            return self.forward_heads(query, mask, pos_emb)
        q = self.split_heads(self.query(query))  # (B, H, Tq, d)
        k, v = self.split_heads(self.key(key)), self.split_heads(self.value(value))  # (B, H, Tk, d)
        return self.attend(q, k, v, mask)

    # ------------------------------------------------------------------------------------- channels first
    def head_queries(self, q, pos):
        # q: (B, T, 1, D) -> per-head queries H x (B, T, 1, d) scaled by 1/sqrt(d), and fn(h) -> head h's additive
        # score term (B, Tq, 1, Tk) or None. The scale goes on the queries: (D, T) multiplies instead of (T, T)
        # ones per head, and smaller FP16 partial sums in the products.
        return (q * (1.0 / math.sqrt(self.d_head))).split(self.d_head, dim=3), None

    def forward_heads(self, x, mask, pos):
        # x: (B, D, 1, T); mask: (1, T, 1, T) True where query i may attend key j, or None. The native einsum's
        # left operand is channels-last: q and v turn once per layer ((D, T)-sized copies, never (T, T) ones), and
        # the heads' outputs turn back once. Scores are query-major (B, Tq, 1, Tk), softmax over dim 3.
        d = self.d_head
        q = self.query(x).transpose(1, 3)  # (B, T, 1, D)
        k = self.key(x).split(d, dim=1)  # H x (B, d, 1, T)
        v = self.value(x).transpose(1, 3).split(d, dim=3)  # H x (B, T, 1, d)
        queries, score_term = self.head_queries(q, pos)
        heads = []
        for h in range(self.n_heads):
            scores = torch.einsum("bqhc,bchk->bqhk", queries[h], k[h])  # (B, Tq, 1, Tk)
            if score_term is not None:
                scores = scores + score_term(h)
            probs = self.softmax(scores, dim=3, mask=mask)
            heads.append(torch.einsum("bqhk,bkhc->bqhc", probs, v[h]))  # (B, Tq, 1, d)
        return self.out(torch.cat(heads, dim=3).transpose(1, 3))  # (B, T, 1, D) -> (B, D, 1, T)

    # ------------------------------------------------------------------------------------------ streaming
    def cached_keys(self, h, state, left_frames):
        # h: (B, c, D) -> keys and values (B, H, L, d) of the cached frames and this chunk; the cache keeps the last
        # left_frames of them (-1 = all) in state["attn"].
        k, v = self.split_heads(self.key(h)), self.split_heads(self.value(h))  # (B, H, c, d)
        if state["attn"] is not None:
            k, v = torch.cat([state["attn"][0], k], dim=2), torch.cat([state["attn"][1], v], dim=2)
        if left_frames >= 0:
            state["attn"] = (k[:, :, k.size(2) - left_frames :], v[:, :, v.size(2) - left_frames :])
        else:
            state["attn"] = (k, v)
        return k, v

    def stream_state(self, batch, device=None):
        # the attention part of a block's streaming state: key/value cache and (relative) position cache
        return {"attn": None, "pos": None}

    def stream_step(self, h, state, left_frames, chunk_size):
        # One chunk of self-attention in eval mode. h: (B, c, D) -> (B, c, D); state["attn"]: the key/value cache
        # (B, H, L, d) x 2 of the frames seen so far: it grows with the context (left_frames = -1).
        k, v = self.cached_keys(h, state, left_frames)
        everything = torch.ones(h.size(0), 1, k.size(2), dtype=torch.bool, device=h.device)  # all cached frames
        return self.attend(self.split_heads(self.query(h)), k, v, everything)


def attention_with_dropout(q, k, v, mask, p, bias=None):
    # q: (B, H, Tq, d), k/v: (B, H, Tk, d), mask: bool (B, 1, 1|Tq, Tk) True = may attend, bias: additive float
    # score terms (B|1, H, Tq, Tk) or None -> (B, H, Tq, d). With dropout_p > 0 torch's CPU
    # scaled_dot_product_attention runs its unfused math path (scores, safe softmax, bernoulli_ dropout, product)
    # anyway; this is the same maths with the cheaper masks of models/dropout.py, the bias summed inside the score
    # product (baddbmm: no separate pass) and a plain softmax. A query row without a single key comes out as zeros,
    # not NaN (what torch's _safe_softmax does), fixed only where one exists.
    B, H, Tq, d = q.shape
    Tk = k.size(2)
    qs, kt = (q * d**-0.5).reshape(B * H, Tq, d), k.transpose(-2, -1).reshape(B * H, d, Tk)
    # Masked fills out of place: in place on a view of the product, autograd's backward rebuilds the base through
    # CopySlices (a zero fill and four more (B, H, Tq, Tk) copies). The bias is copied for baddbmm anyway (it is a
    # strided band), so the mask goes into that copy: -inf + a finite score is -inf.
    if bias is None:
        scores = torch.bmm(qs, kt).view(B, H, Tq, Tk).masked_fill(~mask, float("-inf"))
    else:
        bias = bias.masked_fill(~mask, float("-inf")).expand(B, H, Tq, Tk).reshape(B * H, Tq, Tk)
        scores = torch.baddbmm(bias, qs, kt).view(B, H, Tq, Tk)
    probs = torch.softmax(scores, -1)
    alive = mask.any(-1, keepdim=True)  # (B, 1, 1|Tq, 1): False for rows the mask leaves empty
    if not known_all(alive):
        probs = probs.masked_fill(~alive, 0.0)
    return torch.matmul(dropout(probs, p), v)


def rel_shift(x):
    # x: (B, H, T, 2T-1) with column k = relative position (T-1) - k  ->  (B, H, T, T) with [i, j] = position i-j.
    # Row i needs columns T-1-i .. 2T-2-i, a diagonal band: a strided view reads it without copying (the
    # pad-and-reshape trick of Transformer-XL computes the same band with two copies of the score tensor).
    return rel_band(x, x.size(2))


def rel_band(x, L):
    # x: (B, H, c, L+c-1) scores against relative positions L-1 .. -(c-1) (column k = position L-1-k) of c queries
    # that follow L-c cached frames -> (B, H, c, L) with [i, j] = position (L-c+i) - j. rel_shift is the case L = c.
    x = x.contiguous()
    B, H, c, P = x.shape
    s = x.stride()
    return x.as_strided((B, H, c, L), (s[0], s[1], s[2] - s[3], s[3]), x.storage_offset() + s[3] * (c - 1))


def position_scores(q_v, p, max_blocks=4, min_rows=256):
    # q_v: (B, T, H, d) position queries, p: (H, d, 2T-1) projected embeddings, column k = relative position T-1-k
    # -> (B, H, T, T) with [i, j] = q_v[i] . p[i - j]. The embeddings are shared by the batch, so each head's queries
    # of every utterance go into one product, (H, B*c, d) @ (H, d, c+T-1), and the band of positions i - j is a
    # strided view (rel_band). Query rows a .. b-1 read only positions b-1 .. a-(T-1), so in up to `max_blocks` row
    # blocks (of at least `min_rows` product rows each) the products skip part of the 2T-1 columns: 4 blocks compute
    # (T + T/4) / (2T - 1), ~63%, of them and their backward scatters into as much less. Measured on 2 threads for
    # (16, 149) forward + backward: the three products 8.0 -> 3.7 ms; at batch 1 one product stays fastest.
    B, T, H, d = q_v.shape
    blocks = max(1, min(max_blocks, B * T // min_rows, T))
    size = -(-T // blocks)
    bands = []
    for a in range(0, T, size):
        b = min(a + size, T)
        rows = rearrange(q_v[:, a:b], "b t h d -> h (b t) d")  # (H, B*c, d)
        scores = torch.bmm(rows, p[:, :, T - b : 2 * T - 1 - a])  # (H, B*c, T+c-1): positions b-1 .. a-(T-1)
        bands.append(rel_band(scores.view(H, B, b - a, T + b - a - 1), T))  # (H, B, c, T)
    return (bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)).transpose(0, 1)


def rel_shift_query_major(x):
    # x: (B, T, 1, 2T-1), column c = relative position (T-1) - c  ->  (B, T, 1, T) with [i, j] = position i - j.
    # The channels-first form (Core ML has no as_strided): with every row padded to 2T entries, element
    # (i, T-1-i+j) sits at flat index (T-1) + i(2T-1) + j, so dropping the first T-1 entries and the last one leaves
    # T rows of width 2T-1 whose first T columns are the band. Pad, reshape and slice only; valid for every T.
    B, T = x.size(0), x.size(1)
    x = F.pad(x, (0, 1)).flatten(1)[:, T - 1 : -1]  # (B, T(2T-1))
    return x.reshape(B, T, 1, 2 * T - 1)[..., :T]


class RelPositionMultiHeadAttention(MultiHeadAttention):
    """score(i, j) = ((q_i + u) k_j + (q_i + v) W_p p_{i-j}) / sqrt(d) (Transformer-XL)."""

    def __init__(self, d_model, n_heads, dropout=0.0, layout=TRAINING):
        super().__init__(d_model, n_heads, dropout, layout)
        self.linear_pos = layout.linear(d_model, d_model, bias=False)
        # Global content (u) and position (v) biases of Transformer-XL, one per head.
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_head))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, query, key, value, mask, pos_emb):
        # query/key/value: (B, T, D) (self-attention only), pos_emb: (1, 2T-1, D); channels-first: (1, D, 1, 2T-1)
        if self.channels_first:
            return self.forward_heads(query, mask, pos_emb)
        H, d = self.n_heads, self.d_head
        q = rearrange(self.query(query), "b t (h d) -> b t h d", h=H)
        k, v = self.split_heads(self.key(key)), self.split_heads(self.value(value))  # (B, H, T, d)
        # Position term, its 1/sqrt(d) on the queries rather than on (T, T) scores (position_scores).
        p = rearrange(self.linear_pos(pos_emb), "1 p (h d) -> h d p", h=H)  # (H, d, 2T-1)
        position = position_scores((q + self.pos_bias_v) * d**-0.5, p)  # (B, H, T, T)
        # content term q_u.k inside the fused kernel (or attention_with_dropout's product), position term as its bias
        return self.attend((q + self.pos_bias_u).transpose(1, 2), k, v, mask, bias=position)

    def biased_queries(self, q):
        # q: (B, T, H, d) -> q + u, q + v: (B, H, T, d)
        return (q + self.pos_bias_u).transpose(1, 2), (q + self.pos_bias_v).transpose(1, 2)

    def head_queries(self, q, pos):
        # q: (B, T, 1, D), pos: (1, D, 1, 2T-1) -> per-head (q + u) / sqrt(d) and the position term
        # rel_shift((q + v) p) / sqrt(d) of each head
        d, scale = self.d_head, 1.0 / math.sqrt(self.d_head)
        q_u = ((q + self.pos_bias_u.flatten()) * scale).split(d, dim=3)  # H x (B, T, 1, d)
        q_v = ((q + self.pos_bias_v.flatten()) * scale).split(d, dim=3)
        p = self.linear_pos(pos).split(d, dim=1)  # H x (1, d, 1, 2T-1)

        def position(h):  # (B, Tq, 1, 2T-1) -> (B, Tq, 1, Tk)
            return rel_shift_query_major(torch.einsum("bqhc,bchp->bqhp", q_v[h], p[h]))

        return q_u, position

    def relative_positions(self, table, L, c, chunk_size, like):
        # Projected relative-position embeddings p = linear_pos(PE) for positions L-1 .. -(c-1): (1, H, L+c-1, d),
        # and the cache they come from. They depend on no input, so the cache (positions top .. -(chunk_size-1),
        # descending) is only extended when the context grows: every position is projected once per stream.
        have = 0 if table is None else table.size(2) - (chunk_size - 1)  # positions 0 .. have-1 are cached
        if L > have:
            positions = torch.arange(L - 1, have - 1 if table is not None else -chunk_size, -1)
            new = self.split_heads(self.linear_pos(sinusoid(positions, like.size(-1)).to(like)[None]))
            table = new if table is None else torch.cat([new, table], dim=2)
        start = table.size(2) - chunk_size - (L - 1)  # row of position L-1
        return table[:, :, start : start + L + c - 1], table

    def stream_step(self, h, state, left_frames, chunk_size):
        # As MultiHeadAttention.stream_step; state["pos"] also caches the projected position embeddings.
        B, c, D = h.shape
        k, v = self.cached_keys(h, state, left_frames)
        L = k.size(2)
        everything = torch.ones(B, 1, L, dtype=torch.bool, device=h.device)
        q_u, q_v = self.biased_queries(rearrange(self.query(h), "b t (h d) -> b t h d", h=self.n_heads))
        p, state["pos"] = self.relative_positions(state["pos"], L, c, chunk_size, h)  # (1, H, L+c-1, d)
        position = rel_band(q_v @ p.transpose(-2, -1), L) / math.sqrt(self.d_head)  # (B, H, c, L)
        return self.attend(q_u, k, v, everything, bias=position)
