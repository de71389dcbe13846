"""MIL-sim: run a saved Core ML program (.mlpackage) on Linux, op by op, with numpy.

Core ML itself only predicts on macOS. This executor reads the package back into coremltools' MIL `Program`
(the milproto loader, fed the package's model spec and weights folder) and walks the main function's operations
in program order, so what is checked is the program that ships, not the PyTorch module it came from.

Numerics: every op computes in float32 from its (already rounded) inputs and its output is cast to the dtype the
program declares for it. An fp16 program therefore rounds every intermediate to fp16, overflows to inf where an
fp16 tensor would, and loses what fp16 cannot hold (subnormals are kept, as numpy keeps them; a device may flush
them to zero); the arithmetic *inside* an op (accumulation order and width
of a conv or matmul) is float32 here and unspecified on the device, so MIL-sim bounds neither ANE numerics nor
speed (docs/export.md).

Ops are evaluated, in this order: constants from the program; the op's own `value_inference` (coremltools' numpy
reference) on the concrete values, so symbolic shapes of flexible inputs never reach it; a numpy kernel from
`KERNELS` where coremltools has none or it fails. Anything else raises `UnsupportedOpError` naming the op type.

How `value_inference` gets its inputs. The reference way builds a fresh op of the same type with the Builder (`mb`),
its inputs as constants: coremltools then validates the inputs, infers the output types and runs value_inference.
That costs ~1.5 ms of Python per op, against microseconds of numpy for these small tensors: one 2 s utterance
through the default chain's 1,824-op program took 1.2 s, 0.19 s without it. So the executor first calls
value_inference directly on a stand-in op (`_Value` inputs) that holds only the concrete values, converted as the
Builder's constants convert them (Python floats -> float32, ints and int64 -> int32, float64 -> float32), with the
op's default inputs filled in as the Builder fills them; the result is cast to the type the Builder would infer
(float32 for float outputs, the inputs being float32) before the program's declared dtype. An op whose
value_inference needs more than its values (output types, nested blocks) raises on the stand-in and takes the
reference way. `MILExecutor(reference=True)` always takes it: tests/test_export.py checks that both give
bit-identical outputs on exported programs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

with warnings.catch_warnings():  # coremltools warns about the torch version and the missing macOS runtime
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as _load_milproto
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types
    from coremltools.converters.mil.mil.operation import Operation
    from coremltools.converters.mil.mil.var import Var


class UnsupportedOpError(ValueError):
    """An op MIL-sim cannot evaluate: no value_inference that works and no numpy kernel."""


def load_program(path: str | Path):
    """A saved .mlpackage (mlprogram) -> coremltools MIL Program with its weights loaded."""
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ValueError(f"{path}: not an .mlpackage (no Manifest.json); pass the folder export_coreml wrote")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(
            f"{path}: holds a {spec.WhichOneof('Type')!r} model; MIL-sim runs mlprogram packages only "
            "(convert with convert_to='mlprogram')"
        )
    return _load_milproto(spec, spec.specificationVersion, model.weights_dir or "")


# ------------------------------------------------------------------------------------------------ numpy kernels
# Each kernel takes the op and its concrete inputs by name ({name: ndarray | scalar | str | list}) and returns
# the output value (a tuple for several outputs). Inputs arrive in float32 (fp16 values upcast), see module doc.


def _conv(op, a):
    # x: (N, C, *S), weight: (O, C / groups, *K) -> (N, O, *S_out); 1-D, 2-D and 3-D, any groups/strides/pads
    x, w = a["x"], a["weight"]
    nd = x.ndim - 2
    strides = list(a.get("strides", [1] * nd))
    dilations = list(a.get("dilations", [1] * nd))
    groups = int(a.get("groups", 1))
    kernel = w.shape[2:]
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]  # receptive field per spatial axis
    pad_type = a.get("pad_type", "valid")
    if pad_type == "custom":
        pads = np.asarray(a["pad"]).reshape(nd, 2).tolist()
    elif pad_type == "valid":
        pads = [[0, 0]] * nd
    elif pad_type in ("same", "same_lower"):
        pads = []
        for size, s, e in zip(x.shape[2:], strides, span):
            total = max((-(-size // s) - 1) * s + e - size, 0)
            small = total // 2
            pads.append([small, total - small] if pad_type == "same" else [total - small, small])
    else:
        raise ValueError(f"conv {op.name!r}: unknown pad_type {pad_type!r}")
    x = np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads])
    axes = tuple(range(2, 2 + nd))
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=axes)  # (N, C, *S', *span)
    win = win[
        (slice(None), slice(None))
        + tuple(slice(None, None, s) for s in strides)
        + tuple(slice(None, None, d) for d in dilations)
    ]  # (N, C, *S_out, *K)
    n, c = x.shape[:2]
    out_sizes = win.shape[2 : 2 + nd]
    o = w.shape[0]
    win = win.reshape(n, groups, c // groups, *out_sizes, *kernel)
    wg = w.reshape(groups, o // groups, c // groups, *kernel)
    s_idx, k_idx = "xyz"[:nd], "ijk"[:nd]
    y = np.einsum(f"ngc{s_idx}{k_idx},goc{k_idx}->ngo{s_idx}", win, wg, optimize=True)
    y = y.reshape(n, o, *out_sizes)
    if a.get("bias") is not None:
        y = y + a["bias"].reshape(1, o, *([1] * nd))
    return y


def _silu(op, a):
    with np.errstate(over="ignore"):
        return a["x"] / (1.0 + np.exp(-a["x"]))


def _sigmoid(op, a):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-a["x"]))


def _batch_norm(op, a):
    # x: (N, C, *S), per-channel statistics along axis 1
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - a["mean"].reshape(shape)) / np.sqrt(a["variance"].reshape(shape) + a.get("epsilon", 1e-5))
    if a.get("gamma") is not None:
        y = y * a["gamma"].reshape(shape)
    if a.get("beta") is not None:
        y = y + a["beta"].reshape(shape)
    return y


def _layer_norm(op, a):
    x = a["x"]
    axes = tuple(np.atleast_1d(a["axes"]).tolist()) if a.get("axes") is not None else tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + a.get("epsilon", 1e-5))
    if a.get("gamma") is not None:
        y = y * a["gamma"]
    if a.get("beta") is not None:
        y = y + a["beta"]
    return y


def _softmax(op, a):
    x = a["x"]
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _einsum(op, a):
    return np.einsum(a["equation"], *a["values"], optimize=True)


def _matmul(op, a):
    x, y = a["x"], a["y"]
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


_MODES = {
    "update": lambda old, new: new,
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter(op, a):
    # data[..., indices[i], ...] (along axis) <- mode(old, updates[..., i, ...]); indices: (N,)
    data = np.array(a["data"])
    axis = int(a.get("axis", 0)) % data.ndim
    indices = np.asarray(a["indices"]).astype(np.int64).reshape(-1)
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    combine = _MODES[a.get("mode", "add")]
    target, updates = np.moveaxis(data, axis, 0), np.moveaxis(np.asarray(a["updates"]), axis, 0)  # views
    for i, j in enumerate(indices):  # in order: with repeated indices the last update wins, as in the spec
        target[j] = combine(target[j], updates[i])
    return data


def _scatter_nd(op, a):
    # data[indices[n]] <- mode(old, updates[n]); indices: (..., K) index the first K axes of data
    data = np.array(a["data"])
    indices = np.asarray(a["indices"]).astype(np.int64)
    k = indices.shape[-1]
    indices = indices.reshape(-1, k)
    updates = np.asarray(a["updates"]).reshape(len(indices), *data.shape[k:])
    combine = _MODES[a.get("mode", "add")]
    for n, index in enumerate(indices):
        data[tuple(index)] = combine(data[tuple(index)], updates[n])
    return data


def _tile(op, a):
    # coremltools' reference refuses zero repetitions, which data-dependent programs produce (an empty non_zero)
    return np.tile(a["x"], np.asarray(a["reps"]).astype(np.int64))


KERNELS = {
    "tile": _tile,
    "scatter": _scatter,
    "scatter_nd": _scatter_nd,
    "conv": _conv,
    "silu": _silu,
    "sigmoid": _sigmoid,
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "einsum": _einsum,
    "matmul": _matmul,
}


# ------------------------------------------------------------------------------------------------ executor
def _np_dtype(var: Var):
    """The numpy dtype the program declares for `var`; None for strings (kept as they are)."""
    return None if types.is_str(var.dtype) else np.dtype(types.nptype_from_builtin(var.dtype))


_FROM_VAR = object()  # _declared: look the dtype up on the var


def _declared(var: Var, value, dtype=_FROM_VAR):
    """`value` cast to the dtype the program declares for `var` (fp16 rounding, inf on fp16 overflow); `dtype`:
    that dtype when already known (_np_dtype(var))."""
    dtype = _np_dtype(var) if dtype is _FROM_VAR else dtype
    if dtype is None:
        return value
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(value).astype(dtype, copy=False)
    return out


def _compute_input(value):
    # Inputs to an op's evaluation: fp16 values upcast to float32 (the op computes in float32, see module doc);
    # scalars as Python numbers (numpy 2 refuses numpy bools as e.g. `keepdims`); arrays as copies, because some
    # value_inference implementations resolve indices in place (slice_by_index rewrote a constant `end` of -1,
    # which then broke the next run at another length).
    if isinstance(value, list):
        return [_compute_input(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        if value.ndim == 0:
            return value.item()
        return value.astype(np.float32 if value.dtype == np.float16 else value.dtype)  # astype copies
    return value


def _has_value_inference(op) -> bool:
    return type(op).value_inference is not Operation.value_inference


def _as_const(value):
    """A value as a Builder constant holds it (coremltools' const op): Python floats and float64 -> float32, Python
    ints and int64 -> int32 (clipped to its range), lists and tuples -> arrays; everything else unchanged."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (float, np.float64)):
        return np.float32(value)
    if isinstance(value, (int, np.int64)):
        return np.int32(min(max(value, _INT32.min), _INT32.max))
    if isinstance(value, (tuple, list)):
        value = np.array(value)
    if isinstance(value, np.ndarray):
        if value.dtype in (np.int64, np.uint64):
            return np.clip(value, _INT32.min, _INT32.max).astype(np.int32)
        if value.dtype == np.float64:
            return value.astype(np.float32)
    return value


_INT32 = np.iinfo(np.int32)


class _Value:
    """What value_inference reads of an input Var, as a Builder constant of the same value reports it: the value,
    its shape and rank, its primitive type (`dtype`) and its type (`sym_type`)."""

    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val

    @property
    def sym_val(self):
        return self.val

    @property
    def shape(self) -> tuple:
        return np.shape(self.val)

    @property
    def rank(self) -> int:
        return np.ndim(self.val)

    @property
    def dtype(self):
        return types.numpy_type_to_builtin_type(np.asarray(self.val).dtype)

    @property
    def sym_type(self):
        return types.tensor(self.dtype, self.shape) if self.rank else self.dtype


def _light_value_inference(op, args: dict):
    """type(op).value_inference on a stand-in op that holds only `args` (concrete values) and the op's default
    inputs: what the Builder would compute, without building an op (module docstring)."""
    cls = type(op)
    stand_in = cls.__new__(cls)
    stand_in.name = op.name
    stand_in._input_types = cls.input_spec.input_types
    stand_in._input_vars = dict.fromkeys(stand_in._input_types)
    for key in stand_in._input_types:
        setattr(stand_in, key, None)

    def put(key, value):
        var = tuple(_Value(_as_const(v)) for v in value) if isinstance(value, list) else _Value(_as_const(value))
        setattr(stand_in, key, var)
        stand_in._input_vars[key] = var

    for key, value in args.items():
        put(key, value)
    for key, value in stand_in.default_inputs().items():
        if stand_in._input_vars.get(key) is None and value is not None:
            put(key, _compute_input(value))
    return stand_in.value_inference()


def _computed(dtype, value):
    """A float output (declared `dtype`) in float32, the type the Builder infers from float32 inputs, before the
    declared cast."""
    if dtype is not None and dtype.kind == "f":
        return np.asarray(value).astype(np.float32, copy=False)
    return value


class MILExecutor:
    """Executes one function of a MIL Program (default: main) on concrete numpy inputs."""

    def __init__(self, program, function: str = "main", reference: bool = False):
        self.reference = reference  # True: value_inference always through the Builder (module docstring)
        self.reference_calls = Counter()  # op type -> calls that took the Builder's way without being asked to
        if function not in program.functions:
            raise ValueError(f"program has no function {function!r} (has {sorted(program.functions)})")
        self.function = program.functions[function]
        self.opset = self.function.opset_version
        self.inputs = dict(self.function.inputs)  # name -> Var (placeholder)
        self.outputs = list(self.function.outputs)
        # Fail before running anything when an op can be evaluated by neither path.
        for op in self.function.operations:
            if op.op_type != "const" and op.op_type not in KERNELS and not _has_value_inference(op):
                raise UnsupportedOpError(self._unsupported(op))
        # Per run, only the ops: every output's declared dtype and the constants (in it) are the same each time.
        # Ops never see the constants themselves (_compute_input copies), so one copy serves every run.
        self.dtypes = {var.name: _np_dtype(var) for op in self.function.operations for var in op.outputs}
        self.constants = {
            op.outputs[0].name: _declared(op.outputs[0], op.outputs[0].val, self.dtypes[op.outputs[0].name])
            for op in self.function.operations
            if op.op_type == "const"
        }
        self.ops = [op for op in self.function.operations if op.op_type != "const"]

    @staticmethod
    def _unsupported(op, cause: Exception | None = None) -> str:
        why = f" (value_inference failed: {type(cause).__name__}: {cause})" if cause else ""
        return (
            f"MIL-sim cannot execute op type {op.op_type!r} (op {op.name!r}){why}: add a numpy kernel for "
            f"{op.op_type!r} to edgeconformer.export.milsim.KERNELS"
        )

    def _check_inputs(self, feeds: dict) -> dict:
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise ValueError(
                f"inputs {sorted(feeds)} do not match the program's inputs {sorted(self.inputs)} "
                f"(missing {missing}, unexpected {extra})"
            )
        env = {}
        for name, var in self.inputs.items():
            x = np.asarray(feeds[name])
            declared = var.shape
            if x.ndim != len(declared) or any(
                not types.symbolic.is_symbolic(d) and int(d) != s for d, s in zip(declared, x.shape)
            ):
                raise ValueError(
                    f"input {name!r} has shape {x.shape}, the program expects {declared} (symbols are free dimensions)"
                )
            env[name] = _declared(var, x)
        return env

    def _evaluate(self, op, args: dict):
        cause = None
        if _has_value_inference(op) and not self.reference:
            try:
                values = _light_value_inference(op, {k: _compute_input(v) for k, v in args.items()})
                values = list(values) if len(op.outputs) > 1 else [values]
                if len(values) == len(op.outputs) and all(v is not None for v in values):
                    return [_computed(self.dtypes[var.name], v) for var, v in zip(op.outputs, values)]
            except Exception:  # noqa: BLE001 - anything the stand-in cannot do goes the reference way
                pass
            self.reference_calls[op.op_type] += 1
        if _has_value_inference(op):
            try:
                # A fresh op of the same type on constant inputs: coremltools infers concrete types and runs the
                # op's numpy reference (a program op keeps the symbolic shapes of flexible inputs).
                out = getattr(mb, op.op_type)(**{k: _compute_input(v) for k, v in args.items()})
                values = [v.val for v in (out if isinstance(out, (tuple, list)) else (out,))]
                if all(v is not None for v in values):
                    return values
                cause = RuntimeError("value_inference returned no value")
            except Exception as e:  # any failure of the reference: fall back to a numpy kernel
                cause = e
        if op.op_type in KERNELS:
            out = KERNELS[op.op_type](op, {k: _compute_input(v) for k, v in args.items()})
            return list(out) if isinstance(out, tuple) else [out]
        raise UnsupportedOpError(self._unsupported(op, cause))

    def run(self, feeds: dict) -> dict:
        """{input name: array} -> {output name: array in the output's declared dtype}."""
        env = {**self.constants, **self._check_inputs(feeds)}
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")  # fp16 overflow is information here, not an error
            with Function({}, opset_version=self.opset):
                for op in self.ops:
                    args = {}
                    for key, var in op.inputs.items():
                        args[key] = [env[v.name] for v in var] if isinstance(var, (list, tuple)) else env[var.name]
                    values = self._evaluate(op, args)
                    if len(values) != len(op.outputs):
                        raise RuntimeError(
                            f"op {op.name!r} ({op.op_type}) gave {len(values)} outputs, "
                            f"the program declares {len(op.outputs)}"
                        )
                    for var, value in zip(op.outputs, values):
                        env[var.name] = _declared(var, value, self.dtypes[var.name])
        # a copy of an output that is a constant: the caller may write to it
        return {v.name: (np.array if v.name in self.constants else np.asarray)(env[v.name]) for v in self.outputs}
