"""One training run: manifests + tokenizer -> models/<variant>/s<seed>/ (Lightning; resumable). The chain trains its
runs side by side in the `train_runs` stage (pipelines/train_runs.py), then publishes each with
`train@<variant>-s<seed>`.

Hydra multirun works too: `python pipelines/train.py -m model.subsampling=vanilla,dws` (one W&B run per job).
"""

from edgeconformer.config import run_stage
from edgeconformer.stages.train import train

if __name__ == "__main__":
    run_stage(train)
