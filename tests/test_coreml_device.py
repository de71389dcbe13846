"""Core ML on device: the input-length handling everywhere, predictions on macOS only (skipped elsewhere)."""

import platform

import numpy as np
import pytest

from edgeconformer.evaluate import coreml_device
from edgeconformer.evaluate.coreml_device import allowed_lengths, fit_length


def test_available_says_why_not_off_macos():
    ok, why = coreml_device.available()
    if platform.system() != "Darwin":
        assert not ok and "macOS" in why


def test_fit_length_pads_to_the_next_enumerated_length_and_refuses_longer_input():
    feats = np.zeros((1, 130, 80), dtype=np.float32)
    x, valid = fit_length(feats, "enumerated", [100, 200, 400], pad_value=-13.8)
    assert x.shape == (1, 200, 80) and valid == 130
    assert (x[0, 130:] == np.float32(-13.8)).all() and (x[0, :130] == 0).all()
    with pytest.raises(ValueError, match="longer than every exported length"):
        fit_length(np.zeros((1, 401, 80), np.float32), "fixed", [400], pad_value=0.0)


def test_fit_length_keeps_ranged_input_and_checks_the_bounds():
    feats = np.ones((1, 57, 80), dtype=np.float32)
    x, valid = fit_length(feats, "ranged", (16, -1), pad_value=0.0)  # upper -1: unbounded
    assert x is feats and valid == 57
    with pytest.raises(ValueError, match="outside the exported range"):
        fit_length(feats, "ranged", (16, 50), pad_value=0.0)
    with pytest.raises(ValueError, match="outside the exported range"):
        fit_length(np.ones((1, 8, 80), np.float32), "ranged", (16, 50), pad_value=0.0)


def test_allowed_lengths_reads_the_shape_policy_of_an_exported_spec():
    import coremltools as ct
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, feats):  # (1, T, 80) -> (1, T, 8) log-probs
            return torch.log_softmax(feats[..., :8], dim=-1)

    traced = torch.jit.trace(Tiny().eval(), torch.randn(1, 200, 80))
    for shape, expected in [
        (ct.EnumeratedShapes(shapes=[(1, 100, 80), (1, 200, 80)], default=(1, 200, 80)), ("enumerated", [100, 200])),
        (ct.Shape(shape=(1, ct.RangeDim(lower_bound=16, upper_bound=500, default=200), 80)), ("ranged", (16, 500))),
        ((1, 200, 80), ("fixed", [200])),
    ]:
        model = ct.convert(
            traced,
            convert_to="mlprogram",
            inputs=[ct.TensorType(name="feats", shape=shape)],
            outputs=[ct.TensorType(name="log_probs")],
            minimum_deployment_target=ct.target.iOS16,
            skip_model_load=True,
        )
        assert allowed_lengths(model.get_spec()) == expected


@pytest.mark.skipif(not coreml_device.available()[0], reason=coreml_device.available()[1])
def test_each_compute_unit_matches_pytorch_on_macos(tmp_path):
    import torch

    from edgeconformer.export.coreml import export_coreml

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(80, 16, 1)

        def forward(self, feats):  # (1, T, 80) -> (1, T, 16)
            x = self.proj(feats.transpose(1, 2)[:, :, None, :])[:, :, 0, :].transpose(1, 2)
            return torch.log_softmax(x, dim=-1)

    model = Tiny().eval()
    path = tmp_path / "tiny.mlpackage"
    export_coreml(
        model,
        path,
        shapes={"policy": "ranged", "range": [16, 400], "default": 100},
        precision="fp32",
        metadata={"subsampling_factor": 1, "cmvn_folded": False},
    )
    feats = [np.random.default_rng(i).standard_normal((1, 50 + 10 * i, 80)).astype(np.float32) for i in range(3)]
    with torch.no_grad():
        reference = [model(torch.from_numpy(f))[0].numpy() for f in feats]
    results = coreml_device.evaluate_compute_units(str(path), [(f, 1.0) for f in feats], reference, warmup=1)
    assert set(results) == set(coreml_device.COMPUTE_UNITS)
    for unit, r in results.items():
        assert r["max_abs_diff"] < 5e-2, unit  # the Neural Engine computes in FP16
        assert r["rtf_median"] > 0 and r["load_seconds"] >= 0


def test_input_dtype_follows_the_exported_precision(tmp_path):
    import torch

    from edgeconformer.evaluate.coreml_device import input_dtype
    from edgeconformer.export.coreml import export_coreml

    class Tiny(torch.nn.Module):
        def forward(self, feats):
            return torch.log_softmax(feats[..., :8], dim=-1)

    for precision, expected in (("fp16", np.float16), ("fp32", np.float32)):
        path = tmp_path / f"{precision}.mlpackage"
        export_coreml(
            Tiny(),
            path,
            shapes={"policy": "fixed", "fixed_length": 40},
            precision=precision,
            metadata={"subsampling_factor": 1, "cmvn_folded": False},
        )
        import coremltools as ct

        assert input_dtype(ct.utils.load_spec(str(path))) == expected
