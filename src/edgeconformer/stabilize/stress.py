"""Stress case for post-training stabilization: the same function, a residual stream `gain` times larger.

LayerNorm is scale invariant, LN(g x; eps) = LN(x; eps / g^2), so a trained Conformer (models/conformer.py) can
be rescaled without retraining such that every block's residual stream is g times larger while the FP32 output
stays the same up to LayerNorm's eps:

* subsampling.out (weight and bias) x g: block 0 receives g x (the relative positional encoding only multiplies
  x by sqrt(D), a linear map; the position embeddings enter attention after a LayerNorm).
* in every block, the last layer of each residual branch x g: ffn1.down, mhsa.out (absent in convolution-only
  blocks), conv.pointwise_out, ffn2.down. Every branch starts with a LayerNorm of the (g times larger) stream, so
  its output scales by g exactly when its last affine layer does, and x + f(x) stays g times the original.
* the final `norm` (weight and bias) of every block x g: LN(g x) = LN(x), and the scaled affine makes the next
  block's input g times larger. Except where the encoder's output is read: the last block, and the last
  first-pass block of a cascaded encoder (its output is the first-pass result); their norms are left alone, so
  the encoder outputs (and the CTC head and attention decoder) are unchanged.
* a width projection in front of block i (`encoder.projections`, nn.Linear): W (g x) + g b = g (W x + b), so only
  its bias is scaled when its input is already g times larger, weight and bias when it is not (after a cascade's
  first pass). Second-pass blocks without a projection in front receive the unscaled first-pass output and keep
  their weights.

Real models drift there on their own (long training, large learning rates); the stress case makes the FP16
overflow of an unstabilized LayerNorm reproducible on any trained model, and shows that the pre-normalizer
removes it (docs/stabilization.md section 6).
"""

from __future__ import annotations

import copy
import math

import torch

from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.attention import RelPositionalEncoding

# The last affine layer of each residual branch of a ConformerBlock (names in models/conformer.py).
BRANCH_OUTPUTS = ("ffn1.down", "mhsa.out", "conv.pointwise_out", "ffn2.down")


def _scale_(module, gain):
    if module.weight is None:
        raise ValueError(f"{module}: has no weight to scale (a LayerNorm without elementwise_affine?)")
    with torch.no_grad():
        module.weight.mul_(gain)
        if module.bias is not None:
            module.bias.mul_(gain)


def _scale_bias_(module, gain):
    if module.bias is not None:
        with torch.no_grad():
            module.bias.mul_(gain)


def scale_activations(asr: DualDecoderASR, gain: float) -> DualDecoderASR:
    """A deep copy of `asr` whose residual stream inside every Conformer block is `gain` times larger, with the
    same FP32 outputs up to LayerNorm's eps (no retraining). gain > 0; the original is not modified."""
    if not isinstance(asr, DualDecoderASR):
        hint = " (an ASRModule? pass module.model)" if hasattr(asr, "model") else ""
        raise ValueError(f"scale_activations needs a DualDecoderASR, got {type(asr).__name__}{hint}")
    gain = float(gain)
    if not gain > 0 or gain == float("inf"):
        raise ValueError(f"gain must be a finite number > 0, got {gain}")
    if not isinstance(asr.encoder.pos_enc, RelPositionalEncoding):
        # x * sqrt(D) + PE(t): the added table would not be scaled, so block 0 would not see g x.
        raise ValueError(
            "scale_activations needs relative positional encoding (model.encoder.pos=rel): the "
            "absolute encoding adds an unscaled position table to the residual stream"
        )
    scaled = copy.deepcopy(asr)
    enc = scaled.encoder
    blocks = enc.blocks
    projections = getattr(enc, "projections", {})
    first_pass = getattr(enc, "first_pass_layers", 0)
    exits = {len(blocks) - 1} | ({first_pass - 1} if first_pass else set())  # blocks whose output is read
    _scale_(enc.subsampling.out, gain)
    stream_scaled = True  # is the residual stream entering the next block g times larger?
    for i, block in enumerate(blocks):
        projection = projections[str(i)] if str(i) in projections else None
        if projection is not None:
            if stream_scaled:
                _scale_bias_(projection, gain)
            else:
                _scale_(projection, gain)
            stream_scaled = True
        if not stream_scaled:
            continue
        modules = dict(block.named_modules())
        for name in BRANCH_OUTPUTS:
            if name in modules:
                _scale_(modules[name], gain)
        if i in exits:
            stream_scaled = False
        else:
            _scale_(block.norm, gain)
    return scaled


def safe_gain(report: dict, margin_bits: float = 1.0, max_gain: float = 512.0) -> float:
    """The largest power of two <= max_gain that keeps the peak activation of an audit (stabilize/audit.py) of the
    unscaled model `margin_bits` below the format's max once multiplied by it. Conservative: the audited peak also
    covers activations the scaling leaves alone (inside the branches). A pre-normalizer protects LayerNorm's sum
    of squares, not the residual stream itself; beyond this gain the stream overflows whatever the LayerNorm."""
    headroom = report["summary"]["worst_activation"]["headroom_bits"]
    if headroom is None:
        raise ValueError("safe_gain: the audit saw no finite nonzero activation; audit the model on real utterances")
    bits = math.floor(headroom - margin_bits)
    if bits < 0:
        raise ValueError(
            f"safe_gain: the unscaled model has only {headroom:.2f} bits of headroom "
            f"(margin {margin_bits}); it needs no stress to overflow"
        )
    return min(2.0**bits, float(max_gain))
