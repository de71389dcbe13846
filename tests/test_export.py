"""Core ML export: tiny stabilized ANE Conformers converted, executed by MIL-sim and compared with PyTorch; metadata,
shape policies, the conversion report and atomic saving."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from conftest import package_metadata

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil.mil import types

from test_milsim import same_as_reference

from edgeconformer import __version__
from edgeconformer.data.features import GlobalCMVN, LogMelFilterbank
from edgeconformer.data.tokenizer import Tokenizer, train_tokenizer
from edgeconformer.errors import ConfigError
from edgeconformer.export import coreml
from edgeconformer.export.coreml import conversion_report, export_coreml, front_end, input_shape, write_report
from edgeconformer.export.milsim import MILExecutor, load_program
from edgeconformer.models.lightning import build_model
from edgeconformer.stabilize.ane import ANEConformer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"]
LENGTHS = [48, 80]  # enumerated input lengths (frames) of the tests' packages
FIXED = 64
# FP16 program vs the FP32 PyTorch model, max |log-prob| difference: measured 0.012 .. 0.023 over 24 inputs of the
# tiny models below (log-probs down to -19; one fp16 ulp is 0.0156 in [-32, -16]); the bound leaves 2x.
FP16_TOL = 0.05


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=32)
    return Tokenizer(path)


def tiny_ane(subsampling, vocab_size, seed=0, **stabilize):
    """A 1-block d=32 model from a shrunk conf/model/small.yaml, CMVN folded in, as ANEConformer."""
    cfg = yaml.safe_load((REPO / "conf/model/small.yaml").read_text())
    del cfg["defaults"]  # Hydra's defaults list (the structured schema), not a model key
    cfg.update(subsampling=subsampling, subsampling_channels=8)
    cfg["encoder"].update(d_model=32, n_layers=1, n_heads=2, ff_dim=64, kernel_size=5, pos="rel")
    cfg["decoder"].update(ff_dim=64, n_heads=2)
    torch.manual_seed(seed)
    asr = build_model(cfg, vocab_size).eval()
    with torch.no_grad():  # a peaky CTC head like a trained one, so greedy paths are well defined
        asr.ctc.weight.mul_(6.0)
    g = torch.Generator().manual_seed(seed)
    cmvn = GlobalCMVN(80, torch.randn(80, generator=g) - 4.0, torch.rand(80, generator=g) + 1.0)
    return ANEConformer.from_asr(asr, cmvn=cmvn, **stabilize)


def features(T, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(1, T, 80, generator=g) * 2.5 - 4.0  # raw log-mel range


# One conversion per (subsampling, precision): converting is the slow part (seconds per tiny model).
CASES = {
    ("dws", "fp32"): {"policy": "enumerated", "lengths": LENGTHS},
    ("dws", "fp16"): {"policy": "enumerated", "lengths": LENGTHS},
    ("vanilla", "fp32"): {"policy": "fixed", "fixed_length": FIXED},
    ("vanilla", "fp16"): {"policy": "fixed", "fixed_length": FIXED},
}


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    models = {s: tiny_ane(s, tokenizer.vocab_size, prenorm="mad") for s in ("dws", "vanilla")}
    out = {}
    for (sub, precision), shapes in CASES.items():
        path = root / f"{sub}_{precision}.mlpackage"
        report = export_coreml(
            models[sub],
            path,
            precision=precision,
            shapes=shapes,
            tokenizer_model=tokenizer.model_path,
            metadata={
                "author": "tests",
                "license": "MIT",
                "subsampling_factor": 4,
                "cmvn_folded": True,
                "stabilization": {"prenorm": "mad"},
            },
        )
        out[sub, precision] = {"module": models[sub], "path": path, "report": report}
    return out


def lengths_of(case):
    shapes = CASES[case]
    return shapes["lengths"] if shapes["policy"] == "enumerated" else [shapes["fixed_length"]]


@pytest.mark.parametrize("sub", ["dws", "vanilla"])
def test_fp32_program_equals_pytorch(exported, sub):
    case = exported[sub, "fp32"]
    run = MILExecutor(load_program(case["path"]))
    for T in lengths_of((sub, "fp32")):
        x = features(T)
        with torch.no_grad():
            ref = case["module"](x).numpy()
        out = run.run({"feats": x.numpy()})["log_probs"]
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sub", ["dws", "vanilla"])
def test_fp16_program_is_close_and_keeps_greedy_paths(exported, sub):
    case = exported[sub, "fp16"]
    run = MILExecutor(load_program(case["path"]))
    for T in lengths_of((sub, "fp16")):
        for seed in range(2):
            x = features(T, seed)
            with torch.no_grad():
                ref = case["module"](x).numpy()
            out = run.run({"feats": x.numpy()})["log_probs"]
            assert out.dtype == np.float16 and out.shape == ref.shape
            assert np.isfinite(out).all()
            err = np.abs(out.astype(np.float64) - ref).max()
            assert 0 < err < FP16_TOL
            # Identical greedy CTC paths on these fixed inputs. (Over 24 inputs, one frame flipped: a near-tie of
            # two classes 6e-4 apart in FP32, below one fp16 ulp.)
            np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def test_value_inference_on_values_equals_the_builders(exported):
    op_types = set()
    for case in CASES:
        inputs = [features(T, seed) for T in lengths_of(case) for seed in (0, 1)]
        op_types |= same_as_reference(exported[case]["path"], inputs)
    # The ops of the exported encoder graph with its pre-normalizer (test_milsim: the LUT softmax's masks)
    assert {"gather", "reduce_mean", "reduce_max", "reshape", "rsqrt", "cast", "pad", "split", "conv"} <= op_types


def test_metadata_round_trips(exported, tokenizer):
    path = exported["dws", "fp16"]["path"]
    spec = ct.utils.load_spec(str(path))
    meta = spec.description.metadata
    assert (meta.author, meta.license, meta.versionString) == ("tests", "MIT", __version__)
    assert meta.shortDescription
    user = dict(meta.userDefined)
    for key in (
        "sample_rate",
        "features",
        "cmvn_folded",
        "subsampling_factor",
        "blank_id",
        "vocabulary",
        "sentencepiece_model",
        "precision",
        "stabilization",
        "input",
        "output",
        "edgeconformer_version",
    ):
        assert key in user, key
    # The same through MLModel (what an app-side Python tool would open) and the decoded view.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.models.MLModel(str(path), skip_model_load=True)
    assert model.user_defined_metadata["blank_id"] == "0"
    decoded = package_metadata(path)
    assert decoded["sample_rate"] == 16000 and decoded["subsampling_factor"] == 4 and decoded["blank_id"] == 0
    assert decoded["cmvn_folded"] is True and decoded["precision"] == "fp16"
    assert decoded["features"] == front_end(80)
    assert json.loads(decoded["stabilization"]) == {"prenorm": "mad"}
    assert decoded["sentencepiece_model"] == tokenizer.model_path.read_bytes()
    assert decoded["vocabulary"] == tokenizer.pieces(list(range(tokenizer.vocab_size)))
    # An app can decode with what the package carries: the SentencePiece model rebuilt from the metadata.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=decoded["sentencepiece_model"])
    assert sp.decode(tokenizer.encode(TEXTS[0])) == TEXTS[0]


def test_front_end_metadata_is_the_training_front_end():
    # Every documented setting read back from the LogMelFilterbank the models were trained with.
    fb = LogMelFilterbank()
    spec, mel = fb.mel.spectrogram, fb.mel.mel_scale
    meta = front_end(80)
    assert meta["sample_rate"] == fb.sample_rate == mel.sample_rate
    assert (meta["n_fft"], meta["win_length"], meta["hop_length"]) == (spec.n_fft, spec.win_length, spec.hop_length)
    assert meta["center"] is spec.center is False and meta["pad"] == spec.pad
    assert meta["power"] == spec.power and meta["n_mels"] == mel.n_mels == fb.n_mels
    assert meta["mel_scale"] == mel.mel_scale and meta["mel_norm"] == mel.norm
    assert meta["f_min"] == mel.f_min and meta["f_max"] == mel.f_max
    assert torch.equal(spec.window, torch.hann_window(400))  # periodic Hann
    assert not spec.normalized
    # The log offset and frame count formula, checked numerically on a 1234-sample signal.
    x = torch.randn(1, 1234)
    feats, n = fb(x)
    assert int(n) == feats.shape[1] == 1 + (1234 - meta["win_length"]) // meta["hop_length"]
    power = fb.mel(x)
    torch.testing.assert_close(feats, torch.log(power + meta["log_offset"]).transpose(1, 2))


def test_shape_policies_are_in_the_spec(exported, tmp_path):
    def feats_spec(path):
        return next(f for f in ct.utils.load_spec(str(path)).description.input if f.name == "feats")

    arr = feats_spec(exported["dws", "fp16"]["path"]).type.multiArrayType
    assert arr.WhichOneof("ShapeFlexibility") == "enumeratedShapes"
    assert sorted(list(s.shape) for s in arr.enumeratedShapes.shapes) == [[1, T, 80] for T in LENGTHS]
    assert arr.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16

    arr = feats_spec(exported["vanilla", "fp32"]["path"]).type.multiArrayType
    assert arr.WhichOneof("ShapeFlexibility") is None and list(arr.shape) == [1, FIXED, 80]
    assert arr.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32

    # Ranged: any length in the range runs, not only the traced default.
    module = Small().eval()
    path = tmp_path / "ranged.mlpackage"
    report = export_coreml(
        module, path, precision="fp32", metadata=META, shapes={"policy": "ranged", "range": [16, 200], "default": 40}
    )
    arr = feats_spec(path).type.multiArrayType
    assert arr.WhichOneof("ShapeFlexibility") == "shapeRange"
    assert [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges] == [(1, 1), (16, 200), (80, 80)]
    assert report["ane_fallback"]["inputs"][0]["reasons"] == ["range_shape"]
    run = MILExecutor(load_program(path))
    for T in (17, 123):
        x = features(T)
        with torch.no_grad():
            np.testing.assert_allclose(run.run({"feats": x.numpy()})["log_probs"], module(x).numpy(), atol=1e-5)


def test_report_describes_the_program(exported):
    for (sub, precision), case in exported.items():
        report, module = case["report"], case["module"]
        again = conversion_report(case["path"])  # the saved package read back: the same report
        assert {k: report[k] for k in again} == again
        assert report["precision"] == precision and report["conversion_seconds"] > 0
        program = load_program(case["path"])
        ops = [op for op in program.functions["main"].operations if op.op_type != "const"]
        assert report["n_ops"] == len(ops) == sum(report["ops"].values())
        # Every nn.Conv2d of the ANE graph (1x1 "linears", depthwise, front end, CTC head) is one conv op, and
        # attention is three einsums per head (scores, relative positions, values).
        assert report["ops"]["conv"] == sum(isinstance(m, nn.Conv2d) for m in module.modules())
        assert report["ops"]["einsum"] == 3 * 2 * 1  # per head x heads x blocks
        assert report["dtypes"]["conv"] == {precision: report["ops"]["conv"]}
        width = {"fp16": 2, "fp32": 4}[precision]
        n_params = sum(p.numel() for p in module.parameters())
        assert report["weight_bytes"] == width * report["weight_params"]
        assert report["weight_params"] >= n_params  # every trained tensor ships (plus CMVN and position tables)
        assert report["weights_file_bytes"] >= report["weight_bytes"] * 0.9
        assert report["package_bytes"] > report["weights_file_bytes"]
        assert report["inputs"][0]["name"] == "feats" and report["outputs"][0]["name"] == "log_probs"
        counts = report["ane_fallback"]["counts"]
        if precision == "fp32":  # every op computing floats is flagged: the ANE computes in fp16 only
            fp32_ops = [op for op in ops if any(v.dtype == types.fp32 for v in op.outputs)]
            assert counts["fp32_compute"] == len(fp32_ops) > report["ops"]["conv"]
        else:
            assert "fp32_compute" not in counts
        if CASES[sub, precision]["policy"] == "fixed":
            assert "runtime_int_tensor" not in counts  # static shapes: all shape arithmetic folded away
        else:
            assert counts["runtime_int_tensor"] > 0
        assert set(report["ane_fallback"]["sources"]) == set(counts)


def test_write_report_is_json_and_atomic(exported, tmp_path, monkeypatch):
    report = exported["dws", "fp16"]["report"]
    path = write_report(report, tmp_path / "reports" / "export.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))

    def broken_write(self, text, *args, **kwargs):  # half the report reaches the disk, then the disk is full
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError):
        write_report(report, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))  # the old report is untouched
    assert os.listdir(path.parent) == ["export.json"]


# ------------------------------------------------------------------------------------------------ small module
META = {"subsampling_factor": 4, "cmvn_folded": False}


class Small(nn.Module):
    """(1, T, 80) -> (1, T', 6) with the front end's two stride-2 convolutions: cheap to convert."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, 2)
        self.conv2 = nn.Conv2d(4, 4, 3, 2, groups=4)
        self.head = nn.Conv2d(4 * 19, 6, 1)

    def forward(self, feats):
        x = self.conv2(F.relu(self.conv(feats.transpose(1, 2).unsqueeze(1))))  # (1, 4, 19, T')
        return F.log_softmax(self.head(x.flatten(1, 2).unsqueeze(2)), dim=1).squeeze(2).transpose(1, 2)


def test_failed_save_leaves_no_partial_package(tmp_path, monkeypatch):
    path = tmp_path / "model.mlpackage"
    fixed = {"policy": "fixed", "fixed_length": 32}
    export_coreml(Small(), path, precision="fp32", metadata=META, shapes=fixed)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def save_half(self, target):  # writes part of a package, then fails (a full disk, a kill)
        Path(target).mkdir(parents=True)
        (Path(target) / "Manifest.json").write_text("{")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ct.models.MLModel, "save", save_half)
        with pytest.raises(OSError, match="disk full"):
            export_coreml(Small(), path, precision="fp16", metadata=META, shapes=fixed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]  # no temp folders left
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before  # the previous package is untouched

    export_coreml(Small(), path, precision="fp16", metadata=META, shapes=fixed)  # a successful replacement
    assert package_metadata(path)["precision"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]


