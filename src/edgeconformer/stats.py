"""Statistics of ablations: mean +- sd over seeds, and paired differences of corpus-level error rates with a 95%
bootstrap CI that resamples utterances and seeds.

Why a two-level bootstrap: a WER difference between two recipes varies with the test utterances (some are hard for
both: pairing removes that) and with the training seed (the same recipe lands elsewhere with another seed: the
single-seed DWS - vanilla delta flipped sign between two machines). scipy.stats.bootstrap resamples one level of
independent observations; here each draw takes n utterances with replacement (the same draw for both sides) and,
independently, k seeds with replacement per side (the same seed draw for both sides when they share their seeds,
e.g. FP16 vs FP32 of the same models). The statistic is recomputed from error and word counts (a corpus WER is a
ratio of sums, not a mean of per-utterance rates). The interval is the percentile interval of the draws. With one
seed per side it reduces to the paired utterance bootstrap, and tests check it against scipy.stats.bootstrap
there, and its coverage on synthetic data whose true difference is known.

Error rates are in percent; `diff` is a minus b, so for an error rate a negative difference means a is better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("better", "worse", "not distinguishable at this budget")


def mean_sd(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the finite values; sd is None for fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None, None
    return float(np.mean(x)), (float(np.std(x, ddof=1)) if x.size > 1 else None)


def corpus_rate(errors: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Corpus-level error rate in percent per row: errors (..., n) and words (n,) -> (...,)."""
    return 100.0 * errors.sum(-1) / words.sum()


def verdict(lo: float, hi: float) -> str:
    """For a difference of error rates (a - b): the CI below 0 -> a is better, above 0 -> worse."""
    if hi < 0:
        return "better"
    if lo > 0:
        return "worse"
    return VERDICTS[2]


@dataclass
class Comparison:
    a: str
    b: str
    metric: str
    diff: float  # mean over seeds of a minus mean over seeds of b (percentage points)
    ci95: list[float]  # [lo, hi], percentile bootstrap over utterances and seeds
    n_seeds: list[int]  # seeds on side a, side b (equal and paired when the sides share their models)
    n_utterances: int
    verdict: str
    paired_seeds: bool
    confidence: float = 0.95
    resamples: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_seeds"] = self.n_seeds[0] if self.n_seeds[0] == self.n_seeds[1] else self.n_seeds
        return d


def paired_bootstrap(
    errors_a: np.ndarray,
    errors_b: np.ndarray,
    words: np.ndarray,
    paired_seeds: bool,
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
):
    """(diff, lo, hi) of mean-over-seeds corpus error rate, a minus b.

    errors_a (k_a, n), errors_b (k_b, n): errors per seed and utterance, the same n utterances in the same order on
    both sides; words (n,): reference words (characters for a CER) per utterance. paired_seeds: row i of a and row
    i of b share a model or a seed (k_a == k_b), so one seed draw serves both sides."""
    errors_a, errors_b = np.atleast_2d(errors_a).astype(np.float64), np.atleast_2d(errors_b).astype(np.float64)
    words = np.asarray(words, dtype=np.float64)
    (k_a, n), k_b = errors_a.shape, errors_b.shape[0]
    if errors_b.shape[1] != n or words.shape != (n,):
        raise ValueError(
            f"errors_a {errors_a.shape}, errors_b {errors_b.shape} and words {words.shape} must cover "
            "the same utterances"
        )
    if n == 0 or words.sum() <= 0:
        raise ValueError("a comparison needs at least one utterance with reference words")
    if paired_seeds and k_a != k_b:
        raise ValueError(f"paired seeds need the same number of seeds on both sides, got {k_a} and {k_b}")
    diff = float(corpus_rate(errors_a, words).mean() - corpus_rate(errors_b, words).mean())

    rng = np.random.default_rng(seed)
    # Utterance draws as multiplicities: (R, n) counts summing to n, shared by both sides (the pairing).
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    total_words = counts @ words  # (R,)
    rate_a = 100.0 * (counts @ errors_a.T) / total_words[:, None]  # (R, k_a): every seed under every draw
    rate_b = 100.0 * (counts @ errors_b.T) / total_words[:, None]  # (R, k_b)
    seeds_a = rng.integers(0, k_a, size=(resamples, k_a))
    seeds_b = seeds_a if paired_seeds else rng.integers(0, k_b, size=(resamples, k_b))
    draws = np.take_along_axis(rate_a, seeds_a, 1).mean(1) - np.take_along_axis(rate_b, seeds_b, 1).mean(1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return diff, float(lo), float(hi)


def compare(
    a: str,
    b: str,
    metric: str,
    errors_a,
    errors_b,
    words,
    paired_seeds: bool,
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    diff, lo, hi = paired_bootstrap(errors_a, errors_b, words, paired_seeds, resamples, confidence, seed)
    return Comparison(
        a=a,
        b=b,
        metric=metric,
        diff=diff,
        ci95=[lo, hi],
        n_seeds=[len(np.atleast_2d(errors_a)), len(np.atleast_2d(errors_b))],
        n_utterances=int(np.asarray(words).shape[0]),
        verdict=verdict(lo, hi),
        paired_seeds=paired_seeds,
        confidence=confidence,
        resamples=resamples,
    )
