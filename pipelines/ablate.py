"""Hydra multirun ablations, each job end to end (train -> stabilize -> export -> evaluate) with one W&B run per
job, grouped per sweep:

    python pipelines/ablate.py -m model.subsampling=vanilla,dws stabilize.prenorm=none,mad

Jobs write into their Hydra job folders (multirun/<date>/<time>/<n>/); see docs/reproduce.md for launchers.
"""

from edgeconformer.ablate import ablate
from edgeconformer.config import run_stage

if __name__ == "__main__":
    run_stage(ablate)
