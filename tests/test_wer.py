import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeconformer.scoring import score


def edit_distance(a: list[str], b: list[str]) -> int:
    # Plain Levenshtein over tokens: the independent reference for the per-utterance error counts.
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_hand_computed_corpus():
    # utt a: B->X substitution, D inserted (2 errors / 3 words); utt b: both words deleted (2 / 2).
    result = score(["A B C", "D E"], ["A X C D", ""], ["a", "b"])
    assert (result["substitutions"], result["deletions"], result["insertions"], result["hits"]) == (1, 2, 1, 2)
    assert result["ref_words"] == 5 and result["n_utterances"] == 2
    assert result["wer"] == pytest.approx(100 * 4 / 5)
    # characters: "A B C" -> "A X C D" is 1 substitution + 2 insertions (" D"); "D E" -> "" is 3 deletions; 8 chars
    assert result["cer"] == pytest.approx(100 * 6 / 8)
    assert result["utterances"] == [
        {"id": "a", "reference": "A B C", "hypothesis": "A X C D", "errors": 2, "ref_words": 3, "wer": 100 * 2 / 3},
        {"id": "b", "reference": "D E", "hypothesis": "", "errors": 2, "ref_words": 2, "wer": 100.0},
    ]


def test_whitespace_is_normalised_and_insertions_exceed_100_percent():
    result = score(["  HELLO   WORLD "], ["HELLO WORLD"], ["u"])
    assert result["wer"] == 0.0 and result["utterances"][0]["ref_words"] == 2
    result = score(["HI"], ["HI THERE YOU ALL"], ["u"])
    assert result["wer"] == pytest.approx(300.0) and result["insertions"] == 3


words = st.lists(st.sampled_from(list(string.ascii_uppercase[:5])), min_size=0, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(words.filter(bool), words), min_size=1, max_size=6))
def test_per_utterance_rows_add_up_to_the_corpus_figures(pairs):
    refs = [" ".join(r) for r, _ in pairs]
    hyps = [" ".join(h) for _, h in pairs]
    result = score(refs, hyps, [f"u{i}" for i in range(len(pairs))])
    rows = result["utterances"]
    for (ref, hyp), row in zip(pairs, rows):
        assert row["errors"] == edit_distance(ref, hyp)
        assert row["ref_words"] == len(ref)
        assert row["wer"] == pytest.approx(100 * row["errors"] / len(ref))
    errors = sum(r["errors"] for r in rows)
    assert errors == result["substitutions"] + result["deletions"] + result["insertions"]
    assert result["hits"] + result["substitutions"] + result["deletions"] == result["ref_words"]
    assert result["wer"] == pytest.approx(100 * errors / result["ref_words"])


@pytest.mark.parametrize(
    "refs,hyps,ids,match",
    [
        (["A", ""], ["A", "B"], ["x", "y"], "utterance 'y': empty reference"),
        (["A", "   "], ["A", "B"], ["x", "y"], "utterance 'y': empty reference"),
        (["A", "B"], ["A"], ["x", "y"], "same length"),
        (["A", "B"], ["A", "B"], ["x", "x"], "'x' appears twice"),
        ([], [], [], "no utterances"),
        (["A"], [None], ["x"], "must be strings"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(refs, hyps, ids, match):
    with pytest.raises(ValueError, match=match):
        score(refs, hyps, ids)
