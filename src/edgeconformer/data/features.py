"""Acoustic front end: log-mel filterbank, global CMVN and SpecAugment, all length-aware.

Shapes: waveforms (B, N) with lengths in samples; features (B, T, F) with lengths in frames. Frames past an
utterance's length are always 0, so a padded batch gives each utterance exactly the features it gets alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchaudio

from edgeconformer.errors import UserError

SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz
LOG_EPS = 1e-6


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def frames_for_samples(n, win_length: int = WIN_LENGTH, hop_length: int = HOP_LENGTH):
    """Frames of an `n`-sample signal without centre padding: 1 + (n - win) // hop, 0 when n < win.

    Works on ints and integer tensors.
    """
    if torch.is_tensor(n):
        return torch.where(
            n >= win_length, 1 + (n - win_length).div(hop_length, rounding_mode="floor"), torch.zeros_like(n)
        )
    return 1 + (n - win_length) // hop_length if n >= win_length else 0


class LogMelFilterbank(nn.Module):
    """log(mel power spectrogram + 1e-6) with a 25 ms Hann window and 10 ms shift.

    center=False: frame t reads samples [160 t, 160 t + 400) only, so no valid frame ever sees padding and no
    reflection padding depends on the utterance end. Nothing is normalised over time (CMVN is global).
    """

    def __init__(
        self,
        n_mels: int = 80,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = WIN_LENGTH,
        win_length: int = WIN_LENGTH,
        hop_length: int = HOP_LENGTH,
    ):
        super().__init__()
        self.n_mels, self.sample_rate = n_mels, sample_rate
        self.win_length, self.hop_length = win_length, hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            n_mels=n_mels,
            power=2.0,
            center=False,
        )

    def frames_for_samples(self, n):
        return frames_for_samples(n, self.win_length, self.hop_length)

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # waveforms: (B, N) float, lengths: (B,) samples -> feats (B, T, n_mels), frame lengths (B,)
        if waveforms.dim() != 2:
            raise ValueError(f"expected waveforms of shape (B, N), got {tuple(waveforms.shape)}")
        batch, n = waveforms.shape
        if lengths is None:
            lengths = torch.full((batch,), n, dtype=torch.long, device=waveforms.device)
        frame_lengths = self.frames_for_samples(lengths.long())
        if n < self.win_length:  # too short for a single frame; the STFT would refuse it
            return waveforms.new_zeros(batch, 0, self.n_mels, dtype=torch.float32), frame_lengths
        # Power spectra exceed fp16's range (a full-scale 400-sample frame reaches ~1e5): always fp32.
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            power = self.mel(waveforms.float())  # (B, n_mels, T)
            feats = torch.log(power + LOG_EPS).transpose(1, 2)  # (B, T, n_mels)
        mask = valid_mask(frame_lengths, feats.shape[1])
        return feats.masked_fill(~mask[:, :, None], 0.0), frame_lengths


class GlobalCMVN(nn.Module):
    """(x - mean) / std per feature bin, with stats from the train split; padding frames stay 0.

    mean and inv_std are buffers, so they travel with the model's state_dict and any export of it.
    """

    def __init__(
        self,
        n_feats: int = 80,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        min_std: float = 1e-5,
    ):
        super().__init__()
        self.min_std = min_std
        self.register_buffer("mean", torch.zeros(n_feats))
        self.register_buffer("inv_std", torch.ones(n_feats))
        if mean is not None or std is not None:
            self.set_stats(mean, std)

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if mean.shape != self.mean.shape or std.shape != self.mean.shape:
            raise ValueError(
                f"CMVN stats of shape {tuple(mean.shape)}/{tuple(std.shape)} do not match "
                f"{self.mean.numel()} feature bins"
            )
        self.mean.copy_(mean.to(self.mean))
        # A constant bin (e.g. an empty mel band) has std 0; the floor keeps it finite instead of inf.
        self.inv_std.copy_(1.0 / std.to(self.inv_std).clamp(min=self.min_std))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # feats: (B, T, F), lengths: (B,) frames
        x = (feats - self.mean) * self.inv_std
        return x.masked_fill(~valid_mask(lengths, feats.shape[1])[:, :, None], 0.0)


def cmvn_stats(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-bin mean and (population) std over all frames of `feats` [(T_i, F)], accumulated in float64 so
    the result depends only on the frames and their order, not on batching; returned as float32."""
    if not feats or sum(f.size(0) for f in feats) == 0:
        raise UserError(
            "no feature frames to compute CMVN statistics from: the training manifest is empty or "
            "every utterance is shorter than one analysis window"
        )
    total = torch.zeros(feats[0].size(1), dtype=torch.float64)
    squares = torch.zeros_like(total)
    n = 0
    for f in feats:
        f = f.double()
        total += f.sum(0)
        squares += (f * f).sum(0)
        n += f.size(0)
    mean = total / n
    std = (squares / n - mean * mean).clamp(min=1e-10).sqrt()  # rounding can push a constant bin below 0
    return mean.float(), std.float()


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al. 2019) applied in training only; identity in eval mode.

    Per utterance: `num_freq_masks` bands of width U[0, freq_mask_param] bins and `num_time_masks` spans of width
    U[0, min(time_mask_param, max_time_ratio * length)] frames, all inside the utterance's valid frames, so a short
    utterance loses at most `max_time_ratio` of its frames per mask and padding is never touched. Masked values
    are set to `mask_value` (0 = the global mean when applied after CMVN).
    """

    def __init__(
        self,
        freq_mask_param: int = 27,
        num_freq_masks: int = 2,
        time_mask_param: int = 40,
        num_time_masks: int = 2,
        max_time_ratio: float = 0.2,
        mask_value: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= max_time_ratio <= 1.0:
            raise ValueError(f"max_time_ratio must be in [0, 1], got {max_time_ratio}")
        self.freq_mask_param, self.num_freq_masks = freq_mask_param, num_freq_masks
        self.time_mask_param, self.num_time_masks = time_mask_param, num_time_masks
        self.max_time_ratio, self.mask_value = max_time_ratio, mask_value

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        # feats: (B, T, F), lengths: (B,) frames. Without a generator the global RNG is used (seeded by the trainer).
        if not self.training:
            return feats
        batch, frames, bins = feats.shape
        # Every random number is drawn on the generator's device (CPU by default), so a seed gives the same masks
        # whatever device the features live on; the masks are then built on the features' device.
        rng = generator.device if generator is not None else torch.device("cpu")
        lengths_r = lengths.to(rng).long()
        valid = valid_mask(lengths.to(feats.device), frames)  # (B, T)
        drop = torch.zeros(batch, frames, bins, dtype=torch.bool, device=feats.device)
        if self.num_freq_masks > 0:
            high = torch.full((batch, self.num_freq_masks), min(self.freq_mask_param, bins), device=rng)
            width = _uniform_int(high, generator)  # (B, nF)
            start = _uniform_int(bins - width, generator)
            band = _spans(start, width, bins, feats.device)  # (B, F)
            drop |= band[:, None, :] & valid[:, :, None]
        if self.num_time_masks > 0:
            cap = (lengths_r.double() * self.max_time_ratio).floor().long().clamp(max=self.time_mask_param)
            width = _uniform_int(cap[:, None].expand(batch, self.num_time_masks), generator)  # (B, nT)
            start = _uniform_int(lengths_r[:, None] - width, generator)
            span = _spans(start, width, frames, feats.device) & valid  # (B, T)
            drop |= span[:, :, None]
        return feats.masked_fill(drop, self.mask_value)


def _uniform_int(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, n) inclusive upper bounds (negative ones clamp to 0) -> (B, n) integers uniform in [0, high]."""
    high = high.long().clamp(min=0)
    u = torch.rand(high.shape, generator=generator, device=high.device, dtype=torch.float64)
    return (u * (high + 1)).floor().long().minimum(high)


def _spans(start: torch.Tensor, width: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """(B, n) starts and widths -> (B, size) bool, True inside any of the n spans [start, start + width)."""
    pos = torch.arange(size, device=device)[None, None, :]
    start, width = start.to(device)[:, :, None], width.to(device)[:, :, None]
    return ((pos >= start) & (pos < start + width)).any(1)
