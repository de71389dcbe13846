"""The statistics behind every comparison: mean +- sd over seeds and the paired two-level bootstrap CI, checked
against numpy/scipy and for coverage on synthetic data whose true difference is known."""

import numpy as np
import pytest

from edgeconformer.stats import compare, corpus_rate, mean_sd, paired_bootstrap, verdict


def test_mean_sd_is_numpys_sample_statistics_and_skips_missing_values():
    mean, sd = mean_sd([30.0, 32.0, None, 34.5, float("nan")])
    assert mean == pytest.approx(np.mean([30, 32, 34.5])) and sd == pytest.approx(np.std([30, 32, 34.5], ddof=1))
    assert mean_sd([3.0]) == (3.0, None) and mean_sd([]) == (None, None)


def test_verdicts_follow_the_side_of_zero_the_interval_is_on():
    assert verdict(-2.0, -0.1) == "better" and verdict(0.1, 3.0) == "worse"
    assert verdict(-1.0, 1.0) == "not distinguishable at this budget"


def synthetic(rng, k, n, p_a, p_b, sd_seed, sd_utt=0.1, shared_seeds=False):
    """Errors of two systems on the same n utterances: utterance difficulty shared by both (the pairing), a random
    offset per seed, binomial errors. The true corpus-WER difference is 100 * (p_a - p_b) (no clipping at these
    rates)."""
    words = rng.poisson(15, n) + 1
    difficulty = rng.normal(0, sd_utt, n)
    offsets = rng.normal(0, sd_seed, (k, 1))

    def side(p, off):
        return rng.binomial(words, np.clip(p + off + difficulty, 0.0, 1.0))

    return side(p_a, offsets if shared_seeds else rng.normal(0, sd_seed, (k, 1))), side(p_b, offsets), words


def test_the_point_estimate_is_the_difference_of_seed_means_of_corpus_wers():
    rng = np.random.default_rng(0)
    a, b, words = synthetic(rng, 3, 50, 0.3, 0.2, 0.02)
    diff, lo, hi = paired_bootstrap(a, b, words, paired_seeds=False, resamples=500)
    assert diff == pytest.approx(corpus_rate(a, words).mean() - corpus_rate(b, words).mean())
    assert lo < diff < hi


def test_one_seed_per_side_agrees_with_scipys_paired_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b, words = synthetic(rng, 1, 150, 0.30, 0.27, 0.0)

    def stat(ea, eb, w, axis=-1):  # corpus WER difference of a resample (scipy resamples the three together)
        return 100 * (ea.sum(axis) - eb.sum(axis)) / w.sum(axis)

    ref = scipy_stats.bootstrap(
        (a[0], b[0], words), stat, paired=True, vectorized=True, n_resamples=20000, method="percentile", random_state=2
    ).confidence_interval
    _, lo, hi = paired_bootstrap(a, b, words, paired_seeds=True, resamples=20000, seed=3)
    assert lo == pytest.approx(ref.low, abs=0.15) and hi == pytest.approx(ref.high, abs=0.15)


def test_pairing_the_utterances_narrows_the_interval():
    # The same data with the utterance pairing broken (b's utterances shuffled): the shared difficulty no longer
    # cancels and the CI widens; a correct paired bootstrap must be the narrower one.
    rng = np.random.default_rng(4)
    a, b, words = synthetic(rng, 1, 200, 0.30, 0.30, 0.0, sd_utt=0.15)
    _, lo, hi = paired_bootstrap(a, b, words, paired_seeds=True, resamples=3000)
    perm = rng.permutation(200)
    _, lo_u, hi_u = paired_bootstrap(a, b[:, perm] * words / words[perm], words, paired_seeds=True, resamples=3000)
    assert hi - lo < 0.7 * (hi_u - lo_u)


@pytest.mark.parametrize("k, sd_seed", [(1, 0.0), (3, 0.01)])
def test_coverage_is_close_to_95_percent_where_the_truth_is_known(k, sd_seed):
    rng = np.random.default_rng(10 + k)
    reps, hits = 200, 0
    for r in range(reps):
        a, b, words = synthetic(rng, k, 100, 0.30, 0.32, sd_seed)
        _, lo, hi = paired_bootstrap(a, b, words, paired_seeds=False, resamples=1000, seed=r)
        hits += lo <= -2.0 <= hi
    assert 0.90 <= hits / reps <= 0.99, hits / reps


def test_a_real_difference_is_found_and_a_null_one_is_not():
    rng = np.random.default_rng(5)
    a, b, words = synthetic(rng, 3, 240, 0.25, 0.35, 0.01)
    c = compare("x/fp32", "y/fp32", "wer", a, b, words, paired_seeds=False, resamples=2000)
    assert c.verdict == "better" and c.ci95[1] < 0 and c.to_dict()["n_seeds"] == 3 and c.n_utterances == 240
    same = compare("x/fp16", "x/fp32", "wer", a, a, words, paired_seeds=True, resamples=500)
    assert same.diff == 0 and same.ci95 == [0.0, 0.0] and same.verdict.startswith("not distinguishable")


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 4)), np.ones(5), paired_seeds=True)
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((3, 5)), np.ones(5), paired_seeds=True)
    with pytest.raises(ValueError, match="reference words"):
        paired_bootstrap(np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(3), paired_seeds=True)
