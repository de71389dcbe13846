"""Attention state of a streaming encoder, by formula: the bytes one streaming step reads after `seconds` of audio.

Botros et al. 2023 make a streaming Conformer fast by cutting the state its attention layers read at every step.
This module counts that state without running the model (so paper sizes on the meta device cost nothing), for the
streamed part only: a cascade's first pass, the whole encoder otherwise (ConformerEncoder.stream_blocks). After
T' encoder frames have been streamed (every frame of `seconds`, the last partial chunk included, i.e. `stream(...,
final=True)`), a block of width D holds, in float32 (4 bytes), batch 1:

* softmax attention: keys and values of the cached frames, 2 x L x D x 4 bytes with L = T' (unlimited left
  context) or the last left_chunks x chunk_size frames: grows linearly with the audio;
* relative positions (softmax, pos="rel"): the projected position embeddings, reported apart as `positions`
  (they depend on no input and are projected once per stream): one D-vector per relative position
  top .. -(chunk_size - 1), where top + 1 is the longest context a step attended to, (L_max + c - 1) x D x 4;
* Performer attention: the (S, z) sums, H x m x (d_head + 1) x 4 bytes, whatever the context;
* convolution-only blocks: no attention state;
* every streamed block: its causal convolution's cache, (kernel_size - 1) x D x 4 bytes, reported as `conv`.

The figures equal ConformerEncoder.stream_state_bytes of a real streamed state (tested).
"""

from __future__ import annotations

from edgeconformer.models.attention import RelPositionMultiHeadAttention
from edgeconformer.models.conformer import ConformerBlock
from edgeconformer.models.performer import PerformerAttention

FLOAT32 = 4  # bytes per value: streaming states are float32 (PerformerAttention.init_state, the caches)


def chunk_lengths(frames: int, chunk_size: int) -> list[int]:
    # Encoder frames per streaming step: whole chunks, then the last partial one (released by final=True).
    return [min(chunk_size, frames - s) for s in range(0, frames, chunk_size)]


def context_frames(frames: int, chunk_size: int, left_frames: int) -> tuple[int, int]:
    """(key/value frames cached after the last step, longest context a step attended to) for `frames` encoder
    frames streamed in chunks of `chunk_size`; left_frames = -1: all past frames are kept."""
    cached, longest = 0, 0
    for c in chunk_lengths(frames, chunk_size):
        longest = max(longest, cached + c)  # a step attends to the cache and its own chunk
        cached = cached + c if left_frames < 0 else min(cached + c, left_frames)  # trimmed after the step
    return cached, longest


def block_state_bytes(block, frames: int, chunk_size: int, left_frames: int) -> dict:
    """{"kind", "attention", "positions", "conv"} bytes of one streamed block after `frames` encoder frames."""
    d = block.conv.pointwise_out.in_features  # the block's width D
    out = {
        "kind": "conv_only",
        "attention": 0,
        "positions": 0,
        "conv": (block.conv.kernel_size - 1) * d * FLOAT32,
    }  # cache (1, D, kernel_size - 1)
    if not isinstance(block, ConformerBlock):
        return out
    if isinstance(block.mhsa, PerformerAttention):
        return dict(out, kind="performer", attention=block.mhsa.state_bytes(batch=1))  # (1, H, m, d) + (1, H, m)
    cached, longest = context_frames(frames, chunk_size, left_frames)
    out.update(kind="softmax", attention=2 * cached * d * FLOAT32)  # K and V: (1, H, L, d_head) each, H d_head = D
    if isinstance(block.mhsa, RelPositionMultiHeadAttention) and longest > 0:
        out["positions"] = (longest + chunk_size - 1) * d * FLOAT32  # (1, H, L_max + c - 1, d_head)
    return out


def attention_state_bytes(
    model,
    seconds: float,
    frame_shift_s: float = 0.01,
    chunk_size: int | None = None,
    left_chunks: int | None = None,
    per_block: bool = True,
) -> dict:
    """Streaming state after `seconds` of audio of `model` (an ASR model with .encoder, or a ConformerEncoder).

    Returns seconds, encoder_frames (T'), chunk_size and left_chunks used (default: the encoder's own),
    streamable (the encoder can stream as built: causal convolutions and chunk_size > 0), blocks (streamed blocks),
    attention (key/value caches or Performer sums), positions (projected relative positions), conv (convolution
    caches), all in bytes, and per_block rows {block, kind, attention, positions, conv}.

    A model built without chunks (chunk_size 0, e.g. an offline model) is counted as if streamed frame by frame
    (chunk_size 1, full left context): what it would hold if it were streamed; `streamable` says it is not."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    encoder = getattr(model, "encoder", model)
    blocks = encoder.stream_blocks()
    built_chunk = encoder.chunk_size if chunk_size is None else chunk_size
    chunk = max(built_chunk, 1)
    left_chunks = encoder.left_chunks if left_chunks is None else left_chunks
    left_frames = left_chunks * chunk if left_chunks >= 0 else -1
    frames = int(encoder.subsampling.subsample_lengths(int(round(seconds / frame_shift_s))))
    rows = [dict(block=i, **block_state_bytes(b, frames, chunk, left_frames)) for i, b in enumerate(blocks)]
    result = {
        "seconds": seconds,
        "encoder_frames": frames,
        "chunk_size": chunk,
        "left_chunks": left_chunks,
        "streamable": built_chunk > 0 and all(b.conv.causal for b in blocks),
        "blocks": len(blocks),
        **{key: sum(r[key] for r in rows) for key in ("attention", "positions", "conv")},
    }
    if per_block:
        result["per_block"] = rows
    return result
