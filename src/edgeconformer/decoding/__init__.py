"""Decoding for the CTC + attention ("dual decoder") model, one utterance at a time.

Conventions: CTC blank id `blank` (default 0); the attention decoder uses one id `sos_eos` for
start and end of sentence; hypotheses are token-id lists without blank/sos/eos; scores are natural
log-probabilities. The attention decoder is a callable `step_fn(prefixes) -> (N, V)` next-token
log-probs (prefixes start with sos_eos), or `score_fn(hyps) -> (N,)` full-sequence log-probs.
"""

from __future__ import annotations

import torch

from .attention import StepFn, attention_beam_search, attention_greedy
from .ctc import collapse_ctc, ctc_greedy, ctc_greedy_batch, ctc_prefix_beam_search, ctc_prefix_beam_search_batch
from .joint import CTCPrefixScorer, joint_ctc_attention_beam_search
from .rescoring import ScoreFn, attention_rescoring, sequence_scores_from_step

METHODS = ("ctc_greedy", "ctc_beam", "attention", "joint", "rescoring")


def decode(
    method: str,
    ctc_log_probs: torch.Tensor | None = None,
    step_fn: StepFn | None = None,
    sos_eos: int | None = None,
    *,
    score_fn: ScoreFn | None = None,
    beam: int = 10,
    ctc_weight: float | None = None,
    blank: int = 0,
    length: int | torch.Tensor | None = None,
    max_len: int | None = None,
) -> list[int]:
    """Best hypothesis of one utterance. ctc_weight=None uses the method's default (joint 0.3, rescoring 0.5)."""
    if method == "ctc_greedy":
        return ctc_greedy(ctc_log_probs, length=length, blank=blank)
    if method == "ctc_beam":
        return ctc_prefix_beam_search(ctc_log_probs, beam=beam, blank=blank, length=length)[0][0]
    if method == "attention":
        return attention_beam_search(step_fn, sos_eos, beam=beam, max_len=200 if max_len is None else max_len)[0][0]
    if method == "joint":
        w = 0.3 if ctc_weight is None else ctc_weight
        hyps = joint_ctc_attention_beam_search(
            ctc_log_probs, step_fn, sos_eos, ctc_weight=w, beam=beam, blank=blank, max_len=max_len, length=length
        )
        # No hypothesis reached <eos> with a finite score: CTC ruled out every token of the attention shortlist
        # (a barely trained model). Nothing both decoders allow: an empty transcript, not a crash.
        return hyps[0][0] if hyps else []
    if method == "rescoring":
        nbest = ctc_prefix_beam_search(ctc_log_probs, beam=beam, blank=blank, length=length)
        if score_fn is None:
            score_fn = lambda hyps: sequence_scores_from_step(step_fn, hyps, sos_eos)  # noqa: E731
        w = 0.5 if ctc_weight is None else ctc_weight
        return attention_rescoring(nbest, score_fn, ctc_weight=w)[0]
    raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")


__all__ = [
    "METHODS",
    "CTCPrefixScorer",
    "ScoreFn",
    "StepFn",
    "attention_beam_search",
    "attention_greedy",
    "attention_rescoring",
    "collapse_ctc",
    "ctc_greedy",
    "ctc_greedy_batch",
    "ctc_prefix_beam_search",
    "ctc_prefix_beam_search_batch",
    "decode",
    "joint_ctc_attention_beam_search",
    "sequence_scores_from_step",
]
