"""DVC stage `compare`: every run's evaluation -> metrics/<variant>.json (mean +- sd over seeds) and
metrics/comparisons.json (paired differences with bootstrap CIs over utterances and seeds)."""

from edgeconformer.config import run_stage
from edgeconformer.stages.compare import compare

if __name__ == "__main__":
    run_stage(compare)
