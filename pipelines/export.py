"""DVC stage `export@<variant>`: models/<variant>/stabilized.pt -> models/<variant>/model.mlpackage (Core ML ML
program) and reports/<variant>/conversion.json. Works on Linux and macOS.

    python pipelines/export.py variant=dws export.precision=fp32
"""

from edgeconformer.config import run_stage
from edgeconformer.export.stage import export

if __name__ == "__main__":
    run_stage(export)
