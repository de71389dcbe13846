"""Pre-LN Transformer attention decoder (the attention branch of the hybrid CTC/attention model).

Input token sequences start with <sos>; position u predicts token u+1 (the last prediction is <eos>).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.models.attention import AbsolutePositionalEncoding, MultiHeadAttention, make_pad_mask
from edgeconformer.models.dropout import Dropout


class DecoderLayer(nn.Module):
    def __init__(self, d_model, n_heads, ff_dim, dropout):
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.ReLU(), Dropout(dropout), nn.Linear(ff_dim, d_model))
        self.dropout = Dropout(dropout)

    def forward(self, x, self_mask, memory, memory_mask):
        # x: (B, U, D), self_mask: (B, U, U), memory: (B, T, D), memory_mask: (B, 1, T); True = may attend
        h = self.norm_self(x)
        x = x + self.dropout(self.self_attn(h, h, h, self_mask))
        h = self.norm_cross(x)
        x = x + self.dropout(self.cross_attn(h, memory, memory, memory_mask))
        return x + self.dropout(self.ff(self.norm_ff(x)))


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size, d_model=256, n_heads=4, ff_dim=2048, n_layers=6, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_enc = AbsolutePositionalEncoding(d_model, dropout)
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_heads, ff_dim, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, memory, memory_lengths, ys_in, ys_lengths):
        # memory: (B, T, D) encoder output, ys_in: (B, U) <sos>-prefixed tokens (any valid id as padding)
        # -> (B, U, V) log-probabilities of the next token at every position
        U = ys_in.size(1)
        causal = torch.ones(U, U, dtype=torch.bool, device=ys_in.device).tril()  # token u sees tokens <= u
        self_mask = ~make_pad_mask(ys_lengths, U).unsqueeze(1) & causal  # (B, U, U)
        memory_mask = ~make_pad_mask(memory_lengths, memory.size(1)).unsqueeze(1)  # (B, 1, T)

        x, _ = self.pos_enc(self.embed(ys_in))  # (B, U, D)
        for layer in self.layers:
            x = layer(x, self_mask, memory, memory_mask)
        return F.log_softmax(self.out(self.norm(x)), dim=-1)

    @torch.no_grad()
    def step(self, memory, prefixes, prefix_lengths=None, memory_lengths=None):
        # memory: (1|N, T, D), prefixes: (N, U) <sos>-prefixed, right-padded to the longest prefix
        # -> (N, V) log-probs of the token following each prefix. The whole prefix is recomputed every
        # step: simpler than a key/value cache, and decoding cost is dominated by the encoder anyway.
        N, U = prefixes.shape
        memory = memory.expand(N, -1, -1)
        if prefix_lengths is None:
            prefix_lengths = torch.full((N,), U, dtype=torch.long, device=prefixes.device)
        if memory_lengths is None:
            memory_lengths = torch.full((N,), memory.size(1), dtype=torch.long, device=memory.device)
        memory_lengths = memory_lengths.expand(N)
        log_probs = self.forward(memory, memory_lengths, prefixes, prefix_lengths)  # (N, U, V)
        # The causal mask makes the output at the last real token independent of the right padding.
        return log_probs[torch.arange(N, device=prefixes.device), prefix_lengths - 1]
