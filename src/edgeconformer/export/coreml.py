"""Core ML export: a PyTorch module (raw log-mels -> CTC log-probs) -> .mlpackage (ML program) + conversion report.

The module is traced with one example input and converted with coremltools 9 (`convert_to="mlprogram"`). The
input is named `feats`, shape (1, T, n_mels) raw log-mel frames, the output `log_probs` (1, T', V). T follows one
of three shape policies (`shapes`, conf/export/default.yaml):

* fixed       one length, e.g. the streaming chunk: the graph is static, the best case for the Neural Engine;
* enumerated  a list of lengths (ct.EnumeratedShapes): Core ML compiles each one, each can run on the ANE;
* ranged      ct.RangeDim(lower, upper, default): any length, but Core ML runs only the default one on the ANE.

The package's metadata carries everything an app needs to reproduce the front end and decode (`front_end`,
`build_metadata`, docs/export.md): an app must compute identical features, or the model sees inputs it was never
trained on.
The conversion report (`conversion_report`) describes the program that was saved: op histogram, dtype per op
type, weight bytes, input/output specs and the ops known to keep a program off the ANE, with the reason.
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from edgeconformer import __version__
from edgeconformer.data.features import HOP_LENGTH, LOG_EPS, SAMPLE_RATE, WIN_LENGTH
from edgeconformer.errors import ConfigError
from edgeconformer.export.milsim import load_program
from edgeconformer.files import atomic_folder, write_json_atomic
from edgeconformer.stabilize.ane import ANEConformer

with warnings.catch_warnings():  # coremltools warns about the torch version and the missing macOS runtime
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

INPUT_NAME, OUTPUT_NAME = "feats", "log_probs"
BLANK_ID = 0
POLICIES = ("fixed", "enumerated", "ranged")
PRECISIONS = {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}
DEFAULT_SHAPES = {"policy": "fixed", "fixed_length": 400}


def front_end(n_mels: int = 80) -> dict:
    """The exact log-mel front end the model was trained on (data/features.py), as stored in the metadata."""
    return {
        "type": "log_mel",
        "sample_rate": SAMPLE_RATE,
        "n_fft": WIN_LENGTH,
        "win_length": WIN_LENGTH,
        "hop_length": HOP_LENGTH,
        "window": "hann (periodic, torch.hann_window default)",
        "center": False,
        "pad": 0,
        "n_mels": n_mels,
        "f_min": 0.0,
        "f_max": SAMPLE_RATE / 2,
        "mel_scale": "htk",
        "mel_norm": None,
        "power": 2.0,
        "log": f"ln(mel_power + {LOG_EPS:g})",
        "log_offset": LOG_EPS,
        "frames": f"1 + (num_samples - {WIN_LENGTH}) // {HOP_LENGTH}, 0 if num_samples < {WIN_LENGTH}",
        "reference": "torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, win_length=400, "
        "hop_length=160, n_mels=80, power=2.0, center=False), then log(x + 1e-6)",
        "dither": 0.0,
        "preemphasis": 0.0,
        "waveform_scale": "float in [-1, 1] (int16 / 32768)",
    }


# ------------------------------------------------------------------------------------------------ shape policy
def _lengths(value, key: str) -> list[int]:
    try:
        lengths = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected a list of frame counts, e.g. [200, 400, 800]") from None
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise ConfigError(f"{key}={value!r}: give distinct positive frame counts, e.g. [200, 400, 800]")
    return sorted(lengths)


def input_shape(shapes: Mapping | None, n_mels: int = 80):
    """Shape config -> (coremltools shape for `feats`, example length T to trace with, summary for the report)."""
    shapes = dict(DEFAULT_SHAPES if shapes is None else shapes)
    policy = shapes.get("policy")
    if policy not in POLICIES:
        raise ConfigError(f"export.shapes.policy={policy!r}: choose one of {POLICIES}")
    default = shapes.get("default")
    if policy == "fixed":
        T = shapes.get("fixed_length")
        if not isinstance(T, int) or T < 1:
            raise ConfigError(f"export.shapes.fixed_length={T!r}: give the frame count of one call (an int > 0)")
        return (1, T, n_mels), T, {"policy": "fixed", "lengths": [T], "default": T}
    if policy == "enumerated":
        lengths = _lengths(shapes.get("lengths"), "export.shapes.lengths")
        if len(lengths) > 128:  # Core ML accepts at most 128 enumerated shapes (coremltools flexible-inputs guide)
            raise ConfigError(f"export.shapes.lengths has {len(lengths)} entries; Core ML allows at most 128")
        default = lengths[-1] if default is None else int(default)
        if default not in lengths:
            raise ConfigError(f"export.shapes.default={default}: must be one of export.shapes.lengths {lengths}")
        shape = ct.EnumeratedShapes(shapes=[(1, T, n_mels) for T in lengths], default=(1, default, n_mels))
        return shape, default, {"policy": "enumerated", "lengths": lengths, "default": default}
    bounds = shapes.get("range")
    try:
        lower, upper = (int(b) for b in bounds)
    except (TypeError, ValueError):
        raise ConfigError(
            f"export.shapes.range={bounds!r}: expected [lower, upper] frames (upper -1: unbounded)"
        ) from None
    if lower < 1 or (upper != -1 and upper < lower):
        raise ConfigError(f"export.shapes.range={bounds!r}: need 1 <= lower <= upper (or upper = -1)")
    default = lower if default is None else int(default)
    if default < lower or (upper != -1 and default > upper):
        raise ConfigError(f"export.shapes.default={default}: must lie in export.shapes.range {[lower, upper]}")
    dim = ct.RangeDim(lower_bound=lower, upper_bound=upper, default=default)
    return (
        ct.Shape(shape=(1, dim, n_mels)),
        default,
        {"policy": "ranged", "range": [lower, upper], "default": default},
    )


# ------------------------------------------------------------------------------------------------ metadata
def _sentencepiece_bytes(tokenizer_model) -> bytes | None:
    if tokenizer_model is None:
        return None
    if isinstance(tokenizer_model, (bytes, bytearray)):
        return bytes(tokenizer_model)
    path = Path(tokenizer_model)
    if not path.is_file():
        raise ValueError(
            f"tokenizer_model {path}: file not found; pass the SentencePiece model of the trained "
            "model (models/<variant>/tokenizer.model) or its bytes"
        )
    return path.read_bytes()


def _pieces(sp_bytes: bytes) -> list[str]:
    try:
        sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    except RuntimeError as e:
        raise ValueError(f"tokenizer_model is not a SentencePiece model ({e})") from e
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def build_metadata(
    metadata: Mapping, *, n_mels: int, precision: str, vocab_size: int, vocabulary: list[str] | None, tokenizer_model
) -> tuple[dict, dict]:
    """-> (standard fields author/license/short_description/version, user-defined {key: str})."""
    metadata = dict(metadata or {})
    for key in ("subsampling_factor", "cmvn_folded"):
        if key not in metadata:
            raise ValueError(
                f"metadata[{key!r}] is required: an app needs it to prepare input "
                "(cmvn_folded: whether CMVN is inside the model) and to map output frames "
                "(subsampling_factor: input frames per output frame)"
            )
    if not isinstance(metadata["cmvn_folded"], bool):
        raise ValueError(f"metadata['cmvn_folded']={metadata['cmvn_folded']!r}: expected True or False")
    sp_bytes = _sentencepiece_bytes(tokenizer_model)
    if sp_bytes is not None:
        pieces = _pieces(sp_bytes)
        if vocabulary is not None and list(vocabulary) != pieces:
            raise ValueError(
                "vocabulary does not match the SentencePiece model's pieces (id order); pass the "
                "tokenizer the model was trained with, or leave vocabulary=None to take its pieces"
            )
        vocabulary = pieces
    if vocabulary is not None:
        if not all(isinstance(p, str) for p in vocabulary):
            raise ValueError("vocabulary must be a list of strings (SentencePiece pieces in id order)")
        if len(vocabulary) != vocab_size:
            raise ValueError(
                f"vocabulary has {len(vocabulary)} pieces but the model outputs {vocab_size} classes; "
                "pass the tokenizer the model was trained with"
            )
    standard = {
        "author": str(metadata.pop("author", "")),
        "license": str(metadata.pop("license", "")),
        "short_description": str(
            metadata.pop("description", "Conformer CTC acoustic model: raw log-mel frames -> CTC log-probabilities")
        ),
        "version": str(metadata.pop("version", __version__)),
    }
    user = {
        "sample_rate": str(SAMPLE_RATE),
        "features": json.dumps(front_end(n_mels), sort_keys=True),
        "cmvn_folded": json.dumps(metadata.pop("cmvn_folded")),
        "subsampling_factor": str(int(metadata.pop("subsampling_factor"))),
        "blank_id": str(BLANK_ID),
        "precision": precision,
        "input": f"{INPUT_NAME}: (1, T, {n_mels}) raw log-mel frames as in 'features'",
        "output": f"{OUTPUT_NAME}: (1, T', {vocab_size}) CTC log-probabilities, blank id {BLANK_ID}",
        "edgeconformer_version": __version__,
    }
    if vocabulary is not None:
        user["vocabulary"] = json.dumps(list(vocabulary), ensure_ascii=False)
    if sp_bytes is not None:
        user["sentencepiece_model"] = base64.b64encode(sp_bytes).decode("ascii")
    for key, value in metadata.items():  # anything else the caller wants to ship (e.g. the stabilization)
        user[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return standard, user


# ------------------------------------------------------------------------------------------------ export
def _stable_log_softmax(context, node):
    # coremltools lowers log_softmax to log(softmax(x)). In fp16 softmax flushes every probability below 2^-24 to
    # zero (subnormals lose digits from 2^-14), so each log-prob under ln(2^-24) = -16.6 came out as
    # ln(1e-45) = -103 (measured on the tiny test models: errors of 85). Lowered here as
    # (x - max) - ln(sum(exp(x - max))): the sum is >= 1, nothing underflows that matters, and every op is one the
    # ANE runs (reduce_max, sub, exp, reduce_sum, log).
    x, axis = _get_inputs(context, node, min_expected=2)[:2]
    axes = [int(axis.val)]
    z = mb.sub(x=x, y=mb.reduce_max(x=x, axes=axes, keep_dims=True))
    lse = mb.log(x=mb.reduce_sum(x=mb.exp(x=z), axes=axes, keep_dims=True))
    context.add(mb.sub(x=z, y=lse, name=node.name))


def _isinf(context, node):
    # coremltools 9 has no converter for aten::isinf (used by stabilize/softmax.py for fully masked rows).
    x = _get_inputs(context, node, expected=1)[0]
    context.add(mb.equal(x=mb.abs(x=x), y=np.array(np.inf, dtype=types.nptype_from_builtin(x.dtype)), name=node.name))


def _reciprocal(context, node):
    # coremltools lowers aten::reciprocal (what `eps / s` traces to) to inverse(x, epsilon=1e-4), i.e. 1 / (x + 1e-4):
    # that shifted the prenormalized LayerNorm of the trained model by 2.6e-4 in FP32. Exact 1 / x instead.
    x = _get_inputs(context, node, expected=1)[0]
    one = np.array(1.0, dtype=types.nptype_from_builtin(x.dtype))
    context.add(mb.real_div(x=one, y=x, name=node.name))


LOWERINGS = {
    "log_softmax": _stable_log_softmax,
    "_log_softmax": _stable_log_softmax,
    "isinf": _isinf,
    "reciprocal": _reciprocal,
}


def _pass_pipeline():
    # coremltools' fuse_elementwise_to_batchnorm turns every per-channel `x * gamma + beta` (each LayerNorm's affine
    # in the (B, C, 1, S) layout) into batch_norm(mean=0, variance=1, epsilon=1e-5), i.e. x * gamma / sqrt(1 + 1e-5):
    # every LayerNorm output shrinks by 5e-6, which put the FP32 program of the trained model 2.5e-4 away from
    # PyTorch (in float64 as in float32). Without the pass the program computes what the module computes.
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::fuse_elementwise_to_batchnorm"})
    return pipeline


@contextmanager
def _stable_lowerings():
    """Swap in LOWERINGS for this conversion only; coremltools' registry is restored afterwards."""
    registry = _TORCH_OPS_REGISTRY.name_to_func_mapping
    saved = {name: registry.get(name) for name in LOWERINGS}
    registry.update(LOWERINGS)
    try:
        yield
    finally:
        for name, func in saved.items():
            if func is None:
                registry.pop(name, None)
            else:
                registry[name] = func


