"""Counted FLOPs per audio second and the share of each part, for any model config.

    python pipelines/flops.py model=conformer_m model.subsampling=dws

Prints a table; the last stdout line is one JSON object with `gflops_per_audio_second` and `shares`.
"""

from edgeconformer.config import run_stage
from edgeconformer.evaluate.flops import flops_report

if __name__ == "__main__":
    run_stage(flops_report)
