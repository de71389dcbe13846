"""Attention rescoring of a CTC n-best list (WeNet's second pass)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import Hypothesis, StepFn, step_log_probs

# score_fn(hyps) -> (N,) total attention log-prob of each hypothesis including the final eos.
ScoreFn = Callable[[list[list[int]]], torch.Tensor]


def sequence_scores_from_step(step_fn: StepFn, hyps: list[list[int]], sos_eos: int) -> torch.Tensor:
    # log p(y, eos) = sum_i log p(y_i | sos, y_<i) + log p(eos | sos, y). All prefixes of all
    # hypotheses go through step_fn in one call; returns (N,) float64 on CPU.
    prefixes, targets, owner = [], [], []
    for n, hyp in enumerate(hyps):
        seq = [sos_eos] + list(hyp)
        for i, target in enumerate(list(hyp) + [sos_eos]):
            prefixes.append(seq[: i + 1])
            targets.append(target)
            owner.append(n)
    logp = step_log_probs(step_fn, prefixes)  # (sum_n (len_n + 1), V)
    picked = logp[torch.arange(len(prefixes)), torch.tensor(targets)]
    return torch.zeros(len(hyps), dtype=torch.float64).index_add_(0, torch.tensor(owner, dtype=torch.long), picked)


def attention_rescoring(
    nbest: list[Hypothesis],
    score_fn: ScoreFn,
    ctc_weight: float = 0.5,
    reverse_weight: float = 0.0,
    reverse_score_fn: ScoreFn | None = None,
) -> Hypothesis:
    """Pick the hypothesis maximising ctc_weight * ctc_score + attention_score.

    attention_score = (1 - reverse_weight) * left-to-right score + reverse_weight * right-to-left
    score; reverse_score_fn receives the hypotheses already reversed (as a right-to-left decoder
    reads them) and returns their log-probs including eos.
    """
    if not nbest:
        raise ValueError("attention_rescoring needs a non-empty n-best list")
    hyps = [list(h) for h, _ in nbest]
    ctc = torch.tensor([s for _, s in nbest], dtype=torch.float64)  # (N,)
    att = score_fn(hyps).detach().to("cpu", torch.float64)  # (N,)
    if reverse_weight > 0:
        if reverse_score_fn is None:
            raise ValueError("reverse_weight > 0 needs a reverse_score_fn")
        rev = reverse_score_fn([h[::-1] for h in hyps]).detach().to("cpu", torch.float64)
        att = (1 - reverse_weight) * att + reverse_weight * rev
    total = ctc_weight * ctc + att
    best = int(total.argmax())
    return hyps[best], total[best].item()