def _save_atomic(mlmodel, path: Path) -> None:
    # An .mlpackage is a folder: saved into a staging folder next to it, then swapped into place.
    with atomic_folder(path) as staged:
        staged.rmdir()  # coremltools creates the package folder itself
        mlmodel.save(str(staged))
        if not (staged / "Manifest.json").is_file():
            raise RuntimeError(f"coremltools wrote no package at {staged}")


def _deployment_target(precision: str, minimum_target: str):
    """Checked precision and minimum_target -> the coremltools target (ML programs need iOS15 or later)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"export.precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    target = getattr(ct.target, str(minimum_target), None)
    if target is None or target < ct.target.iOS15:
        raise ConfigError(
            f"export.minimum_target={minimum_target!r}: ML programs need iOS15 or later "
            "(e.g. iOS16, iOS17, iOS18, macOS14)"
        )
    return target


def _package_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"{path}: an ML program is saved as a folder named *.mlpackage")
    return path


def _check_output(out: torch.Tensor, n_mels: int) -> None:
    # The app contract: (1, T, n_mels) features in, (1, T', V) log-probs out.
    if out.dim() != 3 or out.shape[0] != 1:
        raise ValueError(
            f"the module must map (1, T, {n_mels}) features to (1, T', V) log-probs, got {tuple(out.shape)}"
        )


def _convert(traced, shape, precision: str, target):
    """The traced module -> an ML program with input `feats` (shape: the shape policy's) and output `log_probs`."""
    # fp16 model I/O (iOS16+): no cast ops around an fp16 program, and the app hands over Float16 arrays
    io_dtype = np.float16 if precision == "fp16" and target >= ct.target.iOS16 else np.float32
    with _stable_lowerings():
        return ct.convert(
            traced,
            convert_to="mlprogram",
            compute_precision=PRECISIONS[precision],
            minimum_deployment_target=target,
            pass_pipeline=_pass_pipeline(),
            inputs=[ct.TensorType(name=INPUT_NAME, shape=shape, dtype=io_dtype)],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=io_dtype)],
            skip_model_load=True,  # compiling needs macOS; evaluate/coreml_device.py loads it there
        )


