"""Conformer encoder (Gulati et al. 2020) with optional DWS subsampling (Xu et al. 2023) and chunked streaming.

Block: x + 1/2 FFN -> x + MHSA -> x + Conv -> x + 1/2 FFN -> LayerNorm.

Padding never leaks into valid frames: attention masks padded keys, the convolution module zeroes padded
frames before its depthwise convolution, and the default LayerNorm in the convolution module normalises
each frame on its own. Together with the padding-free subsampling this makes an utterance's encoder output
identical whether it is encoded alone or padded inside a batch (tested).
"""

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
)
from edgeconformer.models.subsampling import Conv2dSubsampling


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
    def __init__(self, d_model, n_heads, ff_dim, kernel_size, dropout, pos="rel", causal=False, norm="layer"):
        super().__init__()
        self.ffn1 = FeedForward(d_model, ff_dim, dropout)
        self.norm_mhsa = nn.LayerNorm(d_model)
        attention = {"rel": RelPositionMultiHeadAttention, "abs": MultiHeadAttention}[pos]
        self.mhsa = attention(d_model, n_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.conv = ConvolutionModule(d_model, kernel_size, dropout, norm=norm, causal=causal)
        self.ffn2 = FeedForward(d_model, ff_dim, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, pad_mask, attn_mask, pos_emb=None):
        # x: (B, T, D), pad_mask: (B, T) True = padding, attn_mask: (B, 1|T, T) True = may attend,
        # pos_emb: (1, 2T-1, D) for relative attention, None for absolute
        x = x + 0.5 * self.ffn1(x)  # macaron: two half-step feed-forwards around attention and conv
        h = self.norm_mhsa(x)
        x = x + self.dropout(self.mhsa(h, h, h, attn_mask, pos_emb))
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


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
    ):
        super().__init__()
        if pos not in ("rel", "abs"):
            raise ValueError(f"pos must be 'rel' or 'abs', got {pos!r}")
        self.d_model = d_model
        self.chunk_size = chunk_size
        self.left_chunks = left_chunks
        self.dynamic_chunk = dynamic_chunk
        self.max_dynamic_chunk = max_dynamic_chunk

        self.subsampling = Conv2dSubsampling(idim, d_model, channels=subsampling_channels, factor=subsampling_factor,
                                             dws=dws_subsampling)
        # Relative positions enter every attention layer; absolute ones are added to x once, here.
        positional_encoding = RelPositionalEncoding if pos == "rel" else AbsolutePositionalEncoding
        self.pos_enc = positional_encoding(d_model, dropout)
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, n_heads, ff_dim, kernel_size, dropout, pos=pos, causal=causal, norm=norm)
            for _ in range(n_layers)
        )

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
        x, lengths = self.subsampling(feats, lengths)  # (B, T', D)
        x, pos_emb = self.pos_enc(x)
        T = x.size(1)

        if chunk_size is None and self.dynamic_chunk and self.training:
            chunk_size, left_chunks = self.sample_chunking(T)
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        left_chunks = self.left_chunks if left_chunks is None else left_chunks

        pad_mask = make_pad_mask(lengths, T)  # (B, T')
        attn_mask = ~pad_mask.unsqueeze(1)  # (B, 1, T') keys that exist
        if chunk_size > 0:
            attn_mask = attn_mask & chunk_attention_mask(T, chunk_size, left_chunks, x.device)  # (B, T', T')

        for block in self.blocks:
            x = block(x, pad_mask, attn_mask, pos_emb)
        return x, lengths