@pytest.mark.parametrize(
    "shapes, match",
    [
        ({"policy": "dynamic"}, "export.shapes.policy"),
        ({"policy": "enumerated", "lengths": []}, "export.shapes.lengths"),
        ({"policy": "enumerated", "lengths": [64, 64]}, "export.shapes.lengths"),
        ({"policy": "enumerated", "lengths": [64, 128], "default": 100}, "export.shapes.default"),
        ({"policy": "ranged", "range": [100, 50]}, "export.shapes.range"),
        ({"policy": "ranged", "range": "big"}, "export.shapes.range"),
        ({"policy": "fixed", "fixed_length": 0}, "export.shapes.fixed_length"),
    ],
)
def test_bad_shape_config_names_the_key(shapes, match):
    with pytest.raises(ConfigError, match=match):
        input_shape(shapes)


def test_bad_arguments_are_explained(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="export.precision"):
        export_coreml(Small(), tmp_path / "a.mlpackage", precision="int8", metadata=META)
    with pytest.raises(ConfigError, match="export.minimum_target"):
        export_coreml(Small(), tmp_path / "a.mlpackage", metadata=META, minimum_target="iOS99")
    with pytest.raises(ValueError, match="metadata\\['cmvn_folded'\\] is required"):
        export_coreml(Small(), tmp_path / "a.mlpackage", metadata={"subsampling_factor": 4})
    with pytest.raises(ValueError, match="6 classes"):  # a vocabulary that does not fit the model's output
        export_coreml(Small(), tmp_path / "a.mlpackage", metadata=META, tokenizer_model=tokenizer.model_path)
    with pytest.raises(ValueError, match="\\*.mlpackage"):
        export_coreml(Small(), tmp_path / "a.mlmodel", metadata=META)
    assert list(tmp_path.iterdir()) == []