def _set_metadata(mlmodel, standard: dict, user: dict) -> None:
    """Store build_metadata's fields in the model: the standard ones, the user-defined ones, the I/O descriptions."""
    mlmodel.author = standard["author"]
    mlmodel.license = standard["license"]
    mlmodel.short_description = standard["short_description"]
    mlmodel.version = standard["version"]
    for key, value in user.items():
        mlmodel.user_defined_metadata[key] = value
    mlmodel.input_description[INPUT_NAME] = user["input"]
    mlmodel.output_description[OUTPUT_NAME] = user["output"]


def export_coreml(
    module: torch.nn.Module,
    path: str | Path,
    *,
    n_mels: int = 80,
    shapes: Mapping | None = None,
    precision: str = "fp16",
    metadata: Mapping | None = None,
    vocabulary: list[str] | None = None,
    tokenizer_model: bytes | str | Path | None = None,
    minimum_target: str = "iOS17",
) -> dict:
    """Trace `module` ((1, T, n_mels) -> (1, T', V)), convert it to an ML program and save it atomically at `path`.

    metadata: author, license, description, version (default: the package version) and the required
    `subsampling_factor` and `cmvn_folded`; other keys are stored as user-defined metadata. Returns the
    conversion report (see conversion_report) with the conversion time added.
    """
    target = _deployment_target(precision, minimum_target)
    path = _package_path(path)
    shape, example_T, shape_info = input_shape(shapes, n_mels)

    module = module.eval()
    example = torch.randn(1, example_T, n_mels, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints in shapes are expected
        out = module(example)
        _check_output(out, n_mels)
        traced = torch.jit.trace(module, example, check_trace=False)
        standard, user = build_metadata(
            metadata,
            n_mels=n_mels,
            precision=precision,
            vocab_size=out.shape[-1],
            vocabulary=vocabulary,
            tokenizer_model=tokenizer_model,
        )
        mlmodel = _convert(traced, shape, precision, target)
    convert_s = time.perf_counter() - started
    _set_metadata(mlmodel, standard, user)

    started = time.perf_counter()
    _save_atomic(mlmodel, path)
    save_s = time.perf_counter() - started
    report = conversion_report(path)
    report.update(
        precision=precision,
        minimum_target=str(minimum_target),
        shapes=shape_info,
        conversion_seconds=round(convert_s, 3),
        save_seconds=round(save_s, 3),
    )
    return report


def export_trained(
    asr_module,
    path: str | Path,
    export_cfg: Mapping,
    stabilize: Mapping | None = None,
    tokenizer_model: str | Path | None = None,
) -> dict:
    """A trained ASRModule (edgeconformer.cli.load_trained) -> its stabilized ANE-layout CTC model as .mlpackage.

    stabilize: ANEConformer.from_asr options (prenorm, p, softmax, lut_size, lut_range); CMVN is folded in.
    export_cfg: conf/export/*.yaml (precision, shapes, minimum_target, metadata).
    """

    stabilize = dict(stabilize or {})
    encoder = asr_module.model.encoder
    _, _, info = input_shape(export_cfg.get("shapes"), asr_module.fbank.n_mels)
    longest = max(info.get("lengths") or [info.get("range", [0, -1])[1]])
    # The relative-position table ships as weights: size it to the longest input (unbounded range: the model's).
    max_len = int(encoder.subsampling.subsample_lengths(longest)) + 1 if longest > 0 else None
    ane = ANEConformer.from_asr(asr_module.model, cmvn=asr_module.cmvn, max_len=max_len, **stabilize).eval()
    meta = dict(export_cfg.get("metadata") or {})
    meta.update(
        subsampling_factor=encoder.subsampling.factor,
        cmvn_folded=True,
        stabilization=stabilize,
        model=dict(asr_module.hparams.model).get("name", "conformer"),
    )
    if tokenizer_model is None and getattr(asr_module, "tokenizer", None) is not None:
        tokenizer_model = asr_module.tokenizer.model_path
    return export_coreml(
        ane,
        path,
        n_mels=asr_module.fbank.n_mels,
        shapes=export_cfg.get("shapes"),
        precision=export_cfg.get("precision", "fp16"),
        metadata=meta,
        tokenizer_model=tokenizer_model,
        minimum_target=export_cfg.get("minimum_target", "iOS17"),
    )


# ------------------------------------------------------------------------------------------------ report
# What is known to keep ops off the Neural Engine. Apple publishes no op list for the ANE; this is the project's
# current knowledge, deliberately conservative (flag when in doubt), with its sources (docs/export.md):
#  [range]   Apple engineer, developer forums thread 724930: with range flexibility only the default shape runs
#            on the ANE; enumerated shapes can each run there. Also coremltools issue #1764.
#  [gather]  coremltools issue #1103: gather (GatherAlongAxis) with runtime indices ran on the CPU only.
#  [fp32]    the ANE computes in fp16 (Apple, "Deploying Transformers on the Apple Neural Engine", 2022):
#            fp32 ops run on CPU/GPU.
#  [rank]    tensors above rank 4 leave the (B, C, H, W) layout the ANE works in; rank 6 fails on the ANE
#            (onnxruntime issue #14212, "ANE does not support blob with rank: 6").
#  [no-ane]  op types with no known ANE path (hollance/neural-engine, docs/unsupported-layers.md: custom and
#            recurrent layers; control flow, random numbers, scatter, sorting, non-zero are data-dependent).
#  [int]     integer tensors computed at run time (shape arithmetic of dynamic shapes): not an ANE data type.
NO_ANE_OPS = {
    "lstm",
    "gru",
    "rnn",
    "cond",
    "while_loop",
    "random_bernoulli",
    "random_categorical",
    "random_normal",
    "random_uniform",
    "scatter",
    "scatter_nd",
    "scatter_along_axis",
    "non_zero",
    "non_maximum_suppression",
    "argsort",
    "topk",
    "reduce_prod",
    "make_list",
    "list_read",
    "list_write",
    "list_gather",
    "list_scatter",
    "list_length",
}
GATHER_OPS = {"gather", "gather_along_axis", "gather_nd"}
SOURCES = {
    "range_shape": "developer.apple.com/forums/thread/724930 (Apple engineer); "
    "github.com/apple/coremltools/issues/1764",
    "gather_runtime_indices": "github.com/apple/coremltools/issues/1103",
    "fp32_compute": "machinelearning.apple.com/research/neural-engine-transformers (the ANE computes in fp16)",
    "rank_above_4": "github.com/microsoft/onnxruntime/issues/14212 (rank-6 blob rejected by the ANE)",
    "no_ane_path": "github.com/hollance/neural-engine docs/unsupported-layers.md",
    "runtime_int_tensor": "project knowledge: shape arithmetic of dynamic shapes runs outside the ANE",
}


def _dtype_name(var) -> str:
    return types.builtin_to_string(var.dtype) or str(var.dtype)


def _ane_flags(op) -> list[str]:
    flags = []
    outs = op.outputs
    if op.op_type in NO_ANE_OPS:
        flags.append("no_ane_path")
    if op.op_type in GATHER_OPS and op.inputs.get("indices") is not None and op.inputs["indices"].val is None:
        flags.append("gather_runtime_indices")
    if any(types.is_tensor(v.sym_type) and v.dtype == types.fp32 for v in outs):
        flags.append("fp32_compute")
    if any(types.is_tensor(v.sym_type) and v.rank > 4 for v in outs):
        flags.append("rank_above_4")
    if any(types.is_int(v.dtype) and v.val is None for v in outs):
        flags.append("runtime_int_tensor")
    return flags


def _io_spec(feature) -> dict:
    arr = feature.type.multiArrayType
    name = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)
    dtype = {"FLOAT16": "fp16", "FLOAT32": "fp32", "DOUBLE": "fp64", "INT32": "int32"}.get(name, name.lower())
    spec = {"name": feature.name, "dtype": dtype, "shape": [int(d) for d in arr.shape]}
    kind = arr.WhichOneof("ShapeFlexibility")
    if kind == "enumeratedShapes":
        spec["enumerated"] = [[int(d) for d in s.shape] for s in arr.enumeratedShapes.shapes]
    elif kind == "shapeRange":
        spec["range"] = [[int(r.lowerBound), int(r.upperBound)] for r in arr.shapeRange.sizeRanges]
    return spec


