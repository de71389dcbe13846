"""One-pass joint CTC/attention beam search (Watanabe et al., 2017; ESPnet's CTCPrefixScorer)."""

from __future__ import annotations

import torch

from .attention import Hypothesis, StepFn, step_log_probs

NEG_INF = float("-inf")


class CTCPrefixScorer:
    """CTC prefix probabilities for one utterance, computed incrementally as prefixes grow.

    For a prefix g (labels without sos) the state is the pair of forward variables over time
        r_t^n(g): log p(frames 0..t collapse to g, frame t emits g's last label)
        r_t^b(g): log p(frames 0..t collapse to g, frame t emits blank)
    stored as a (T, 2, ...) tensor [..., 0, :] = r^n, [..., 1, :] = r^b.
    The prefix score psi(h) = log sum over all labellings that start with h of p(labelling | x);
    for h = g + eos it is the full-sequence probability log(r_{T-1}^n(g) + r_{T-1}^b(g)).
    """

    def __init__(self, log_probs: torch.Tensor, blank: int, eos: int):
        # log_probs: (T, V). CPU float64 because the recurrences run frame by frame on small tensors.
        self.x = log_probs.detach().to("cpu", torch.float64)
        self.T = self.x.shape[0]
        self.blank = blank
        self.eos = eos

    def initial_state(self) -> torch.Tensor:
        # Empty prefix: it can only have emitted blanks, r_t^b = sum_{s<=t} log x_s(blank). Shape (T, 2).
        r = torch.full((self.T, 2), NEG_INF, dtype=torch.float64)
        r[:, 1] = torch.cumsum(self.x[:, self.blank], dim=0)
        return r

    def full_score(self, state: torch.Tensor) -> torch.Tensor:
        # state: (T, 2, ...) -> log p(labelling == g) = log(r_{T-1}^n + r_{T-1}^b).
        if self.T == 0:
            return torch.zeros(state.shape[2:], dtype=torch.float64)
        return torch.logaddexp(state[-1, 0], state[-1, 1])

    def score(
        self, prefix_len: int, last: torch.Tensor, states: torch.Tensor, cands: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend K prefixes of equal length by C candidate tokens each.

        prefix_len: number of labels in every prefix g; last: (K,) last label of g (-1 if empty);
        states: (T, 2, K) forward variables of g; cands: (K, C) candidate tokens c.
        Returns psi (K, C) of h = g + c and the new states (T, 2, K, C); eos candidates get the
        full-sequence score of g (their state is unused: an ended hypothesis is not extended).
        """
        T = self.T
        K, C = cands.shape
        x_c = self.x[:, cands]  # (T, K, C) log-prob of emitting c at each frame
        x_blank = self.x[:, self.blank]  # (T,)
        r_g_n, r_g_b = states[:, 0], states[:, 1]  # (T, K)

        # phi_t: log-prob that frames 0..t collapse to g and the next label may be c at frame t+1.
        # If c repeats g's last label, a blank must separate them, so only r^b(g) counts.
        phi = torch.logaddexp(r_g_n, r_g_b)[:, :, None].expand(T, K, C).clone()  # (T, K, C)
        repeat = cands == last[:, None]  # (K, C)
        phi = torch.where(repeat[None], r_g_b[:, :, None], phi)

        r_n = torch.full((T, K, C), NEG_INF, dtype=torch.float64)
        r_b = torch.full((T, K, C), NEG_INF, dtype=torch.float64)
        if prefix_len == 0 and T > 0:
            r_n[0] = x_c[0]  # h = c can start at the first frame
        # h has prefix_len + 1 labels, so it needs at least that many frames: r_t(h) = -inf for t < prefix_len.
        start = max(prefix_len, 1)
        for t in range(start, T):
            # Either c continues from frame t-1 (stays in h's last label) or starts now after g.
            r_n[t] = torch.logaddexp(r_n[t - 1], phi[t - 1]) + x_c[t]
            # Blank after h, from either state of h.
            r_b[t] = torch.logaddexp(r_n[t - 1], r_b[t - 1]) + x_blank[t]

        # psi(h): sum over the frame at which c is first emitted (the rest of the utterance is free).
        # Empty slices (too few frames left) contribute log 0.
        first = r_n[:1] if prefix_len == 0 else r_n[:0]  # c emitted at frame 0, only after the empty prefix
        later = phi[start - 1 : T - 1] + x_c[start:T]  # c first emitted at frame t >= start
        psi = torch.logsumexp(torch.cat([first, later]), dim=0)  # (K, C)

        is_eos = cands == self.eos
        if is_eos.any():
            psi = torch.where(is_eos, self.full_score(states)[:, None], psi)
        return psi, torch.stack([r_n, r_b], dim=1)


def joint_ctc_attention_beam_search(
    ctc_log_probs: torch.Tensor,
    step_fn: StepFn,
    sos_eos: int,
    ctc_weight: float = 0.3,
    beam: int = 10,
    blank: int = 0,
    max_len: int | None = None,
    pre_beam: int | None = None,
    length: int | torch.Tensor | None = None,
) -> list[Hypothesis]:
    """Return up to `beam` (tokens, score) pairs, best first, with
    score = ctc_weight * log p_ctc(tokens) + (1 - ctc_weight) * log p_att(tokens, eos).

    Running hypotheses are ranked by the same combination with the CTC prefix score psi in place
    of the full CTC probability. Only the `pre_beam` best attention tokens of each hypothesis are
    scored by CTC (default 1.5 * beam, as in ESPnet); use pre_beam >= V for an exact expansion.
    """
    x = ctc_log_probs if length is None else ctc_log_probs[: int(length)]
    scorer = CTCPrefixScorer(x, blank=blank, eos=sos_eos)
    # A CTC labelling cannot have more labels than frames.
    max_len = scorer.T if max_len is None else min(max_len, scorer.T)
    pre_beam = int(1.5 * beam) if pre_beam is None else pre_beam

    live: list[list[int]] = [[]]
    att = torch.zeros(1, dtype=torch.float64)  # (K,) accumulated attention log-prob
    states = scorer.initial_state()[:, :, None]  # (T, 2, K)
    finished: list[Hypothesis] = []

    for step in range(max_len + 1):
        logp, cands = _candidates(step_fn, live, sos_eos, blank, pre_beam, last_step=step == max_len)
        last = torch.tensor([h[-1] if h else -1 for h in live])
        psi, new_states = scorer.score(step, last, states, cands)  # (K, C), (T, 2, K, C)
        cand_att = att[:, None] + logp.gather(1, cands)  # (K, C)
        combined = _combine(psi, cand_att, ctc_weight)
        next_live, keep_k, keep_j, keep_att = _prune(combined, cands, cand_att, live, beam, sos_eos, finished)
        if not next_live:
            break
        live = next_live
        att = torch.tensor(keep_att, dtype=torch.float64)
        states = new_states[:, :, keep_k, keep_j]  # (T, 2, K')
        # Both psi and the attention log-prob can only decrease as a hypothesis grows, so once
        # `beam` finished hypotheses beat every running one the n-best is final.
        best_live = combined[keep_k, keep_j].max().item()
        if len(finished) >= beam and best_live <= sorted((s for _, s in finished), reverse=True)[beam - 1]:
            break

    finished.sort(key=lambda h: h[1], reverse=True)
    return finished[:beam]


def _candidates(
    step_fn: StepFn, live: list[list[int]], sos_eos: int, blank: int, pre_beam: int, last_step: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention decoder's next-token log-probs (K, V) of the live prefixes (blank ruled out: a CTC symbol,
    never an output label) and the (K, C) candidate tokens: the pre-beam, or only eos at the last step."""
    logp = step_log_probs(step_fn, [[sos_eos] + h for h in live])  # (K, V)
    K, V = logp.shape
    logp[:, blank] = NEG_INF
    if last_step:
        return logp, torch.full((K, 1), sos_eos, dtype=torch.long)  # out of length budget: only eos
    return logp, logp.topk(min(pre_beam, V), dim=1).indices  # (K, C) attention pre-beam


def _combine(psi: torch.Tensor, cand_att: torch.Tensor, ctc_weight: float) -> torch.Tensor:
    """ctc_weight * psi + (1 - ctc_weight) * attention, without 0 * -inf = nan at the weights 0 and 1."""
    if ctc_weight == 0:
        return cand_att  # CTC may rule a candidate out (psi = -inf) without effect
    if ctc_weight == 1:
        return torch.where(cand_att > NEG_INF, psi, NEG_INF)
    return ctc_weight * psi + (1 - ctc_weight) * cand_att


def _prune(
    combined: torch.Tensor,
    cands: torch.Tensor,
    cand_att: torch.Tensor,
    live: list[list[int]],
    beam: int,
    sos_eos: int,
    finished: list[Hypothesis],
) -> tuple[list[list[int]], list[int], list[int], list[float]]:
    """The `beam` best finite (prefix, candidate) pairs: those ending in eos are appended to `finished`, the
    others -> (the grown prefixes, their prefix and candidate indices, their attention log-probs)."""
    C = cands.shape[1]
    scores, flat = combined.flatten().topk(min(beam, combined.numel()))
    next_live, keep_k, keep_j, keep_att = [], [], [], []
    for s, f in zip(scores.tolist(), flat.tolist()):
        if s == NEG_INF:
            continue
        k, j = divmod(f, C)
        c = int(cands[k, j])
        if c == sos_eos:
            finished.append((live[k], s))
        else:
            next_live.append(live[k] + [c])
            keep_k.append(k)
            keep_j.append(j)
            keep_att.append(cand_att[k, j].item())
    return next_live, keep_k, keep_j, keep_att
