"""Beam search over an autoregressive attention decoder, abstracted as a step function."""

from __future__ import annotations

from collections.abc import Callable

import torch

# step_fn(prefixes) -> (N, V) next-token log-probs; every prefix starts with sos_eos and the
# callable is already bound to one utterance's encoder output.
StepFn = Callable[[list[list[int]]], torch.Tensor]
Hypothesis = tuple[list[int], float]

NEG_INF = float("-inf")


def step_log_probs(step_fn: StepFn, prefixes: list[list[int]]) -> torch.Tensor:
    # Search bookkeeping runs on CPU in float64 whatever device the decoder uses: the tensors are
    # (beam, V) and scores accumulate over many steps. A copy, so callers may edit it in place.
    return step_fn(prefixes).detach().to("cpu", torch.float64, copy=True)


def attention_beam_search(
    step_fn: StepFn, sos_eos: int, beam: int = 10, max_len: int = 200, length_penalty: float = 0.0
) -> list[Hypothesis]:
    """Return up to `beam` finished (tokens, score) pairs, best first.

    score = log p(tokens, eos) + length_penalty * len(tokens); a positive length_penalty is a
    per-token bonus that counters the decoder's bias towards short outputs. Hypotheses still
    running at `max_len` tokens are closed with eos.
    """
    live: list[list[int]] = [[]]  # token ids without sos
    live_scores = torch.zeros(1, dtype=torch.float64)  # (K,) search scores incl. length bonus
    finished: list[Hypothesis] = []

    for step in range(max_len + 1):
        logp = step_log_probs(step_fn, [[sos_eos] + h for h in live])  # (K, V)
        V = logp.shape[1]
        if step == max_len:
            # Out of length budget: the only allowed continuation is eos.
            ends = live_scores + logp[:, sos_eos]
            finished.extend((h, s) for h, s in zip(live, ends.tolist()))
            break

        # Every non-eos token adds one output token, hence earns the length bonus.
        cand = live_scores[:, None] + logp + length_penalty  # (K, V)
        cand[:, sos_eos] -= length_penalty
        scores, flat = cand.flatten().topk(min(beam, cand.numel()))

        next_live, next_scores = [], []
        for s, f in zip(scores.tolist(), flat.tolist()):
            k, c = divmod(f, V)
            if s == NEG_INF:
                continue
            if c == sos_eos:
                finished.append((live[k], s))
            else:
                next_live.append(live[k] + [c])
                next_scores.append(s)
        if not next_live:
            break
        live = next_live
        live_scores = torch.tensor(next_scores, dtype=torch.float64)
        if _can_stop(finished, live_scores, beam, max_len - step - 1, length_penalty):
            break

    finished.sort(key=lambda h: h[1], reverse=True)
    return finished[:beam]


def _can_stop(
    finished: list[Hypothesis], live_scores: torch.Tensor, beam: int, steps_left: int, length_penalty: float
) -> bool:
    # Log-probs are <= 0, so a running hypothesis can gain at most the length bonus of the tokens
    # it may still emit. Once `beam` finished hypotheses beat that bound, nothing can change the n-best.
    if len(finished) < beam:
        return False
    worst_kept = sorted((s for _, s in finished), reverse=True)[beam - 1]
    best_possible = live_scores.max().item() + max(length_penalty, 0.0) * steps_left
    return best_possible <= worst_kept


def attention_greedy(step_fn: StepFn, sos_eos: int, max_len: int = 200) -> Hypothesis:
    best = attention_beam_search(step_fn, sos_eos, beam=1, max_len=max_len)
    return best[0]
