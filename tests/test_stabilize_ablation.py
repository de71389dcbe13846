"""The stabilization ablation's arms: each differs from the stabilized graph in exactly its two components, the
arms computed in worker processes equal the same graphs run here, and the k distribution counts real rows."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL
from edgeconformer.config import compose
from edgeconformer.models.lightning import ASRModule
from edgeconformer.stabilize.precision import precision_model
from edgeconformer.stages.stabilize import ablation_arms, ane_options, run_arms, softmax_k_distribution


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = compose(TINY_MODEL)
    module = ASRModule(
        OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.train, resolve=True), 40, seed=1
    ).eval()
    utts = [SimpleNamespace(id=str(i), feats=torch.randn(1, 60 + 17 * i, 80)) for i in range(4)]
    return module, utts, ane_options(cfg.stabilize)


def test_arms_switch_exactly_the_two_components(tiny):
    _, _, options = tiny
    arms = ablation_arms(dict(options, prenorm="mad"))
    assert arms["acc16_none"] == {"prenorm": "none", "softmax": "exact"}
    assert arms["acc16_prenorm"] == {"prenorm": "mad", "softmax": "exact"}
    assert arms["acc16_lut"] == {"prenorm": "none", "softmax": "lut"}
    assert arms["acc16_both"] == {"prenorm": "mad", "softmax": "lut"}
    assert arms["acc16_both_uncapped"] == {"prenorm": "mad", "softmax": "lut", "lut_max_squarings": None}


def test_arms_run_in_worker_processes_equal_the_graphs_run_here(tiny):
    module, utts, options = tiny
    arms = {
        name: dict(options, **arm)
        for name, arm in ablation_arms(options).items()
        if name in ("acc16_none", "acc16_both")
    }
    remote = run_arms(module, utts, arms, "fp16", workers=2)
    for name, opts in arms.items():
        local = precision_model(module.model, "fp16", module.cmvn, **opts, accumulate="fp16")
        for u in utts:
            assert torch.equal(remote[name](u.feats), local(u.feats)), name
        assert remote[name].summary()["calls"] == len(utts)


def test_softmax_k_distribution_counts_every_attention_row(tiny):
    module, utts, options = tiny
    k = softmax_k_distribution(module, utts, options)
    # one row per query frame, head and block: T' = T // 4 - 1 frames after 4x subsampling (two k=3 s=2 convs)
    frames = sum((u.feats.size(1) - 1) // 2 // 2 for u in utts)
    heads, blocks = 2, 1
    assert k["rows"] == pytest.approx(frames * heads * blocks, rel=0.1)
    assert sum(k["uncapped"].values()) == sum(k["capped"].values()) == k["rows"]
    assert k["rows_needing_rescaling"] == sum(n for key, n in k["uncapped"].items() if int(key) > 0)
