"""The metrics schema: one typed record per evaluated run and one per variant, used by the evaluate stage (which
builds it), the compare stage (which aggregates it), the report (which validates and reads it) and W&B (whose
summary keys it names).

Files (docs/evaluation.md, "The files"):

* `RunMetrics`: a run's `reports/runs/<variant>/s<seed>/evaluation.json` (an ablation job's `metrics.json`), and
  every entry of `seeds` in `metrics/<variant>.json`.
* `VariantMetrics`: `metrics/<variant>.json`, the compare stage's mean/sd over seeds (`RateStats`) and the runs.
* Nested objects are their own records: `Machine`, `AttentionState` (`BlockState` per block), `CoremlSim`,
  `RtfProtocol`, `DeviceEstimate`. Open-ended maps (FLOP shares per part, estimates per device, the
  stabilization options, softmax k counts, non-finite utterances per mode) stay plain dicts.

A record's fields are its JSON keys in file order. A key that is not in the file is `ABSENT` (not `None`, which is
a JSON null), so `to_dict()` writes exactly the keys it was given, in the schema's order, unknown keys last
(`extra`): a file written in the schema's order reads back byte-identical (tests/test_metrics.py checks the
committed metrics). `from_dict(d, source=...)` validates first (`problems`) and raises a `MetricsError` naming the
file, every key at fault and the fix; `parse(d)` reads without validating (the compare stage aggregates partial
records, the report lists problems instead of failing).

Validation (`problems`, the report's `validate_metrics`): "required" keys must be present (`SCHEMA`: key ->
nullable), "optional" ones (`OPTIONAL`, the Practical-Conformer figures) are checked when present and may be null;
the other fields are recorded as written and not checked; extra keys are allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from edgeconformer.errors import UserError


class _Absent:
    """The value of a field whose key is not in the file (None is a JSON null)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()

# Validation kinds of a checked field (the messages below name them).
PERCENT, POSITIVE, FRACTION, LABEL, NAME, COUNT, OBJECT = (
    "percent",
    "positive",
    "fraction",
    "label",
    "name",
    "count",
    "object",
)


def key(
    *,
    status: str = "recorded",
    nullable: bool = True,
    kind: str | None = None,
    nested=None,
    wandb: bool = False,
    flatten: tuple[str, str] | None = None,
):
    """A schema field. status: "required" (must be present; `nullable` says whether it may be null), "optional"
    (checked when present, may be null or missing) or "recorded" (written and read, not checked). kind: the
    check of a required/optional value. nested: ("one" | "list" | "map", Record class) for a JSON object read into
    a record. wandb: a key of the W&B panels (`WANDB_KEYS`). flatten: (prefix, start) for a dict field stored as
    one `<prefix><name>` key per entry, its names starting with `start` (the stabilization arms:
    ("wer_", "acc16_") stores {"acc16_none": ...} as wer_acc16_none)."""
    return field(
        default=ABSENT,
        metadata={
            "status": status,
            "nullable": nullable,
            "kind": kind,
            "nested": nested,
            "wandb": wandb,
            "flatten": flatten,
        },
    )


def required(kind: str | None = None, *, nullable: bool = False, wandb: bool = False, nested=None):
    return key(status="required", nullable=nullable, kind=kind, wandb=wandb, nested=nested)


def optional(kind: str | None = None, *, nested=None):
    return key(status="optional", kind=kind, nested=nested)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class MetricsError(UserError):
    """A metrics file or record that does not match the schema; the message names the file, the keys and the fix."""


