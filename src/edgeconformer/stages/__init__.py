"""The chain's stage functions, one module per DVC stage: `train`, `stabilize`, `export`, `evaluate`, `compare`.

Each takes the composed config and returns its summary; pipelines/<stage>.py is the thin entry point that calls it.
A stage imports the library (data, models, decoding, stabilize, export, evaluate, scoring) and the artifacts layer,
never another stage or the CLI: what one stage hands to the next goes through files, whose paths and loaders are
in `edgeconformer.artifacts`. (prepare and tokenize live in data/prepare.py: they need nothing but `data`.)
"""
