"""DVC stage `train@<variant>`: manifests + tokenizer -> models/<variant>/ (Lightning; resumable).

Hydra multirun works too: `python pipelines/train.py -m model.subsampling=vanilla,dws` (one W&B run per job).
"""

from edgeconformer.config import run_stage
from edgeconformer.stages.train import train

if __name__ == "__main__":
    run_stage(train)
