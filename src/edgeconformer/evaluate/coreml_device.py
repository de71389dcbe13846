"""Core ML prediction on macOS: parity with PyTorch, WER and RTF per compute-unit setting.

coremltools can convert anywhere but predicts only on macOS (its `libcoremlpython` is absent elsewhere), so this
module is the one place that needs a Mac; `available()` says whether it can run and why not. Protocol (the same as
evaluate/rtf.py for PyTorch): batch 1, the first `warmup` predictions excluded, the median of the timed ones;
loading a package compiles it for the chosen compute units, and that cold compile time is reported on its own.
"""

from __future__ import annotations

import platform
import time

import numpy as np

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def available() -> tuple[bool, str]:
    """(True, "") when Core ML predictions can run here, else (False, reason)."""
    if platform.system() != "Darwin":
        return False, f"Core ML prediction needs macOS (this is {platform.system()}); conversion works everywhere"
    try:
        import coremltools as ct  # noqa: F401  # lazy: prediction exists on macOS only; probed here
        from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except ImportError as e:
        return False, f"coremltools cannot predict here ({e})"
    return True, ""


def allowed_lengths(spec) -> tuple[str, list[int] | tuple[int, int] | None]:
    """The input-length policy of a converted model's `feats` input: ("fixed"|"enumerated"|"ranged", lengths)."""
    inp = next(i for i in spec.description.input if i.name == "feats")
    arr = inp.type.multiArrayType
    kind = arr.WhichOneof("ShapeFlexibility")
    if kind == "enumeratedShapes":
        return "enumerated", sorted(int(s.shape[1]) for s in arr.enumeratedShapes.shapes)
    if kind == "shapeRange":
        r = arr.shapeRange.sizeRanges[1]
        return "ranged", (int(r.lowerBound), int(r.upperBound))
    return "fixed", [int(arr.shape[1])]


def input_dtype(spec):
    """numpy dtype of the `feats` input (FP16 programs from iOS16 on take float16 arrays)."""
    from coremltools.proto import FeatureTypes_pb2  # lazy: coremltools is needed only when a package is run

    arr = next(i for i in spec.description.input if i.name == "feats").type.multiArrayType
    return np.float16 if arr.dataType == FeatureTypes_pb2.ArrayFeatureType.FLOAT16 else np.float32


def fit_length(feats: np.ndarray, policy: str, lengths, pad_value: float) -> tuple[np.ndarray, int]:
    """(1, T, F) features -> input the model accepts and the number of valid input frames.

    Enumerated/fixed lengths: padded at the end with `pad_value` (log-mel of silence) up to the next allowed
    length; the caller keeps only the output frames of the valid input. A longer utterance raises: export with a
    larger length or the ranged policy.
    """
    T = feats.shape[1]
    if policy == "ranged":
        lo, hi = lengths
        if T < lo or (hi != -1 and T > hi):  # an upper bound of -1 means unbounded
            raise ValueError(f"utterance of {T} frames is outside the exported range [{lo}, {hi}]")
        return feats, T
    fits = [n for n in lengths if n >= T]
    if not fits:
        raise ValueError(
            f"utterance of {T} frames is longer than every exported length {lengths}; re-export "
            "with export.shapes covering it"
        )
    pad = np.full((1, fits[0] - T, feats.shape[2]), pad_value, dtype=feats.dtype)
    return np.concatenate([feats, pad], axis=1), T


def evaluate_compute_units(
    package: str,
    utterances: list[tuple[np.ndarray, float]],
    reference_logits=None,
    units: tuple[str, ...] = COMPUTE_UNITS,
    warmup: int = 2,
    out_frames=None,
    pad_value: float = float(np.log(1e-6)),
) -> dict:
    """Per compute-unit setting: cold load (compile) seconds, RTF (median over utterances of compute / audio
    seconds, warm-up excluded), log-probs per utterance, and max |diff| to `reference_logits` when given.

    utterances: [(feats (1, T, F) float32 raw log-mels, audio seconds)]; out_frames(T) -> valid output frames.
    """
    import coremltools as ct  # lazy: coremltools is needed only when a package is run

    results = {}
    for unit in units:
        started = time.perf_counter()
        model = ct.models.MLModel(package, compute_units=getattr(ct.ComputeUnit, unit))
        load_s = time.perf_counter() - started
        spec = model.get_spec()
        policy, lengths = allowed_lengths(spec)
        dtype = input_dtype(spec)
        for feats, _ in utterances[:warmup]:  # first predictions pay for lazy initialisation: not timed
            model.predict({"feats": fit_length(feats, policy, lengths, pad_value)[0].astype(dtype)})
        rtfs, outputs, max_diff = [], [], 0.0
        for i, (feats, seconds) in enumerate(utterances):
            x, T = fit_length(feats, policy, lengths, pad_value)
            t0 = time.perf_counter()
            y = model.predict({"feats": x.astype(dtype)})["log_probs"]
            rtfs.append((time.perf_counter() - t0) / seconds)
            y = np.asarray(y, dtype=np.float32)[0]
            if out_frames is not None:
                y = y[: int(out_frames(T))]
            outputs.append(y)
            if reference_logits is not None:
                max_diff = max(max_diff, float(np.abs(y - reference_logits[i]).max()))
        results[unit] = {
            "load_seconds": round(load_s, 3),
            "rtf_median": float(np.median(rtfs)),
            "rtf_p90": float(np.percentile(rtfs, 90)),
            "log_probs": outputs,
            "max_abs_diff": max_diff if reference_logits is not None else None,
        }
    return results
