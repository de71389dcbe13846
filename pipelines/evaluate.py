"""DVC stage `evaluate@<variant>-s<seed>`: WER per precision (incl. the Core ML program, simulated off macOS), RTF,
device estimates, FLOPs -> reports/runs/<variant>/s<seed>/{evaluation.json,utterances.jsonl}.

    python pipelines/evaluate.py variant=dws eval.max_utterances=50
"""

from edgeconformer.config import run_stage
from edgeconformer.stages.evaluate import evaluate

if __name__ == "__main__":
    run_stage(evaluate)
