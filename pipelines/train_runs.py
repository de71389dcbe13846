"""DVC stage `train_runs`: every run of `runs` (variant x seed), `trainer.parallel_runs` at a time on
`trainer.run_threads` threads each -> trained/<variant>/s<seed>/ (stages/train.py says why a pool).

    python pipelines/train_runs.py --params params.yaml [key=value ...]
"""

import sys

from edgeconformer.config import load_params
from edgeconformer.errors import UserError
from edgeconformer.stages.train import train_runs


def main(argv: list[str]) -> None:
    params = "params.yaml"
    if "--params" in argv:
        i = argv.index("--params")
        params, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    cfg, _ = load_params(params, argv)
    try:
        train_runs(cfg, params, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
