"""DVC stage `tokenize`: train transcripts -> data/prepared/tokenizer/tokenizer.model (SentencePiece).

Not named tokenize.py: a script directory is first on sys.path, and that name would shadow the standard library's
`tokenize` module that Python itself imports."""

from edgeconformer.config import run_stage
from edgeconformer.data.prepare import tokenize

if __name__ == "__main__":
    run_stage(tokenize)
