"""edgeconformer: reproducible on-device Conformer ASR research pipeline."""

__version__ = "0.1.0"