# ------------------------------------------------------------------------------------------------ records
@dataclass(kw_only=True)
class Record:
    """A JSON object with declared keys (the dataclass fields, in file order) and `extra`: the keys the schema
    does not know, kept and written last."""

    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def schema_fields(cls):
        return [f for f in fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict:
        """The JSON object: declared keys that are not ABSENT in schema order, nested records as objects, then
        `extra`."""
        out = {}
        for f in self.schema_fields():
            value = getattr(self, f.name)
            if value is ABSENT:
                continue
            if f.metadata["flatten"]:
                out.update({f"{f.metadata['flatten'][0]}{name}": v for name, v in value.items()})
            else:
                out[f.name] = _plain(value)
        out.update(self.extra)
        return out

    @classmethod
    def parse(cls, d: dict):
        """The record of a JSON object, without validation: a nested part that is not a JSON object (or a list of
        them) is kept as it is."""
        values, known = {}, set()
        for f in cls.schema_fields():
            if f.metadata["flatten"]:
                prefix, start = f.metadata["flatten"]
                names = [k for k in d if k.startswith(prefix + start)]
                values[f.name] = {k[len(prefix) :]: d[k] for k in names}
                known.update(names)
            elif f.name in d:
                values[f.name] = _nested(f.metadata["nested"], d[f.name])
                known.add(f.name)
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    def get(self, name: str, default=None):
        """The value of a key of the file (a field, a flattened entry such as wer_acc16_none, or an extra key);
        `default` when the key is absent or null, as a dict's .get of to_dict() would give."""
        value = ABSENT
        for f in self.schema_fields():
            flatten = f.metadata["flatten"]
            if f.name == name and not flatten:
                value = getattr(self, name)
            elif flatten and name.startswith(flatten[0] + flatten[1]):
                value = (getattr(self, f.name) or {}).get(name[len(flatten[0]) :], ABSENT)
        if value is ABSENT:
            value = self.extra.get(name, ABSENT)
        return default if value is ABSENT or value is None else value


def _plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _nested(spec, value):
    if spec is None:
        return value
    how, cls = spec
    if how == "one" and isinstance(value, dict):
        return cls.parse(value)
    if how == "list" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [cls.parse(v) for v in value]
    if how == "map" and isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        return {k: cls.parse(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class Machine(Record):
    """`evaluate.rtf.machine_info()`: the facts every timing is stored with (the required ones: MACHINE_KEYS)."""

    platform: str = key(status="required")
    machine: str = key()
    cpu_model: str = key(status="required")
    cpu_count: int = key()
    cpus_available: int = key()
    torch_version: str = key(status="required")
    torch_threads: int = key(status="required")
    python_version: str = key(status="required")


@dataclass(kw_only=True)
class BlockState(Record):
    """One streamed block's state bytes (`attention_state_bytes.per_block`)."""

    block: int = key()
    kind: str = key()
    attention: int = key()
    positions: int = key()
    conv: int = key()


@dataclass(kw_only=True)
class AttentionState(Record):
    """`evaluate.state.attention_state_bytes`: the streaming state after `seconds` of audio (float32, batch 1); the
    byte counts STATE_BYTES are required."""

    seconds: float = key()
    encoder_frames: int = key()
    chunk_size: int = key()
    left_chunks: int = key()
    streamable: bool = key()
    blocks: int = key()
    attention: int = key(status="required", kind=COUNT)
    positions: int = key(status="required", kind=COUNT)
    conv: int = key(status="required", kind=COUNT)
    per_block: list[BlockState] = key(nested=("list", BlockState))


@dataclass(kw_only=True)
class CoremlSim(Record):
    """The exported program run by the MIL executor against the PyTorch FP16 graph (the evaluate stage)."""

    wer: float = key()
    cer: float = key()
    max_abs_diff_vs_pytorch_fp16: float = key()
    identical_transcripts: int = key()
    utterances: int = key()
    seconds: float = key()
    wer_pytorch_fp16_same_utterances: float = key()


@dataclass(kw_only=True)
class RtfProtocol(Record):
    """`evaluate.rtf.measure_rtf` without its per-utterance rows: the CPU timing and how it was taken."""

    rtf: float = key()
    rtf_median: float = key()
    rtf_p90: float = key()
    rtf_total: float = key()
    compute_seconds: float = key()
    audio_seconds: float = key()
    audio_seconds_min: float = key()
    audio_seconds_median: float = key()
    audio_seconds_max: float = key()
    n_utterances: int = key()
    warmup: int = key()
    repeats: int = key()
    threads: int = key()
    protocol: str = key()
    machine: Machine = key(nested=("one", Machine))


@dataclass(kw_only=True)
class DeviceEstimate(Record):
    """`evaluate.device.estimate_from_ops` for one device profile (an idealised roofline, not a measurement)."""

    rtf: float = key()
    flops_per_audio_second: float = key()
    bytes_per_audio_second: float = key()
    weight_bytes_per_forward: int = key()
    activation_bytes_per_forward: int = key()
    bound: str = key()
    rtf_compute_only: float = key()
    rtf_memory_only: float = key()
    rtf_whole_model: float = key()
    rtf_by_part: dict[str, float] = key()
    n_ops: int = key()
    seconds: float = key()
    precision: str = key()
    device: str = key()
    sustained_flops: float = key()
    memory_bandwidth: float = key()
    model: str = key()
    note: str = key()


@dataclass(kw_only=True)
class RunMetrics(Record):
    """One evaluated run (evaluation.json). WER/CER in percent (0-100, above 100 possible); what cannot be measured
    on this machine is null (Core ML needs macOS), never a guess. docs/evaluation.md has every key's meaning."""

    variant: str = required(LABEL)
    seed: int = key()
    model: str = key()
    wer_fp32: float = required(PERCENT, wandb=True)
    wer_fp16: float = required(PERCENT, wandb=True)
    wer_fp16_unstabilized: float = required(PERCENT, wandb=True)
    wer_coreml_sim: float | None = required(PERCENT, nullable=True, wandb=True)
    wer_coreml: float | None = required(PERCENT, nullable=True)
    cer_fp32: float = required(PERCENT)
    cer_fp16: float = key()
    rtf_cpu: float = required(POSITIVE, wandb=True)
    rtf_cpu_p90: float = key()
    rtf_coreml: float | None = required(POSITIVE, nullable=True)
    rtf_device_estimate: float | None = required(POSITIVE, nullable=True, wandb=True)
    device: str | None = required(NAME, nullable=True)
    rtf_device_estimates: dict[str, float] | None = required(OBJECT, nullable=True)
    flops_subsampling_share: float = required(FRACTION, wandb=True)
    flops_shares: dict[str, float] = required(OBJECT)
    gflops_per_audio_second: float = required(POSITIVE, wandb=True)
    params_millions: float = required(POSITIVE, wandb=True)
    # Practical Conformer (docs/practical.md); the first-pass figures are null for a model without a cascade.
    gflops_per_audio_second_streamed: float | None = optional(POSITIVE)
    attention_state_bytes: AttentionState | None = optional(OBJECT, nested=("one", AttentionState))
    wer_first_pass_fp32: float | None = optional(PERCENT)
    rtf_cpu_first_pass: float | None = optional(POSITIVE)
    n_utterances: int = required(COUNT)
    audio_hours: float = required(POSITIVE)
    split: str = key()
    stabilization: dict = key()
    nonfinite_utterances: dict[str, int] = key()
    # The stabilization ablation, FP16 accumulation emulated: {arm: WER}, stored as wer_<arm> (wer_acc16_none, ...);
    # empty when stabilize.ablation is off.
    stabilization_arms: dict[str, float] = key(flatten=("wer_", "acc16_"))
    softmax_k: dict | None = key()
    audit_frontend_peak: float | None = key()
    coreml_sim: CoremlSim = key(nested=("one", CoremlSim))
    coreml_device: dict | None = key()
    rtf_protocol: RtfProtocol = key(nested=("one", RtfProtocol))
    device_estimates: dict[str, DeviceEstimate] = key(nested=("map", DeviceEstimate))
    machine: Machine = required(OBJECT, nested=("one", Machine))

    @classmethod
    def from_dict(cls, d, source: str = "metrics") -> RunMetrics:
        """The validated record; MetricsError naming `source` (the file), every problem and the fix otherwise."""
        found = problems(d)
        if found:
            run = f"{d.get('variant')}-s{d.get('seed')}" if isinstance(d, dict) and "seed" in d else "<run>"
            raise MetricsError(
                f"{source}: not a valid run record:\n"
                + "\n".join(f"  - {p}" for p in found)
                + f"\nRe-run `dvc repro evaluate@{run}` (or fix the keys named); docs/evaluation.md "
                "has the schema."
            )
        return cls.parse(d)

    def arm_wers(self) -> dict[str, float]:
        """{"wer_acc16_none": ..., ...}: the stabilization arms under their file keys."""
        return {f"wer_{arm}": wer for arm, wer in (self.stabilization_arms or {}).items()}


@dataclass(kw_only=True)
class RateStats(Record):
    """One rate's mean and sample sd over the seeds that have it (`stats` of metrics/<variant>.json)."""

    metric: str = key()
    mean: float = key()
    sd: float | None = key()
    n: int = key()


# The rates averaged over seeds; the headline ones also at the top of metrics/<variant>.json as <key>_mean/_sd.
STABILIZATION_ARMS = ("acc16_none", "acc16_prenorm", "acc16_lut", "acc16_both", "acc16_both_uncapped")
RATES = (
    "wer_fp32",
    "wer_fp16",
    "wer_fp16_unstabilized",
    "cer_fp32",
    "cer_fp16",
    "wer_coreml_sim",
    "wer_coreml",
    "wer_first_pass_fp32",
    *(f"wer_{arm}" for arm in STABILIZATION_ARMS),
)
HEADLINE = ("wer_fp32", "wer_fp16", "wer_fp16_unstabilized", "cer_fp32")
# Figures that do not depend on the seed (counted from the architecture): taken from the first seed.
FIXED = ("gflops_per_audio_second", "gflops_per_audio_second_streamed", "flops_subsampling_share", "params_millions")


@dataclass(kw_only=True)
class VariantMetrics(Record):
    """metrics/<variant>.json (the compare stage): the headline mean/sd at the top (what `dvc metrics show` lists;
    a rate no seed has is ABSENT), the seed-independent figures (FIXED, from the first seed), the median CPU RTF
    over seeds, every rate's `stats` and every run in `seeds`."""

    variant: str = key()
    n_seeds: int = key()
    n_utterances: int | None = key()
    wer_fp32_mean: float = key()
    wer_fp32_sd: float | None = key()
    wer_fp16_mean: float = key()
    wer_fp16_sd: float | None = key()
    wer_fp16_unstabilized_mean: float = key()
    wer_fp16_unstabilized_sd: float | None = key()
    cer_fp32_mean: float = key()
    cer_fp32_sd: float | None = key()
    gflops_per_audio_second: float | None = key()
    gflops_per_audio_second_streamed: float | None = key()
    flops_subsampling_share: float | None = key()
    params_millions: float | None = key()
    rtf_cpu: float | None = key()
    stats: list[RateStats] = key(nested=("list", RateStats))
    seeds: list[RunMetrics] = key(nested=("list", RunMetrics))

    @classmethod
    def from_dict(cls, d, source: str = "metrics/<variant>.json") -> VariantMetrics:
        """The validated record (every seed's run checked); MetricsError naming the file, the seed and key at
        fault and the fix otherwise."""
        if not isinstance(d, dict):
            raise MetricsError(
                f"{source}: metrics must be a JSON object, got {type(d).__name__}; re-run `dvc repro compare`"
            )
        seeds = d.get("seeds")
        if not isinstance(seeds, list) or not seeds:
            raise MetricsError(f"{source}: 'seeds' must be a non-empty list of runs; re-run `dvc repro compare`")
        found = [
            f"seed {s.get('seed') if isinstance(s, dict) else '?'}: {p}"
            for s in seeds
            for p in problems(dict(s, variant=d.get("variant")) if isinstance(s, dict) else s)
        ]
        if found:
            raise MetricsError(
                f"{source}: not a valid variant record:\n"
                + "\n".join(f"  - {p}" for p in found)
                + "\nRe-run the evaluate stages of those seeds, then `dvc repro compare`; "
                "docs/evaluation.md has the schema."
            )
        return cls.parse(d)


def _table(cls, status: str) -> list:
    return [f for f in cls.schema_fields() if f.metadata["status"] == status]


# Derived from the fields: key -> nullable for the required keys; the optional (checked when present) ones.
SCHEMA = {f.name: f.metadata["nullable"] for f in _table(RunMetrics, "required")}
OPTIONAL = tuple(f.name for f in _table(RunMetrics, "optional"))
CHECKED = {f.name: f.metadata["kind"] for f in _table(RunMetrics, "required") + _table(RunMetrics, "optional")}
STATE_BYTES = tuple(f.name for f in _table(AttentionState, "required"))  # byte counts the state must hold
MACHINE_KEYS = tuple(f.name for f in _table(Machine, "required"))
# The W&B summary keys every evaluated job logs, the panels' vocabulary (wandb_report).
WANDB_KEYS = tuple(f.name for f in RunMetrics.schema_fields() if f.metadata["wandb"])
DELTA_KEYS = ("wer_fp16", "wer_fp16_unstabilized", "wer_coreml_sim")  # logged as delta/<key>: key - wer_fp32


# ------------------------------------------------------------------------------------------------ validation
def problems(d) -> list[str]:
    """Problems of one run's metrics dict against the schema (empty list: valid). Checks presence, types, ranges and
    the consistency between related keys; extra keys are allowed."""
    if not isinstance(d, dict):
        return [f"metrics must be a JSON object, got {type(d).__name__}"]
    found = []
    for name, nullable in SCHEMA.items():
        if name not in d:
            found.append(f"missing key {name!r}")
        elif d[name] is None and not nullable:
            found.append(f"{name} is null but must be measured on every machine")
    present = {k: v for k, v in d.items() if k in CHECKED and v is not None}
    return (
        found
        + _value_problems(present)
        + _flops_problems(present)
        + _practical_problems(present)
        + _device_problems(present)
        + _machine_problems(present)
    )


def _value_problems(present: dict) -> list[str]:
    # The range of every scalar the schema checks, by its kind.
    found = []
    if "variant" in present and not (isinstance(present["variant"], str) and present["variant"]):
        found.append(f"variant must be a non-empty string, got {present['variant']!r}")
    for name in [k for k in CHECKED if CHECKED[k] == PERCENT and k in present]:
        if not (is_number(present[name]) and present[name] >= 0):
            found.append(f"{name} must be a WER/CER in percent (a finite number >= 0), got {present[name]!r}")
    for name in [k for k in CHECKED if CHECKED[k] == POSITIVE and k in present]:
        if not (is_number(present[name]) and present[name] > 0):
            found.append(f"{name} must be a finite number > 0, got {present[name]!r}")
    n = present.get("n_utterances")
    if n is not None and not (is_count(n) and n >= 1):
        found.append(f"n_utterances must be an integer >= 1, got {n!r}")
    if "device" in present and not isinstance(present["device"], str):
        found.append(f"device must be a profile name (string), got {present['device']!r}")
    return found


def _flops_problems(present: dict) -> list[str]:
    found = []
    share = present.get("flops_subsampling_share")
    if share is not None and not (is_number(share) and 0 <= share <= 1):
        found.append(f"flops_subsampling_share must be a fraction in [0, 1], got {share!r}")
    shares = present.get("flops_shares")
    if shares is None:
        return found
    if not isinstance(shares, dict) or not shares:
        found.append("flops_shares must be a non-empty object {part: fraction}")
    elif not all(is_number(v) and 0 <= v <= 1 for v in shares.values()):
        found.append(f"flops_shares values must be fractions in [0, 1], got {shares}")
    else:
        if abs(sum(shares.values()) - 1) > 1e-3:
            found.append(f"flops_shares must sum to 1 (+-1e-3), they sum to {sum(shares.values()):.6f}")
        if "subsampling" not in shares:
            found.append("flops_shares has no 'subsampling' part")
        elif is_number(share) and abs(shares["subsampling"] - share) > 1e-6:
            found.append(
                f"flops_subsampling_share {share} differs from flops_shares['subsampling'] {shares['subsampling']}"
            )
    return found


def _practical_problems(present: dict) -> list[str]:
    # Consistency of the Practical-Conformer keys (their ranges: _value_problems).
    found = []
    streamed, whole = present.get("gflops_per_audio_second_streamed"), present.get("gflops_per_audio_second")
    if is_number(streamed) and is_number(whole) and streamed > whole * (1 + 1e-9):
        found.append(
            f"gflops_per_audio_second_streamed {streamed} exceeds the whole model's "
            f"gflops_per_audio_second {whole} (the streamed part is a part of it)"
        )
    state = present.get("attention_state_bytes")
    if state is None:
        return found
    if not isinstance(state, dict):
        return found + [
            f"attention_state_bytes must be an object (evaluate.state.attention_state_bytes), got {state!r}"
        ]
    bad = [k for k in STATE_BYTES if not is_count(state.get(k))]
    if bad:
        found.append(f"attention_state_bytes needs byte counts (integers >= 0) for {bad}")
    if not (is_number(state.get("seconds")) and state["seconds"] > 0):
        found.append(
            f"attention_state_bytes.seconds must be the audio length > 0 it was counted at, "
            f"got {state.get('seconds')!r}"
        )
    return found


def _device_problems(present: dict) -> list[str]:
    estimates = present.get("rtf_device_estimates")
    if estimates is not None and not (
        isinstance(estimates, dict) and all(isinstance(k, str) and is_number(v) and v > 0 for k, v in estimates.items())
    ):
        return [f"rtf_device_estimates must be an object {{device: RTF > 0}}, got {estimates!r}"]
    if "rtf_device_estimate" not in present:
        return []
    device = present.get("device")
    if device is None:
        return ["rtf_device_estimate is set but device (the profile it was estimated for) is null"]
    if (
        estimates is not None
        and device in estimates
        and not math.isclose(estimates[device], present["rtf_device_estimate"], rel_tol=1e-9)
    ):
        return [
            f"rtf_device_estimate {present['rtf_device_estimate']} differs from "
            f"rtf_device_estimates[{device!r}] {estimates[device]}"
        ]
    return []


def _machine_problems(present: dict) -> list[str]:
    machine = present.get("machine")
    if machine is None:
        return []
    if not isinstance(machine, dict):
        return [f"machine must be an object of machine facts, got {machine!r}"]
    missing = [k for k in MACHINE_KEYS if k not in machine]
    return [f"machine lacks {missing} (use evaluate.rtf.machine_info())"] if missing else []


# ------------------------------------------------------------------------------------------------ W&B
def wandb_summary(d: dict) -> dict:
    """The W&B summary of a metrics dict (a run's, or any flat dict of figures): its numbers under their schema
    keys, FLOP shares as `flops_share/<part>`, the streaming state as `attention_state_bytes/<part>` (bytes) and the
    FP16 deltas `delta/<key>` (key - wer_fp32, for DELTA_KEYS); nulls and other nested facts are left out."""
    summary = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for part, share in (d.get("flops_shares") or {}).items():
        summary[f"flops_share/{part}"] = share
    state = d.get("attention_state_bytes") or {}
    for part in STATE_BYTES:
        if isinstance(state.get(part), int):
            summary[f"attention_state_bytes/{part}"] = state[part]
    for name in DELTA_KEYS:
        if d.get(name) is not None and d.get("wer_fp32") is not None:
            summary[f"delta/{name}"] = d[name] - d["wer_fp32"]
    return summary
