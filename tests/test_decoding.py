import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from edgeconformer.decoding import (
    CTCPrefixScorer,
    attention_beam_search,
    attention_greedy,
    attention_rescoring,
    collapse_ctc,
    ctc_greedy,
    ctc_greedy_batch,
    ctc_prefix_beam_search,
    ctc_prefix_beam_search_batch,
    decode,
    joint_ctc_attention_beam_search,
    sequence_scores_from_step,
)

# Vocabulary used throughout: 0 = blank, 1 = "a", 2 = sos/eos (as in our tokenizer), 3 = "b".
BLANK, A, EOS, B = 0, 1, 2, 3
V = 4


def log_matrix(rows: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(rows, dtype=torch.float64)
    return (p / p.sum(-1, keepdim=True)).log()


def random_log_probs(T: int, V: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(sharpness * torch.randn(T, V, generator=g, dtype=torch.float64), dim=-1)


def brute_force_ctc(log_probs: torch.Tensor, blank: int = 0) -> dict[tuple[int, ...], float]:
    # Exact label-sequence log-probs: enumerate all V^T alignments and sum per collapsed labelling.
    T, V = log_probs.shape
    lp = log_probs.tolist()
    out: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(V), repeat=T):
        score = sum(lp[t][s] for t, s in enumerate(path))
        key = tuple(collapse_ctc(list(path), blank))
        out[key] = log_add(out.get(key, -math.inf), score)
    return out


def log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


class MarkovDecoder:
    """A tiny deterministic attention decoder: next-token distribution looked up from the prefix.

    `table` maps a prefix (labels after sos, as a tuple) to probabilities over the vocabulary;
    prefixes not in the table use the entry for their last label `("last", tok)`, then `default`.
    """

    def __init__(self, table: dict, default: list[float]):
        self.table = {k: self._norm(v) for k, v in table.items()}
        self.default = self._norm(default)
        self.calls = 0

    @staticmethod
    def _norm(p: list[float]) -> torch.Tensor:
        t = torch.tensor(p, dtype=torch.float64)
        return (t / t.sum()).log()

    def dist(self, labels: tuple[int, ...]) -> torch.Tensor:
        if labels in self.table:
            return self.table[labels]
        if labels and ("last", labels[-1]) in self.table:
            return self.table[("last", labels[-1])]
        return self.default

    def __call__(self, prefixes: list[list[int]]) -> torch.Tensor:
        self.calls += 1
        assert all(p[0] == EOS for p in prefixes), "prefixes must start with sos_eos"
        return torch.stack([self.dist(tuple(p[1:])) for p in prefixes]).float()

    def seq_log_prob(self, labels: tuple[int, ...]) -> float:
        return sum(self.dist(labels[:i])[tok].item() for i, tok in enumerate(list(labels) + [EOS]))


def all_label_sequences(max_len: int, labels=(A, B)):
    for n in range(max_len + 1):
        yield from itertools.product(labels, repeat=n)


# --------------------------------------------------------------------------- CTC greedy


def test_ctc_greedy_collapses_repeats_and_keeps_blank_separated_repeats():
    # Best path: a a _ a b b _ -> "a a b" (the blank keeps the second "a").
    path = [A, A, BLANK, A, B, B, BLANK]
    lp = torch.full((len(path), V), -5.0)
    lp[torch.arange(len(path)), torch.tensor(path)] = -0.1
    assert ctc_greedy(lp) == [A, A, B]
    assert ctc_greedy(lp, length=3) == [A]
    assert ctc_greedy(lp, length=torch.tensor(4)) == [A, A]
    assert collapse_ctc([BLANK, B, B, BLANK, BLANK, B]) == [B, B]


def test_ctc_greedy_batch_matches_per_utterance_and_respects_lengths():
    log_probs = torch.stack([random_log_probs(9, 5, seed=s) for s in range(4)])  # (B, T, V)
    lengths = torch.tensor([9, 5, 1, 0])
    batch = ctc_greedy_batch(log_probs, lengths)
    assert batch == [ctc_greedy(log_probs[b], length=lengths[b]) for b in range(4)]
    assert batch == [ctc_greedy(log_probs[b, : lengths[b]]) for b in range(4)]
    assert batch[3] == []
    assert ctc_greedy_batch(log_probs) == [ctc_greedy(lp) for lp in log_probs]


# --------------------------------------------------------------------------- CTC prefix beam search


def test_prefix_beam_beats_best_path_on_hand_built_matrix():
    # Each frame: blank 0.5, a 0.4, b 0.1. Best path is "_ _" (p = 0.25, labelling ""), but
    # "a" collects a_, _a, aa: 0.2 + 0.2 + 0.16 = 0.56.
    lp = log_matrix([[0.5, 0.4, 0.0001, 0.1]] * 2)
    assert ctc_greedy(lp) == []
    exact = brute_force_ctc(lp)
    hyps = ctc_prefix_beam_search(lp, beam=2)
    assert hyps[0][0] == [A]
    assert hyps[0][1] == pytest.approx(exact[(A,)], abs=1e-9)
    assert hyps[0][1] == pytest.approx(math.log(0.56), abs=1e-3)


@pytest.mark.parametrize("T,V_,seed", [(4, 3, 0), (5, 3, 1), (5, 4, 2), (6, 3, 3), (5, 4, 4)])
def test_prefix_beam_matches_brute_force_label_probabilities(T, V_, seed):
    lp = random_log_probs(T, V_, seed, sharpness=1.0)
    exact = brute_force_ctc(lp)
    ranked = sorted(exact.items(), key=lambda kv: kv[1], reverse=True)

    # A beam wide enough to keep every prefix makes the search exact: the whole n-best matches.
    hyps = ctc_prefix_beam_search(lp, beam=len(exact))
    assert len(hyps) == len(exact)
    for hyp, score in hyps:
        assert score == pytest.approx(exact[tuple(hyp)], abs=1e-9)
    assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
    assert tuple(hyps[0][0]) == ranked[0][0]

    # A narrow beam still finds the most probable labelling here; its score can only be a lower
    # bound, since alignments through pruned prefixes are lost.
    top, score = ctc_prefix_beam_search(lp, beam=4)[0]
    assert tuple(top) == ranked[0][0]
    assert score <= ranked[0][1] + 1e-12


def test_prefix_beam_finds_label_argmax_where_best_path_is_wrong_on_random_matrices():
    # Search seeds for matrices where best path and most probable labelling differ, then check the beam.
    found = 0
    for seed in range(200):
        lp = random_log_probs(5, 3, seed, sharpness=0.7)
        exact = brute_force_ctc(lp)
        best = max(exact, key=exact.get)
        if list(best) == ctc_greedy(lp):
            continue
        found += 1
        top, score = ctc_prefix_beam_search(lp, beam=10)[0]
        assert tuple(top) == best
        assert score == pytest.approx(exact[best], abs=1e-9)
        if found == 5:
            break
    assert found == 5


def test_prefix_beam_token_prune_and_length():
    lp = random_log_probs(8, 5, seed=7, sharpness=1.0)
    # top-1 pruning leaves only the best path: result is the greedy labelling with the path score.
    ((hyp, score),) = ctc_prefix_beam_search(lp, beam=5, token_prune=1)
    assert hyp == ctc_greedy(lp)
    assert score == pytest.approx(lp.max(-1).values.sum().item(), abs=1e-9)
    # Pruning to the full vocabulary changes nothing.
    assert ctc_prefix_beam_search(lp, beam=5, token_prune=5) == ctc_prefix_beam_search(lp, beam=5)
    # Truncation: frames past `length` are ignored.
    assert ctc_prefix_beam_search(lp, beam=5, length=4) == ctc_prefix_beam_search(lp[:4], beam=5)
    assert ctc_prefix_beam_search(lp, length=0) == [([], 0.0)]


def test_prefix_beam_batch_matches_per_utterance():
    log_probs = torch.stack([random_log_probs(7, 5, seed=s) for s in range(3)])
    lengths = torch.tensor([7, 4, 2])
    batch = ctc_prefix_beam_search_batch(log_probs, lengths, beam=4)
    assert batch == [ctc_prefix_beam_search(log_probs[b], beam=4, length=lengths[b]) for b in range(3)]


# --------------------------------------------------------------------------- attention beam search


def garden_path_decoder() -> MarkovDecoder:
    # Greedy takes "a" (0.6) and then wanders: best greedy sequence a a eos = 0.6 * 0.36 * 0.5 = 0.108.
    # The best sequence is "b eos" = 0.4 * 0.9 = 0.36, which needs a beam of 2 to be kept.
    return MarkovDecoder(
        table={(): [0.0, 0.6, 0.0, 0.4], (A,): [0.0, 0.36, 0.30, 0.34], (B,): [0.0, 0.05, 0.90, 0.05]},
        default=[0.0, 0.25, 0.5, 0.25],
    )


def test_attention_beam_search_needs_beam_to_find_best_sequence():
    dec = garden_path_decoder()
    greedy, greedy_score = attention_greedy(dec, EOS, max_len=6)
    assert greedy == [A, A]
    assert greedy_score == pytest.approx(math.log(0.108), abs=1e-6)

    hyps = attention_beam_search(dec, EOS, beam=2, max_len=6)
    assert hyps[0][0] == [B]
    assert hyps[0][1] == pytest.approx(math.log(0.36), abs=1e-6)

    # Brute force over all sequences up to max_len agrees, and every returned score is exact.
    brute = {s: dec.seq_log_prob(s) for s in all_label_sequences(6)}
    assert tuple(hyps[0][0]) == max(brute, key=brute.get)
    for hyp, score in attention_beam_search(dec, EOS, beam=5, max_len=6):
        assert score == pytest.approx(brute[tuple(hyp)], abs=1e-6)


def test_attention_beam_search_max_len_and_length_penalty():
    # Without a bonus "a eos" (0.5 * 0.25) beats the empty output (0.1) and all longer ones;
    # a large bonus per token pushes the search to max_len.
    dec = MarkovDecoder(table={(): [0.0, 0.5, 0.1, 0.4]}, default=[0.0, 0.5, 0.25, 0.25])
    hyps = attention_beam_search(dec, EOS, beam=4, max_len=3, length_penalty=5.0)
    assert all(len(h) <= 3 for h, _ in hyps)
    brute = {s: dec.seq_log_prob(s) + 5.0 * len(s) for s in all_label_sequences(3)}
    best = max(brute, key=brute.get)
    assert len(best) == 3 and tuple(hyps[0][0]) == best
    assert hyps[0][1] == pytest.approx(brute[best], abs=1e-6)
    top, score = attention_beam_search(dec, EOS, beam=8, max_len=3)[0]
    assert top == [A] and score == pytest.approx(math.log(0.125), abs=1e-6)


# --------------------------------------------------------------------------- CTC prefix scorer


def scorer_full_log_prob(scorer: CTCPrefixScorer, labels: list[int]) -> tuple[float, list[float]]:
    # Feed the labels one at a time, then eos; return the full-sequence score and the prefix scores.
    state = scorer.initial_state()[:, :, None]
    psis = []
    for i, c in enumerate(labels + [EOS]):
        last = torch.tensor([labels[i - 1] if i else -1])
        psi, new = scorer.score(i, last, state, torch.tensor([[c]]))
        psis.append(psi.item())
        state = new[:, :, 0, :]
    return psis[-1], psis[:-1]


@pytest.mark.parametrize("labels", [[], [A], [B, A], [A, A], [A, B, A], [B, B, B]])
def test_ctc_prefix_scorer_matches_ctc_loss_and_brute_force(labels):
    T = 6
    lp = random_log_probs(T, V, seed=11, sharpness=1.0)
    scorer = CTCPrefixScorer(lp, blank=BLANK, eos=EOS)
    full, psis = scorer_full_log_prob(scorer, labels)

    nll = F.ctc_loss(
        lp[:, None, :],
        torch.tensor([labels], dtype=torch.long).reshape(1, -1),
        torch.tensor([T]),
        torch.tensor([len(labels)]),
        blank=BLANK,
        reduction="none",
        zero_infinity=False,
    )
    assert full == pytest.approx(-nll.item(), abs=1e-9)

    exact = brute_force_ctc(lp)
    assert full == pytest.approx(exact.get(tuple(labels), -math.inf), abs=1e-9)
    # psi(prefix) = log of the total probability of all labellings that start with the prefix.
    for n, psi in enumerate(psis, start=1):
        mass = [s for seq, s in exact.items() if seq[:n] == tuple(labels[:n])]
        assert psi == pytest.approx(torch.logsumexp(torch.tensor(mass, dtype=torch.float64), 0).item(), abs=1e-9)


def test_ctc_prefix_scorer_vectorised_candidates_match_single_scoring():
    # Scoring several candidates of several prefixes at once equals scoring each sequence alone.
    lp = random_log_probs(7, V, seed=5)
    scorer = CTCPrefixScorer(lp, blank=BLANK, eos=EOS)
    init = scorer.initial_state()[:, :, None]
    _, first = scorer.score(0, torch.tensor([-1]), init, torch.tensor([[A, B]]))  # states of "a", "b"
    cands = torch.tensor([[A, B, EOS], [B, EOS, A]])
    psi, _ = scorer.score(1, torch.tensor([A, B]), first[:, :, 0, :], cands)  # (2, 3)
    for k, prefix in enumerate([[A], [B]]):
        for j, c in enumerate(cands[k].tolist()):
            full, psis = scorer_full_log_prob(scorer, prefix + ([] if c == EOS else [c]))
            assert psi[k, j].item() == pytest.approx(full if c == EOS else psis[-1], abs=1e-12)


# --------------------------------------------------------------------------- joint CTC/attention


def disagreeing_case() -> tuple[torch.Tensor, MarkovDecoder]:
    # CTC's best path reads "a b"; the attention decoder's greedy output is "b a".
    ctc = log_matrix(
        [[0.30, 0.50, 0.01, 0.19], [0.50, 0.20, 0.01, 0.29], [0.30, 0.10, 0.01, 0.59], [0.60, 0.10, 0.01, 0.29]]
    )
    att = MarkovDecoder(
        table={(): [0.0, 0.3, 0.1, 0.6], ("last", B): [0.0, 0.7, 0.2, 0.1], ("last", A): [0.0, 0.2, 0.6, 0.2]},
        default=[0.0, 0.2, 0.6, 0.2],
    )
    return ctc, att


def brute_force_joint(ctc: torch.Tensor, att: MarkovDecoder, w: float) -> dict[tuple[int, ...], float]:
    # Every labelling with non-zero CTC probability has at most T labels; eos is never a label.
    exact = brute_force_ctc(ctc)
    out = {}
    for seq in all_label_sequences(ctc.shape[0]):
        c = exact.get(seq, -math.inf)
        a = att.seq_log_prob(seq)
        out[seq] = a if w == 0 else (c if w == 1 else w * c + (1 - w) * a)
    return out


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_joint_search_matches_brute_force_combined_score(w):
    ctc, att = disagreeing_case()
    assert ctc_greedy(ctc) == [A, B]
    assert attention_greedy(att, EOS)[0] == [B, A]

    brute = brute_force_joint(ctc, att, w)
    ranked = sorted(brute.items(), key=lambda kv: kv[1], reverse=True)
    hyps = joint_ctc_attention_beam_search(ctc, att, EOS, ctc_weight=w, beam=32, pre_beam=V)
    assert tuple(hyps[0][0]) == ranked[0][0]
    assert hyps[0][1] == pytest.approx(ranked[0][1], abs=1e-6)
    for hyp, score in hyps:
        assert score == pytest.approx(brute[tuple(hyp)], abs=1e-6)


def test_joint_search_combines_both_models():
    ctc, att = disagreeing_case()
    w = 0.5
    brute = brute_force_joint(ctc, att, w)
    best = max(brute, key=brute.get)
    # The winner is neither model's own first choice: the combination matters.
    assert list(best) != ctc_greedy(ctc) and list(best) != attention_greedy(att, EOS)[0]
    # A small beam with the default pre-beam finds it too.
    top, score = joint_ctc_attention_beam_search(ctc, att, EOS, ctc_weight=w, beam=3)[0]
    assert tuple(top) == best
    assert score == pytest.approx(brute[best], abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_joint_search_random_models_match_brute_force(seed):
    T = 5
    ctc = random_log_probs(T, V, seed, sharpness=1.5)
    g = torch.Generator().manual_seed(100 + seed)
    rows = torch.softmax(2 * torch.randn(V + 1, V, generator=g, dtype=torch.float64), -1)
    rows[:, BLANK] = 0.0  # the attention decoder never emits blank
    table = {(): rows[-1].tolist(), **{("last", c): rows[c].tolist() for c in (A, B)}}
    att = MarkovDecoder(table=table, default=rows[0].tolist())
    w = 0.3
    brute = brute_force_joint(ctc, att, w)
    hyps = joint_ctc_attention_beam_search(ctc, att, EOS, ctc_weight=w, beam=64, pre_beam=V)
    best = max(brute, key=brute.get)
    assert tuple(hyps[0][0]) == best
    assert hyps[0][1] == pytest.approx(brute[best], abs=1e-6)


def test_joint_search_respects_length_and_max_len():
    ctc, att = disagreeing_case()
    padded = torch.cat([ctc, log_matrix([[0.01, 0.01, 0.01, 0.97]] * 3)])
    full = joint_ctc_attention_beam_search(ctc, att, EOS, beam=4)
    assert joint_ctc_attention_beam_search(padded, att, EOS, beam=4, length=4) == full
    capped = joint_ctc_attention_beam_search(ctc, att, EOS, beam=8, pre_beam=V, max_len=1)
    assert all(len(h) <= 1 for h, _ in capped)


def test_joint_decode_gives_an_empty_transcript_when_ctc_rules_out_the_whole_shortlist():
    # CTC allows only token 5; the attention decoder's pre-beam shortlist (tokens 3 and 4) never contains it nor
    # <eos>, so no hypothesis ever has a finite combined score: the search finds nothing, decode says "".
    vocab, eos = 8, 2
    ctc = torch.full((3, vocab), float("-inf"))
    ctc[:, 5] = 0.0

    def shortlist(prefixes):
        logits = torch.full((len(prefixes), vocab), -10.0)
        logits[:, 3], logits[:, 4] = -0.1, -0.2
        return torch.log_softmax(logits, -1)

    assert joint_ctc_attention_beam_search(ctc, shortlist, eos, beam=1, blank=0) == []
    assert decode("joint", ctc, shortlist, eos, beam=1, blank=0) == []


# --------------------------------------------------------------------------- rescoring


def test_sequence_scores_from_step_matches_manual_product():
    _, att = disagreeing_case()
    hyps = [[], [B, A], [A, A, B]]
    scores = sequence_scores_from_step(att, hyps, EOS)
    assert scores.shape == (3,)
    for h, s in zip(hyps, scores.tolist()):
        assert s == pytest.approx(att.seq_log_prob(tuple(h)), abs=1e-6)
    assert att.calls == 1  # all prefixes of all hypotheses in one decoder call


def test_attention_rescoring_picks_best_combined_hypothesis():
    _, att = disagreeing_case()
    score_fn = lambda hyps: sequence_scores_from_step(att, hyps, EOS)  # noqa: E731
    nbest = [([A, B], -1.0), ([B, A, B], -1.5), ([B, A], -3.0), ([A], -2.0)]
    w = 0.5
    combined = [w * c + att.seq_log_prob(tuple(h)) for h, c in nbest]
    expect = max(range(len(nbest)), key=combined.__getitem__)
    hyp, score = attention_rescoring(nbest, score_fn, ctc_weight=w)
    assert hyp == nbest[expect][0]
    assert score == pytest.approx(combined[expect], abs=1e-6)
    # Neither the CTC first choice nor the attention first choice alone.
    assert hyp != nbest[0][0]
    assert hyp != max(nbest, key=lambda h: att.seq_log_prob(tuple(h[0])))[0]


def test_attention_rescoring_weights():
    nbest = [([A], -1.0), ([B], -2.0)]
    fwd = lambda hyps: torch.tensor([-2.0 if h == [A] else -0.5 for h in hyps])  # noqa: E731
    rev = lambda hyps: torch.tensor([-0.1 if h == [A] else -5.0 for h in hyps])  # noqa: E731

    # ctc_weight=0 -> attention only; large ctc_weight -> CTC order.
    assert attention_rescoring(nbest, fwd, ctc_weight=0.0)[0] == [B]
    assert attention_rescoring(nbest, fwd, ctc_weight=10.0)[0] == [A]
    hyp, score = attention_rescoring(nbest, fwd, ctc_weight=0.5, reverse_weight=0.5, reverse_score_fn=rev)
    assert hyp == [A] and score == pytest.approx(0.5 * -1.0 + 0.5 * -2.0 + 0.5 * -0.1)
    with pytest.raises(ValueError):
        attention_rescoring(nbest, fwd, reverse_weight=0.3)
    with pytest.raises(ValueError):
        attention_rescoring([], fwd)


def test_rescoring_rev_receives_reversed_hypotheses():
    seen = []

    def rev(hyps):
        seen.extend(hyps)
        return torch.zeros(len(hyps))

    attention_rescoring([([A, B], 0.0)], lambda h: torch.zeros(len(h)), reverse_weight=0.3, reverse_score_fn=rev)
    assert seen == [[B, A]]


# --------------------------------------------------------------------------- dispatcher


def test_decode_dispatches_to_each_method():
    ctc, att = disagreeing_case()
    assert decode("ctc_greedy", ctc) == ctc_greedy(ctc)
    assert decode("ctc_beam", ctc, beam=4) == ctc_prefix_beam_search(ctc, beam=4)[0][0]
    assert decode("attention", step_fn=att, sos_eos=EOS, beam=4) == attention_beam_search(att, EOS, beam=4)[0][0]
    assert (
        decode("joint", ctc, att, EOS, beam=4, ctc_weight=0.5)
        == (joint_ctc_attention_beam_search(ctc, att, EOS, ctc_weight=0.5, beam=4)[0][0])
    )
    nbest = ctc_prefix_beam_search(ctc, beam=4)
    expect = attention_rescoring(nbest, lambda h: sequence_scores_from_step(att, h, EOS), ctc_weight=0.5)[0]
    assert decode("rescoring", ctc, att, EOS, beam=4) == expect
    with pytest.raises(ValueError):
        decode("nope", ctc)
