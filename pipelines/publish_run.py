"""DVC stage `train@<variant>-s<seed>`: the run trained by `train_runs` (trained/<variant>/s<seed>/) -> its run
folder models/<variant>/s<seed>/ (checkpoints, tokenizer, config, metrics, learning curves)."""

from edgeconformer.config import run_stage
from edgeconformer.stages.train import publish_run

if __name__ == "__main__":
    run_stage(publish_run)
