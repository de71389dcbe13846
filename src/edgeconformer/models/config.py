"""The model's typed configuration, in two levels (as whisper's ModelDimensions or nanoGPT's GPTConfig):

* `ModelConfig` is the recipe as written in conf/model/*.yaml. It is Hydra's structured schema of the `model`
  group (`register_schema`; the yaml files start from `model_schema`), so a misspelt or unknown key fails when
  the config is composed, and values are type-checked. The checkpoint stores it (`hparams["model"]`, as a plain
  dict: checkpoints load with weights_only=True, which refuses pickled classes).
* `EncoderDims` is what the encoder is built from: every size resolved (per-block widths of `stages`, the cascade's
  second pass appended, `first_pass_layers`). ConformerEncoder records its own (`encoder.dims`), and every other
  form of the model (the Neural Engine graph, FLOP counting, streaming state) reads the sizes there instead of
  probing modules.

Defaults of keys added after the first checkpoints were trained build exactly the model those checkpoints hold
(e.g. `subsampling_channels: null` = d_model, `attention: softmax`, no cascade); conf/model/small.yaml sets the
recipe's values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from edgeconformer.errors import ConfigError

SUBSAMPLING = ("vanilla", "dws")
ATTENTION = ("softmax", "performer")
STAGE_KEYS = ("n_layers", "d_model", "n_heads", "ff_dim")
SCHEMA = "model_schema"  # the name conf/model/*.yaml put first in their defaults list


@dataclass
class EncoderConfig:
    d_model: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ff_dim: int = 576
    kernel_size: int = 15
    dropout: float = 0.1
    pos: str = "rel"  # rel | abs
    norm: str = "layer"  # layer | batch (the convolution module's norm)
    causal: bool = False
    chunk_size: int = 0
    left_chunks: int = -1
    dynamic_chunk: bool = False
    conv_only_layers: int = 0
    stages: list[Any] | None = None  # [{n_layers, d_model, n_heads, ff_dim}, ...]; keys left out: the values above
    attention: str = "softmax"  # softmax | performer
    performer_features: int = 64
    performer_seed: int = 0


@dataclass
class DecoderConfig:
    n_layers: int = 1
    n_heads: int = 4
    ff_dim: int = 576
    dropout: float = 0.1


@dataclass
class CascadeConfig:
    enabled: bool = False
    n_layers: int = 2
    d_model: int | None = None
    n_heads: int | None = None
    ff_dim: int | None = None
    attention: str = "softmax"
    first_pass_weight: float = 0.5


@dataclass
class SpecAugConfig:
    freq_mask_param: int = 10
    num_freq_masks: int = 2
    time_mask_param: int = 10
    num_time_masks: int = 2
    max_time_ratio: float = 0.05


@dataclass(frozen=True)
class EncoderDims:
    """ConformerEncoder's constructor arguments, resolved: `block_dims` is one (d_model, n_heads, ff_dim) per
    block (None: n_layers uniform blocks of d_model/n_heads/ff_dim)."""

    idim: int = 80
    d_model: int = 256
    n_layers: int = 16
    n_heads: int = 4
    ff_dim: int = 1024
    kernel_size: int = 31
    dropout: float = 0.1
    subsampling_factor: int = 4
    dws_subsampling: bool = False
    pos: str = "rel"
    causal: bool = False
    chunk_size: int = 0
    left_chunks: int = -1
    dynamic_chunk: bool = False
    norm: str = "layer"
    max_dynamic_chunk: int = 25
    subsampling_channels: int | None = None
    conv_only_layers: int = 0
    block_dims: tuple[tuple[int, int, int], ...] | None = None
    attention: str = "softmax"
    performer_features: int = 64
    performer_seed: int = 0
    first_pass_layers: int = 0
    second_pass_attention: str = "softmax"

    @property
    def blocks(self) -> list[tuple[int, int, int]]:
        """(d_model, n_heads, ff_dim) of every block."""
        if self.block_dims is None:
            return [(self.d_model, self.n_heads, self.ff_dim)] * self.n_layers
        return [tuple(b) for b in self.block_dims]

    @property
    def n_first(self) -> int:
        """Blocks of the (streamable) first pass: all of them without a cascade."""
        return self.first_pass_layers or self.n_layers

    def block_attention(self, i: int) -> str | None:
        """Block i's attention: None for a convolution-only block, else "softmax" or "performer"."""
        if i < self.conv_only_layers:
            return None
        return self.second_pass_attention if i >= self.n_first else self.attention

    def block_causal(self, i: int) -> bool:
        # second-pass blocks of a cascade see the whole utterance: centred kernel, full attention
        return self.causal and i < self.n_first


