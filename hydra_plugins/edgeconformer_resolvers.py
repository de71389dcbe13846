"""Registers edgeconformer's OmegaConf resolvers (`${edgeconformer.runs:...}` in conf/config.yaml) and the model
config's structured schema (conf/model/*.yaml start from `model_schema`) wherever Hydra
scans its plugins: `dvc exp run -S ...` composes conf/ into params.yaml in DVC's own process, which imports the
`hydra_plugins` namespace package from the repository root (DVC's `hydra.plugins_path`) but not edgeconformer."""

from edgeconformer.config import register_resolvers
from edgeconformer.models.config import register_schema

register_resolvers()
register_schema()
