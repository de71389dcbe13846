"""Dropout with cheaper random masks on CPU.

torch's CPU dropout draws one Bernoulli sample per element (`aten::bernoulli_`): 19% of a default training step
(benchmarks/README.md, "Training-step profile"). The CPU generator (mt19937) produces 31 random bits per int32
draw, so one draw here makes the masks of two elements from 15 bits each: half the draws, and integer compares
instead of float Bernoulli sampling. Measured on one thread (a (40, 250, 576) activation, forward + backward):
66 ms with `F.dropout`, 32 ms with `dropout` below.

The drop probability is p rounded to a multiple of 1/32768 (0.1 -> 3277/32768 = 0.100006), and kept elements
are scaled by 1/(1 - that p), so the expected output equals the input exactly, as in `nn.Dropout`. Masks come
from torch's global CPU generator, so `torch.manual_seed` / Lightning's `seed_everything` make them
reproducible. Off the CPU (where torch's fused dropout is fast) this is `F.dropout`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 1 << 15  # 15 random bits per mask element


def keep_mask(shape: torch.Size, p: float, device=None) -> tuple[torch.Tensor, float]:
    """A bool mask of `shape` (True = keep, each element with probability 1 - p rounded to 1/32768) and the
    scale 1/(1 - p') of the kept elements."""
    n = shape.numel()
    threshold = round(p * LEVELS)
    # int32 random_() is uniform on [0, 2^31): as two int16 halves, the low one has 16 random bits, the high one 15
    # (sign bit 0); & 0x7FFF keeps 15 of each, uniform on [0, 32768).
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()
    uniform = bits.view(torch.int16)[:n].view(shape) & (LEVELS - 1)
    return uniform >= threshold, LEVELS / (LEVELS - threshold)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the masks of `keep_mask` on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(scale)  # autograd keeps the scaled mask: backward is one multiply


class Dropout(nn.Module):
    """nn.Dropout(p) with `dropout` (same interface, no state: checkpoints are unchanged)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