def test_default_config_composes_and_is_valid():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config")  # conf/config.yaml lists `export: default`
    export = cfg.export
    assert export.precision in coreml.PRECISIONS
    assert getattr(ct.target, export.minimum_target) >= ct.target.iOS16  # fp16 model I/O
    for policy in coreml.POLICIES:
        shape, T, info = input_shape({**export.shapes, "policy": policy})
        assert info["policy"] == policy and T >= 16
    _, T, info = input_shape(export.shapes)
    # The enumerated lengths cover every test utterance of the offline corpus (at most 4.3 s = 430 frames).
    assert info["lengths"] == sorted(info["lengths"]) and max(info["lengths"]) >= 430


class Lowerings(nn.Module):
    """The three torch ops export lowers itself (coreml.LOWERINGS), side by side on the last axis."""

    def forward(self, feats):
        log_probs = F.log_softmax(feats * 30.0, dim=-1)  # spread wide: log-probs far below ln(2^-24) = -16.6
        reciprocal = 1e-3 / (feats.abs() + 1e-3)  # traces to aten::reciprocal
        overflow = torch.isinf((feats + 1.0) * 6e4).to(feats.dtype)  # inf in fp16 once |x + 1| >= 1.09
        return torch.cat([log_probs, reciprocal, overflow], dim=-1)


