"""Public-domain English sentences for the offline `mini` corpus.

The pool `texts/kjv_clauses.txt` is committed so the corpus never changes with a distribution's package version
and builds the same on macOS. It was made once from Debian's `bible-kjv-text` (King James Version, public domain)
with `python -m edgeconformer.data.texts build` (the `bible` program dumps the verses); its SHA-256 is recorded in
`texts/SOURCE.md` and checked at load time.

Selection, and why: verses are split into clauses at . ; : ? ! (one clause reads as one sentence), normalised to
LibriSpeech's transcript alphabet (A-Z, apostrophe, space), kept when 4-14 words long. The pool keeps clauses whose
words all lie in the 2000 most frequent words of the clause set; the corpus builder narrows that further to the N
most frequent (config `data.synth.vocab_words`), which is what makes the corpus learnable in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import re
import subprocess
from importlib import resources
from pathlib import Path

POOL_NAME = "kjv_clauses.txt"
POOL_SHA256 = "367f8d44cebd0cdddebace237026945eb954cfdf07961dbcd47e9588718f1c8e"
MIN_WORDS, MAX_WORDS, POOL_VOCAB = 4, 14, 2000

_CLAUSE_SPLIT = re.compile(r"[.;:?!]")
_NOT_ALLOWED = re.compile(r"[^A-Z' ]")


def normalise(text: str) -> list[str]:
    """Upper-case words over LibriSpeech's alphabet; hyphens separate words, apostrophes stay inside words."""
    text = _NOT_ALLOWED.sub(" ", text.upper().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def clauses_from_verses(lines: list[str]) -> list[str]:
    """Lines look like `Ge1:1 In the beginning ...`; returns unique clauses in first-seen order."""
    out: dict[str, None] = {}
    for line in lines:
        _, _, verse = line.partition(" ")
        for clause in _CLAUSE_SPLIT.split(verse):
            words = normalise(clause)
            if MIN_WORDS <= len(words) <= MAX_WORDS:
                out.setdefault(" ".join(words))
    return list(out)


def restrict_vocabulary(sentences: list[str], n_words: int) -> list[str]:
    """Sentences whose words are all among the n most frequent words of `sentences` (ties broken alphabetically)."""
    counts = collections.Counter(w for s in sentences for w in s.split())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top = {w for w, _ in ranked[:n_words]}
    return [s for s in sentences if all(w in top for w in s.split())]


def pool_path() -> Path:
    return Path(str(resources.files("edgeconformer.data") / "texts" / POOL_NAME))


def load_pool() -> list[str]:
    path = pool_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != POOL_SHA256:
        raise RuntimeError(
            f"{path}: SHA-256 {digest} does not match the recorded {POOL_SHA256}; the committed sentence pool was "
            "modified. Restore it with `git checkout -- src/edgeconformer/data/texts` or rebuild it "
            "(python -m edgeconformer.data.texts build) and update POOL_SHA256."
        )
    return data.decode("utf-8").splitlines()


def build_pool(verse_lines: list[str]) -> list[str]:
    return restrict_vocabulary(clauses_from_verses(verse_lines), POOL_VOCAB)


def _main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the committed KJV sentence pool")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--dump", type=Path, help="verses file; default: run `bible -f Gen1:1-Rev22:21`")
    parser.add_argument("--out", type=Path, default=pool_path())
    args = parser.parse_args()
    if args.dump:
        lines = args.dump.read_text(encoding="utf-8").splitlines()
    else:
        lines = subprocess.run(
            ["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    pool = build_pool(lines)
    data = ("\n".join(pool) + "\n").encode("utf-8")
    args.out.write_bytes(data)
    print(f"{len(pool)} clauses -> {args.out} sha256={hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    _main()
