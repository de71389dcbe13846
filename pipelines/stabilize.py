"""DVC stage `stabilize@<variant>`: models/<variant>/best.ckpt -> models/<variant>/stabilized.pt,
reports/<variant>/fp16_audit.json (+ .png) and reports/<variant>/stabilize.json. No retraining.

    python pipelines/stabilize.py variant=dws stabilize.prenorm=linf
"""

from edgeconformer.config import run_stage
from edgeconformer.stabilize.stage import stabilize

if __name__ == "__main__":
    run_stage(stabilize)
