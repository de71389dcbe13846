"""DVC stage `stabilize@<variant>-s<seed>`: models/<variant>/s<seed>/best.ckpt -> stabilized.pt beside it,
reports/runs/<variant>/s<seed>/fp16_audit.json (+ .png), stabilize.json and precision_modes.json. No retraining.

    python pipelines/stabilize.py variant=dws seed=1 stabilize.prenorm=linf
"""

from edgeconformer.config import run_stage
from edgeconformer.stages.stabilize import stabilize

if __name__ == "__main__":
    run_stage(stabilize)
