"""DVC stage `evaluate@<variant>`: WER per precision (incl. the Core ML program, simulated off macOS), RTF, device
estimates, FLOPs -> metrics/<variant>.json and reports/<variant>/utterances.jsonl.

    python pipelines/evaluate.py variant=dws eval.max_utterances=50
"""

from edgeconformer.config import run_stage
from edgeconformer.evaluate.stage import evaluate

if __name__ == "__main__":
    run_stage(evaluate)
