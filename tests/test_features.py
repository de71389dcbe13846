import numpy as np
import pytest
import torch

from conftest import write_flac
from edgeconformer.data.features import GlobalCMVN, LogMelFilterbank, SpecAugment, cmvn_stats, frames_for_samples
from edgeconformer.errors import UserError


@pytest.fixture(scope="module")
def fbank():
    return LogMelFilterbank(n_mels=80).eval()


@pytest.fixture
def rows(tmp_path):
    # 4 short noise+tone files of different lengths, as manifest rows
    out = []
    for i, seconds in enumerate([0.5, 0.83, 0.31, 1.2]):
        path = write_flac(tmp_path / f"1-2-{i:04d}.flac", seconds=seconds, seed=i)
        out.append(
            {
                "id": f"1-2-{i:04d}",
                "audio_filepath": str(path),
                "duration": seconds,
                "text": "A B",
                "speaker": "1",
                "chapter": "2",
            }
        )
    return out


# ---------------------------------------------------------------- filterbank


@pytest.mark.parametrize("n", [0, 399, 400, 401, 559, 560, 561, 8000, 16001])
def test_frame_count_formula(fbank, n):
    expected = 1 + (n - 400) // 160 if n >= 400 else 0
    assert frames_for_samples(n) == expected
    assert fbank.frames_for_samples(torch.tensor([n])).item() == expected
    feats, lengths = fbank(torch.randn(1, n))
    assert feats.shape == (1, expected, 80)
    assert lengths.tolist() == [expected]


def test_fbank_batch_equals_single(fbank):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16000, 7013, 400, 12345])
    waves = [0.1 * torch.randn(int(n), generator=g) for n in lengths]
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    batch[1, len(waves[1]) :] = 5.0  # garbage in the padding must not leak into valid frames
    feats, frame_lengths = fbank(batch, lengths)
    assert feats.shape == (4, frames_for_samples(16000), 80)
    for i, w in enumerate(waves):
        single, single_len = fbank(w[None])
        assert frame_lengths[i] == single_len[0] == single.shape[1]
        torch.testing.assert_close(feats[i, : single.shape[1]], single[0], atol=1e-5, rtol=0)
        assert (feats[i, single.shape[1] :] == 0).all()


def test_fbank_is_fp32_under_autocast(fbank):
    wave = torch.randn(2, 4000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = fbank(wave)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, fbank(wave)[0])


# ---------------------------------------------------------------- CMVN


def _frames(fbank, rows):
    return [fbank(torch.from_numpy(_read(r))[None])[0][0] for r in rows]  # [(T_i, F)], no padding


def test_cmvn_stats_match_numpy(fbank, rows):
    feats = _frames(fbank, rows)
    mean, std = cmvn_stats(feats)
    frames = np.concatenate([f.double().numpy() for f in feats])
    assert frames.shape[0] == sum(frames_for_samples(len(_read(r))) for r in rows)
    np.testing.assert_allclose(mean.numpy(), frames.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), frames.std(0), rtol=1e-5, atol=1e-6)
    # independent of how the frames are split into utterances
    merged = cmvn_stats([torch.cat(feats)])
    assert torch.equal(mean, merged[0]) and torch.equal(std, merged[1])


def _read(row):
    import soundfile as sf

    return sf.read(row["audio_filepath"], dtype="float32")[0]


def test_cmvn_normalises_valid_frames_and_keeps_padding(fbank, rows):
    mean, std = cmvn_stats(_frames(fbank, rows))
    cmvn = GlobalCMVN(80, mean, std)
    waves = [torch.from_numpy(_read(r)) for r in rows]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    feats, flen = fbank(batch, lengths)
    x = cmvn(feats, flen)
    valid = torch.arange(x.shape[1])[None] < flen[:, None]
    frames = x[valid].double()  # (sum T, F)
    assert frames.mean(0).abs().max() < 1e-4
    assert (frames.var(0, unbiased=False) - 1).abs().max() < 1e-3
    assert (x[~valid] == 0).all()


def test_cmvn_buffers_in_state_dict(tmp_path):
    mean, std = torch.randn(80).double(), torch.rand(80).double() + 0.5
    cmvn = GlobalCMVN(80, mean, std)
    assert set(cmvn.state_dict()) == {"mean", "inv_std"}
    fresh = GlobalCMVN(80)
    fresh.load_state_dict(cmvn.state_dict())
    x = torch.randn(2, 5, 80)
    torch.testing.assert_close(fresh(x, torch.tensor([5, 3])), cmvn(x, torch.tensor([5, 3])))
    # a zero-variance bin stays finite
    assert torch.isfinite(GlobalCMVN(80, mean, torch.zeros(80))(x, torch.tensor([5, 5]))).all()


def test_cmvn_stats_error_on_empty(fbank):
    with pytest.raises(UserError, match="no feature frames"):
        cmvn_stats([])
    with pytest.raises(UserError, match="no feature frames"):
        cmvn_stats([torch.zeros(0, 80)])


# ---------------------------------------------------------------- SpecAugment


def test_specaugment_identity_in_eval():
    aug = SpecAugment().eval()
    x = torch.randn(3, 50, 80)
    assert torch.equal(aug(x, torch.tensor([50, 30, 10])), x)


def test_specaugment_masks_only_valid_frames():
    aug = SpecAugment(
        freq_mask_param=10, num_freq_masks=2, time_mask_param=20, num_time_masks=3, max_time_ratio=0.3
    ).train()
    lengths = torch.tensor([100, 60, 7, 0])
    x = torch.ones(4, 100, 40)  # ones in the padding too: nothing may change there
    masked_any = False
    for seed in range(20):
        y = aug(x, lengths, generator=torch.Generator().manual_seed(seed))
        for b, n in enumerate(lengths.tolist()):
            assert (y[b, n:] == 1).all()
        masked_any |= bool((y == 0).any())
    assert masked_any


def test_specaugment_widths_respect_caps():
    lengths = torch.tensor([200, 10])
    x = torch.ones(2, 200, 40)
    time_only = SpecAugment(num_freq_masks=0, time_mask_param=15, num_time_masks=1, max_time_ratio=0.2).train()
    freq_only = SpecAugment(freq_mask_param=6, num_freq_masks=1, num_time_masks=0).train()
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        y = time_only(x, lengths, generator=g)
        masked_frames = (y == 0).all(-1).sum(1)  # (B,)
        assert masked_frames[0] <= 15 and masked_frames[1] <= 2  # 0.2 x 10 frames for the short utterance
        y = freq_only(x, lengths, generator=g)
        masked_bins = (y[:, 0] == 0).sum(-1)
        assert (masked_bins <= 6).all()


def test_specaugment_deterministic_for_seed():
    aug = SpecAugment().train()
    x, lengths = torch.randn(4, 300, 80), torch.tensor([300, 250, 120, 40])
    a = aug(x, lengths, generator=torch.Generator().manual_seed(7))
    b = aug(x, lengths, generator=torch.Generator().manual_seed(7))
    c = aug(x, lengths, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = aug(x, lengths)
    torch.manual_seed(3)
    assert torch.equal(d, aug(x, lengths))
