"""SentencePiece tokenizer trained on the train transcripts, with the ids the models rely on.

Reserved ids: 0 = `<blank>` (CTC blank, SentencePiece's pad slot), 1 = `<unk>`, 2 = `<sos/eos>` (the attention
decoder's start and end symbol, a control symbol). Pieces follow from 3 on. Training is reproducible: one thread,
no input sampling or shuffling, so the same transcripts give byte-identical model files.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from edgeconformer.errors import UserError
from edgeconformer.files import write_bytes_atomic

BLANK_ID, UNK_ID, SOS_EOS_ID = 0, 1, 2


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise FileNotFoundError(
                f"{self.model_path}: tokenizer model not found; run `dvc repro tokenize` "
                "(or `python pipelines/train_tokenizer.py`) first"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        assert self.sp.pad_id() == BLANK_ID and self.sp.unk_id() == UNK_ID, "tokenizer trained with other ids"
        self.blank_id, self.unk_id, self.sos_eos_id = BLANK_ID, UNK_ID, SOS_EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text.lower())

    def decode(self, ids: list[int]) -> str:
        """Drops reserved ids, so raw CTC/decoder output can be passed as is; returns upper-case text."""
        return self.sp.decode([i for i in ids if i > SOS_EOS_ID]).upper()

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


def train_tokenizer(
    texts: list[str],
    out_dir: str | Path,
    vocab_size: int = 128,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> Path:
    """Trains on `texts` (lower-cased: pieces are shared by case) and writes out_dir/tokenizer.{model,vocab}."""
    if not texts:
        raise UserError("no transcripts to train the tokenizer on: the train manifest is empty")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise UserError(f"data.tokenizer.type={model_type!r}: choose unigram, bpe, char or word")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # In-memory input and output: file-based training records the temp paths in the model, which would make
    # two trainings on the same text differ byte-wise.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([t.lower() for t in texts]),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=BLANK_ID,
            pad_piece="<blank>",
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            control_symbols=["<sos/eos>"],
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            minloglevel=2,
            hard_vocab_limit=model_type not in ("char",),
        )
    except RuntimeError as e:
        if "Vocabulary size" in str(e):
            raise UserError(
                f"data.tokenizer.vocab_size={vocab_size} is too large for these transcripts: {str(e).split('] ')[-1]}"
            ) from e
        raise
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    write_bytes_atomic(out_dir / "tokenizer.model", model.getvalue())
    write_bytes_atomic(out_dir / "tokenizer.vocab", vocab.encode("utf-8"))
    return out_dir / "tokenizer.model"
