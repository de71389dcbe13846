"""DVC stage `export@<variant>-s<seed>`: models/<variant>/s<seed>/stabilized.pt -> model.mlpackage beside it (Core ML
ML program) and reports/runs/<variant>/s<seed>/conversion.json. Works on Linux and macOS.

    python pipelines/export.py variant=dws export.precision=fp32
"""

from edgeconformer.config import run_stage
from edgeconformer.stages.export import export

if __name__ == "__main__":
    run_stage(export)