def _program_census(program) -> dict:
    """Ops of the program's main function: histogram, dtypes per op type, weights and the ANE fallback flags."""
    ops = list(program.functions["main"].operations)
    histogram = Counter(op.op_type for op in ops)
    dtypes: dict[str, Counter] = defaultdict(Counter)
    weight_bytes = weight_params = 0
    flagged, reasons = [], Counter()
    for op in ops:
        if op.op_type == "const":
            val = op.outputs[0].val
            if isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.size > 1:  # parameters, not scalars
                weight_bytes += val.nbytes
                weight_params += val.size
            continue
        for var in op.outputs:
            dtypes[op.op_type][_dtype_name(var)] += 1
        flags = _ane_flags(op)
        if flags:
            flagged.append({"op": op.name, "type": op.op_type, "reasons": flags})
            reasons.update(flags)
    return {
        "histogram": histogram,
        "dtypes": dtypes,
        "weight_bytes": weight_bytes,
        "weight_params": weight_params,
        "flagged": flagged,
        "reasons": reasons,
    }


def _range_input_flags(inputs: list[dict]) -> list[dict]:
    # [range]: with range flexibility only the default shape runs on the ANE (SOURCES["range_shape"])
    return [
        {"input": f["name"], "reasons": ["range_shape"], "note": "only the default shape can run on the ANE"}
        for f in inputs
        if "range" in f
    ]


