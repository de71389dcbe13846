"""DVC stage `train_runs`: every run of `runs` (variant x seed), `trainer.parallel_runs` at a time on
`trainer.run_threads` threads each -> trained/<variant>/s<seed>/ (stages/train.py says why a pool).

    python pipelines/train_runs.py --params params.yaml [key=value ...]
"""

import sys

from edgeconformer.config import load_params, params_argument
from edgeconformer.errors import UserError
from edgeconformer.stages.train import train_runs


def main(argv: list[str]) -> None:
    try:
        # the pool's workers compose each run from the same file and overrides, so both are passed on
        params, overrides = params_argument(argv)
        params = params or "params.yaml"
        cfg, _ = load_params(params, overrides)
        train_runs(cfg, params, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
