import pytest

from edgeconformer.data.tokenizer import BLANK_ID, SOS_EOS_ID, UNK_ID, Tokenizer, train_tokenizer
from edgeconformer.errors import UserError

TEXTS = [
    "AND THE LORD SAID UNTO MOSES",
    "IT'S THE SAME THING",
    "THE EARTH WAS WITHOUT FORM AND VOID",
    "AND GOD SAW THE LIGHT THAT IT WAS GOOD",
    "LET THERE BE LIGHT AND THERE WAS LIGHT",
] * 20


def test_reserved_ids_and_round_trip(tmp_path):
    tok = Tokenizer(train_tokenizer(TEXTS, tmp_path, vocab_size=30))
    assert tok.vocab_size == 30
    assert (tok.blank_id, tok.unk_id, tok.sos_eos_id) == (BLANK_ID, UNK_ID, SOS_EOS_ID) == (0, 1, 2)
    assert tok.sp.id_to_piece(0) == "<blank>" and tok.sp.id_to_piece(2) == "<sos/eos>"
    for text in TEXTS[:5]:
        ids = tok.encode(text)
        assert min(ids) > SOS_EOS_ID and tok.decode(ids) == text
    # reserved ids in raw model output are ignored by decode
    ids = tok.encode("THE EARTH")
    assert tok.decode([0, *ids[:1], 0, 2, *ids[1:], 0]) == "THE EARTH"


def test_training_is_reproducible(tmp_path):
    a = train_tokenizer(TEXTS, tmp_path / "a", vocab_size=30).read_bytes()
    b = train_tokenizer(TEXTS, tmp_path / "b", vocab_size=30).read_bytes()
    assert a == b


def test_char_model_and_errors(tmp_path):
    tok = Tokenizer(train_tokenizer(TEXTS, tmp_path, vocab_size=30, model_type="char"))
    assert tok.decode(tok.encode("GOOD LIGHT")) == "GOOD LIGHT"
    with pytest.raises(UserError, match="data.tokenizer.type"):
        train_tokenizer(TEXTS, tmp_path, model_type="wordpiece")
    with pytest.raises(UserError, match="train manifest is empty"):
        train_tokenizer([], tmp_path)
    with pytest.raises(FileNotFoundError, match="dvc repro tokenize"):
        Tokenizer(tmp_path / "missing.model")


def test_too_large_vocabulary_names_the_key(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer.vocab_size=500"):
        train_tokenizer(TEXTS, tmp_path, vocab_size=500)
