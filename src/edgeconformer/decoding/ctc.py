"""CTC decoding: best-path (greedy) and prefix beam search over label sequences."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

Hypothesis = tuple[list[int], float]


def _truncate(log_probs: torch.Tensor, length: int | torch.Tensor | None) -> torch.Tensor:
    # log_probs: (T, V); frames past `length` are padding and must not be decoded.
    if log_probs.dim() != 2:
        raise ValueError(f"expected (T, V) log-probs, got shape {tuple(log_probs.shape)}")
    if length is None:
        return log_probs
    return log_probs[: int(length)]


def collapse_ctc(path: list[int], blank: int = 0) -> list[int]:
    # Merge repeated symbols, then drop blanks: "a a _ a b" -> "a a b".
    out: list[int] = []
    prev = None
    for tok in path:
        if tok != prev and tok != blank:
            out.append(tok)
        prev = tok
    return out


def ctc_greedy(log_probs: torch.Tensor, length: int | torch.Tensor | None = None, blank: int = 0) -> list[int]:
    path = _truncate(log_probs, length).argmax(dim=-1).tolist()  # (T,)
    return collapse_ctc(path, blank)


def ctc_greedy_batch(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0) -> list[list[int]]:
    # log_probs: (B, T, V); lengths: (B,) valid frames per utterance.
    paths = log_probs.argmax(dim=-1).tolist()  # one argmax for the whole batch, (B, T)
    lens = [len(p) for p in paths] if lengths is None else [int(n) for n in lengths]
    return [collapse_ctc(p[:n], blank) for p, n in zip(paths, lens)]


def _log_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(a, b)


def ctc_prefix_beam_search(
    log_probs: torch.Tensor,
    beam: int = 10,
    blank: int = 0,
    length: int | torch.Tensor | None = None,
    token_prune: int | None = None,
) -> list[Hypothesis]:
    """Return up to `beam` (labelling, log p(labelling)) pairs, best first.

    Each prefix carries two log-probs over the frames seen so far: pb (alignments ending in blank)
    and pnb (ending in the prefix's last label). Their log-sum-exp is the probability of all
    alignments that collapse to the prefix, so with a beam wide enough to keep every prefix the
    scores are exact label-sequence log-probs.
    """
    # Bookkeeping runs on CPU in float64: per-frame ops are tiny (beam x V), so launch overhead
    # would dominate on an accelerator, and float64 keeps long sums of log-probs exact enough.
    x = _truncate(log_probs, length).detach().to("cpu", torch.float64)  # (T, V)
    T, V = x.shape

    prefixes: list[tuple[int, ...]] = [()]
    pb = torch.tensor([0.0], dtype=torch.float64)  # (K,) empty prefix: probability 1, "ends in blank"
    pnb = torch.tensor([NEG_INF], dtype=torch.float64)  # (K,)

    for t in range(T):
        lp = x[t]  # (V,)
        if token_prune is not None and token_prune < V:
            # Ignore tokens outside this frame's top-k entirely (blank and repeats included).
            keep = lp.topk(token_prune).indices
            lp = torch.full_like(lp, NEG_INF).index_put_((keep,), lp[keep])
        prefixes, pb, pnb = _prefix_beam_step(prefixes, pb, pnb, lp, beam, blank)

    total = _log_add(pb, pnb)
    order = total.argsort(descending=True).tolist()
    return [(list(prefixes[k]), total[k].item()) for k in order if total[k] > NEG_INF]


def _prefix_beam_step(
    prefixes: list[tuple[int, ...]], pb: torch.Tensor, pnb: torch.Tensor, lp: torch.Tensor, beam: int, blank: int
) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor]:
    # prefixes: K label tuples; pb, pnb: (K,) log-probs up to frame t-1; lp: (V,) frame t log-probs.
    K, V = len(prefixes), lp.numel()
    total = _log_add(pb, pnb)  # (K,)
    last = torch.tensor([p[-1] if p else -1 for p in prefixes])  # (K,), -1 = empty prefix
    has_last = last >= 0

    # Staying on the same prefix: emit blank (from either state), or repeat the last label
    # without an intervening blank (collapses into the same label).
    stay_pb = total + lp[blank]
    stay_pnb = torch.where(has_last, pnb + lp[last.clamp(min=0)], NEG_INF)

    # Extending prefix k by label c: from any state, except that repeating the last label only
    # yields a new label when a blank separates the two, i.e. comes from pb.
    ext = total[:, None] + lp[None, :]  # (K, V)
    rows = has_last.nonzero().squeeze(1)
    ext[rows, last[rows]] = pb[rows] + lp[last[rows]]
    ext[:, blank] = NEG_INF

    # An extension may produce a prefix that is already in the beam (parent + c == prefix j):
    # merge its mass into that entry so no labelling is counted twice.
    index = {p: k for k, p in enumerate(prefixes)}
    for j, p in enumerate(prefixes):
        parent = index.get(p[:-1]) if p else None
        if parent is not None:
            stay_pnb[j] = _log_add(stay_pnb[j], ext[parent, p[-1]])
            ext[parent, p[-1]] = NEG_INF

    # The remaining extensions are all distinct new prefixes; only the best `beam` can survive.
    n_new = min(beam, K * V)
    new_scores, flat = ext.flatten().topk(n_new)
    cand_prefixes = list(prefixes)
    for f in flat.tolist():
        k, c = divmod(f, V)
        cand_prefixes.append(prefixes[k] + (c,))
    cand_pb = torch.cat([stay_pb, torch.full((n_new,), NEG_INF, dtype=pb.dtype)])
    cand_pnb = torch.cat([stay_pnb, new_scores])

    cand_total = _log_add(cand_pb, cand_pnb)
    n_keep = min(beam, int((cand_total > NEG_INF).sum()))
    keep = cand_total.topk(n_keep).indices
    return [cand_prefixes[i] for i in keep.tolist()], cand_pb[keep], cand_pnb[keep]


def ctc_prefix_beam_search_batch(
    log_probs: torch.Tensor,
    lengths: torch.Tensor | None = None,
    beam: int = 10,
    blank: int = 0,
    token_prune: int | None = None,
) -> list[list[Hypothesis]]:
    # log_probs: (B, T, V); lengths: (B,).
    return [
        ctc_prefix_beam_search(
            lp, beam=beam, blank=blank, length=None if lengths is None else lengths[b], token_prune=token_prune
        )
        for b, lp in enumerate(log_probs)
    ]