def _package_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every file in the package, bytes of its weights folder)."""
    weights_dir = path / "Data" / "com.apple.CoreML" / "weights"
    package_bytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return package_bytes, sum(p.stat().st_size for p in weights_dir.glob("*") if p.is_file())


def _metadata_summary(spec) -> dict:
    return {
        "author": spec.description.metadata.author,
        "license": spec.description.metadata.license,
        "version": spec.description.metadata.versionString,
        "user_defined_keys": sorted(spec.description.metadata.userDefined),
    }


def conversion_report(path: str | Path) -> dict:
    """Describe a saved .mlpackage: ops, dtypes, weights, I/O and the ops known to keep it off the ANE."""

    path = Path(path)
    census = _program_census(load_program(path))
    histogram, dtypes, reasons = census["histogram"], census["dtypes"], census["reasons"]

    spec = ct.utils.load_spec(str(path))
    inputs = [_io_spec(f) for f in spec.description.input]
    outputs = [_io_spec(f) for f in spec.description.output]
    input_flags = _range_input_flags(inputs)
    reasons.update(r for f in input_flags for r in f["reasons"])
    package_bytes, weights_file_bytes = _package_bytes(path)
    return {
        "package": str(path),
        "package_bytes": package_bytes,
        "weights_file_bytes": weights_file_bytes,
        "weight_bytes": int(census["weight_bytes"]),
        "weight_params": int(census["weight_params"]),
        "specification_version": int(spec.specificationVersion),
        "n_ops": sum(n for t, n in histogram.items() if t != "const"),
        "n_consts": histogram.get("const", 0),
        "ops": dict(sorted((t, n) for t, n in histogram.items() if t != "const")),
        "dtypes": {t: dict(sorted(c.items())) for t, c in sorted(dtypes.items())},
        "inputs": inputs,
        "outputs": outputs,
        "ane_fallback": {
            "ops": census["flagged"],
            "inputs": input_flags,
            "counts": dict(sorted(reasons.items())),
            "sources": {k: SOURCES[k] for k in sorted(reasons)},
        },
        "metadata": _metadata_summary(spec),
    }


def write_report(report: Mapping, path: str | Path) -> Path:
    return write_json_atomic(path, dict(report), indent=1)