def test_lowerings_keep_pytorch_semantics(tmp_path):
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    registry = _TORCH_OPS_REGISTRY.name_to_func_mapping
    before = {name: registry.get(name) for name in coreml.LOWERINGS}
    x = features(24, seed=5) / 4.0  # values around -1 +- 0.6
    with torch.no_grad():
        log_probs, reciprocal, _ = Lowerings()(x).split(80, dim=-1)
    assert log_probs.min() < -60  # far below what log(softmax) keeps in fp16
    for precision in ("fp32", "fp16"):
        path = tmp_path / f"lowerings_{precision}.mlpackage"
        export_coreml(
            Lowerings(), path, precision=precision, metadata=META, shapes={"policy": "fixed", "fixed_length": 24}
        )
        out = MILExecutor(load_program(path)).run({"feats": x.numpy()})["log_probs"].astype(np.float64)
        got_lp, got_rec, got_inf = np.split(out, 3, axis=-1)
        if precision == "fp32":
            np.testing.assert_allclose(got_lp, log_probs.numpy(), atol=1e-4, rtol=0)
            np.testing.assert_allclose(got_rec, reciprocal.numpy(), rtol=1e-6)  # not 1e-3 / (x + 1e-3 + 1e-4)
            assert not got_inf.any()
        else:
            # every log-prob within fp16 rounding of input and output (|log p| < 128: ulp <= 0.0625)
            np.testing.assert_allclose(got_lp, log_probs.numpy(), atol=0.25, rtol=0)
            np.testing.assert_allclose(got_rec, reciprocal.numpy(), rtol=2e-3)
            f16 = np.float16
            with np.errstate(over="ignore"):  # each op rounds its result to fp16
                expected = np.isinf((x.numpy().astype(f16) + f16(1.0)) * f16(6e4))
            assert 0 < expected.mean() < 0.5
            np.testing.assert_array_equal(got_inf, expected)
    assert {name: registry.get(name) for name in coreml.LOWERINGS} == before  # coremltools' registry restored


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_practical_model_exports_and_runs(tokenizer, tmp_path, precision):
    # The practical variant's parts in one tiny model: a convolution-only block, a causal chunked Performer block
    # (FP16-safe shifted features) and a non-causal softmax second pass; the program equals the PyTorch graph.
    cfg = yaml.safe_load((REPO / "conf/model/small.yaml").read_text())
    del cfg["defaults"]  # Hydra's defaults list (the structured schema), not a model key
    cfg.update(subsampling="dws", subsampling_channels=8)
    cfg["encoder"].update(
        d_model=32,
        n_layers=2,
        n_heads=2,
        ff_dim=64,
        kernel_size=5,
        conv_only_layers=1,
        attention="performer",
        performer_features=16,
        causal=True,
        chunk_size=4,
    )
    cfg["cascade"].update(enabled=True, n_layers=1, ff_dim=64)
    cfg["decoder"].update(ff_dim=64, n_heads=2)
    torch.manual_seed(0)
    asr = build_model(cfg, tokenizer.vocab_size).eval()
    with torch.no_grad():
        asr.ctc.weight.mul_(6.0)
    ane = ANEConformer.from_asr(asr, prenorm="mad", performer_shift=True)
    path = tmp_path / "practical.mlpackage"
    report = export_coreml(
        ane,
        path,
        precision=precision,
        shapes={"policy": "enumerated", "lengths": LENGTHS},
        tokenizer_model=tokenizer.model_path,
        metadata={"author": "tests", "license": "MIT", "subsampling_factor": 4, "cmvn_folded": False},
    )
    assert report["n_ops"] > 0
    run = MILExecutor(load_program(path))
    for T in LENGTHS:
        x = features(T)
        with torch.no_grad():
            ref = ane(x).numpy()
        out = run.run({"feats": x.numpy()})["log_probs"]
        assert out.shape == ref.shape and np.isfinite(out).all()
        err = np.abs(out.astype(np.float64) - ref).max()
        assert err < (1e-4 if precision == "fp32" else FP16_TOL)
        if precision == "fp16":
            np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
    same_as_reference(path, [features(T) for T in LENGTHS])
