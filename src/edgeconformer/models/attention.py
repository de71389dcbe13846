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


def make_pad_mask(lengths, max_len=None):
    # (B,) -> (B, T), True at padded frames
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


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


class AbsolutePositionalEncoding(nn.Module):
    """x * sqrt(D) + PE(t); returns (x, None) so it is interchangeable with the relative variant."""

    def __init__(self, d_model, dropout=0.0, max_len=5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        # Precomputed in fp32 (sin of large arguments is inaccurate in fp16); not saved in checkpoints.
        self.register_buffer("pe", sinusoid(torch.arange(max_len), d_model), persistent=False)

    def forward(self, x, offset=0):
        # x: (B, T, D); offset shifts positions, e.g. for the decoder's incremental steps
        T = x.size(1)
        if offset + T > self.pe.size(0):
            self.pe = sinusoid(torch.arange(offset + T), self.d_model).to(self.pe.device)
        x = x * self.xscale + self.pe[offset : offset + T].to(x.dtype)
        return self.dropout(x), None


class RelPositionalEncoding(nn.Module):
    """Scales x and returns embeddings of the relative positions T-1, T-2, ..., -(T-1): (1, 2T-1, D)."""

    def __init__(self, d_model, dropout=0.0, max_len=5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
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
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x):
        return rearrange(x, "b t (h d) -> b h t d", h=self.n_heads)

    def attend(self, q, k, v, mask, bias=None):
        # q: (B, H, Tq, d), k/v: (B, H, Tk, d), mask: (B, 1|Tq, Tk) True = may attend, bias: (B|1, H, Tq, Tk)
        # additive score terms (relative positions). Fused scaled-dot-product attention: one kernel instead of
        # scores, two masked fills, softmax and dropout as separate passes (measured: benchmarks/README.md).
        # A fully masked row (a padded query that sees only padding) comes out as zeros, not NaN.
        mask = mask.unsqueeze(1)  # (B, 1, 1|Tq, Tk) broadcast over heads
        if bias is not None:
            mask = bias.masked_fill(~mask, float("-inf"))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout.p if self.training else 0.0)  # (B, H, Tq, d)
        return self.out(rearrange(x, "b h t d -> b t (h d)"))

    def forward(self, query, key, value, mask, pos_emb=None):
        # query: (B, Tq, D), key/value: (B, Tk, D); pos_emb is ignored (absolute positions are in x)
        q = self.split_heads(self.query(query))  # (B, H, Tq, d)
        k, v = self.split_heads(self.key(key)), self.split_heads(self.value(value))  # (B, H, Tk, d)
        return self.attend(q, k, v, mask)


def rel_shift(x):
    # x: (B, H, T, 2T-1) with column k = relative position (T-1) - k  ->  (B, H, T, T) with [i, j] = position i-j.
    # Row i needs columns T-1-i .. 2T-2-i, a diagonal band: a strided view reads it without copying (the
    # pad-and-reshape trick of Transformer-XL computes the same band with two copies of the score tensor).
    x = x.contiguous()
    B, H, T, P = x.shape
    s = x.stride()
    return x.as_strided((B, H, T, T), (s[0], s[1], s[2] - s[3], s[3]), x.storage_offset() + s[3] * (T - 1))


class RelPositionMultiHeadAttention(MultiHeadAttention):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__(d_model, n_heads, dropout)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        # Global content (u) and position (v) biases of Transformer-XL, one per head.
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_head))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, query, key, value, mask, pos_emb):
        # query/key/value: (B, T, D) (self-attention only), pos_emb: (1, 2T-1, D)
        q = rearrange(self.query(query), "b t (h d) -> b t h d", h=self.n_heads)
        k, v = self.split_heads(self.key(key)), self.split_heads(self.value(value))  # (B, H, T, d)
        p = self.split_heads(self.linear_pos(pos_emb))  # (1, H, 2T-1, d)

        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        # content term q_u.k inside the fused kernel, position term q_v.p as its additive bias
        position = rel_shift(q_v @ p.transpose(-2, -1)) / math.sqrt(self.d_head)  # (B, H, T, 2T-1) -> (B, H, T, T)
        return self.attend(q_u, k, v, mask, bias=position)