@dataclass
class ModelConfig:
    name: str = "small"
    subsampling: str = "vanilla"  # vanilla | dws
    subsampling_factor: int = 4
    subsampling_channels: int | None = None  # null = d_model
    n_mels: int = 80
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    ctc_weight: float = 0.5
    lsm_weight: float = 0.1
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)

    @classmethod
    def from_dict(cls, values: Any, where: str = "model") -> ModelConfig:
        """A plain dict or DictConfig (conf/model, a checkpoint's hparams) -> checked ModelConfig. Unknown keys and
        values of the wrong type raise a ConfigError naming the key; keys left out take the defaults above."""
        if isinstance(values, ModelConfig):
            return values
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), values)
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(
                f"{where}.{key}: {str(e).splitlines()[0]} (conf/model/*.yaml and "
                "edgeconformer/models/config.py list the keys)"
            ) from None
        config.check()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        if self.subsampling not in SUBSAMPLING:
            raise ConfigError(f"model.subsampling={self.subsampling!r}: choose one of {SUBSAMPLING}")
        for key, value in (
            ("model.encoder.attention", self.encoder.attention),
            ("model.cascade.attention", self.cascade.attention),
        ):
            if value not in ATTENTION:
                raise ConfigError(f"{key}={value!r}: choose one of {ATTENTION}")
        e = self.encoder
        if not 0 <= e.conv_only_layers <= e.n_layers:
            raise ConfigError(
                f"model.encoder.conv_only_layers={e.conv_only_layers} must be in 0..model.encoder.n_layers={e.n_layers}"
            )
        if self.cascade.enabled and self.cascade.n_layers < 1:
            raise ConfigError("model.cascade.n_layers must be >= 1 (second-pass blocks) when cascade.enabled")

    def stage_dims(self) -> list[tuple[int, int, int]] | None:
        """model.encoder.stages -> per-block (d_model, n_heads, ff_dim), None when unset (uniform blocks). A key
        left out of a stage takes the encoder's value (n_layers: 1)."""
        e = self.encoder
        if not e.stages:
            return None
        dims = []
        for k, s in enumerate(e.stages):
            unknown = set(s) - set(STAGE_KEYS)
            if unknown:
                raise ConfigError(f"model.encoder.stages[{k}] has unknown keys {sorted(unknown)}; use {STAGE_KEYS}")
            size = (s.get("d_model", e.d_model), s.get("n_heads", e.n_heads), s.get("ff_dim", e.ff_dim))
            dims += [size] * s.get("n_layers", 1)
        if len(dims) != e.n_layers:
            raise ConfigError(
                f"model.encoder.stages cover {len(dims)} blocks but model.encoder.n_layers="
                f"{e.n_layers}; make them agree"
            )
        for k, (d, h, _) in enumerate(dims):
            if d % h:
                raise ConfigError(f"model.encoder block {k}: d_model={d} is not divisible by n_heads={h}")
        return dims

    def encoder_dims(self) -> EncoderDims:
        """The encoder's resolved sizes: stages expanded, the cascade's second-pass blocks appended."""
        e, c = self.encoder, self.cascade
        dims = self.stage_dims()
        n_layers, first_pass_layers = e.n_layers, 0
        if c.enabled:
            first = dims or [(e.d_model, e.n_heads, e.ff_dim)] * e.n_layers
            second = (c.d_model or first[-1][0], c.n_heads or e.n_heads, c.ff_dim or e.ff_dim)
            dims = first + [second] * c.n_layers
            n_layers, first_pass_layers = e.n_layers + c.n_layers, e.n_layers
        return EncoderDims(
            idim=self.n_mels,
            d_model=e.d_model,
            n_layers=n_layers,
            n_heads=e.n_heads,
            ff_dim=e.ff_dim,
            kernel_size=e.kernel_size,
            dropout=e.dropout,
            subsampling_factor=self.subsampling_factor,
            dws_subsampling=self.subsampling == "dws",
            pos=e.pos,
            causal=e.causal,
            chunk_size=e.chunk_size,
            left_chunks=e.left_chunks,
            dynamic_chunk=e.dynamic_chunk,
            norm=e.norm,
            subsampling_channels=self.subsampling_channels,
            conv_only_layers=e.conv_only_layers,
            block_dims=None if dims is None else tuple(dims),
            attention=e.attention,
            performer_features=e.performer_features,
            performer_seed=e.performer_seed,
            first_pass_layers=first_pass_layers,
            second_pass_attention=c.attention,
        )


def register_schema() -> None:
    """Hydra's structured schema of conf/model/*.yaml (`defaults: [model_schema, _self_]` in small.yaml, which the
    other model files start from). Registered by edgeconformer.config and by hydra_plugins (DVC's composition)."""
    ConfigStore.instance().store(group="model", name=SCHEMA, node=ModelConfig)
