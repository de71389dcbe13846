"""The stabilization ablation's arms: each differs from the stabilized graph in exactly its two components, the
arms computed in worker processes equal the same graphs run here, and the k distribution counts real rows."""

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL
from edgeconformer.config import compose
from edgeconformer.models.lightning import ASRModule
from edgeconformer.stabilize.precision import precision_model
from edgeconformer.stages.stabilize import ablation_arms, ane_options, fp16_workers, softmax_k_distribution, start_fp16


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


def test_graphs_run_in_worker_processes_equal_the_graphs_run_here(tiny):
    module, utts, options = tiny
    graphs = {
        name: ("fp16", dict(options, **arm), "fp16")
        for name, arm in ablation_arms(options).items()
        if name in ("acc16_none", "acc16_both")
    }
    graphs["fp16_unstabilized"] = ("fp16_unstabilized", options, "native")
    with fp16_workers(2) as pool:
        assert pool is not None
        remote = start_fp16(pool, module, utts, graphs, workers=2)()
    with fp16_workers(1) as pool:
        assert pool is None
        here = start_fp16(pool, module, utts, graphs, workers=1)()
    for name, (mode, opts, accumulate) in graphs.items():
        local = precision_model(module.model, mode, module.cmvn, **opts, accumulate=accumulate)
        for u in utts:
            expected = local(u.feats)
            assert torch.equal(remote[name](u.feats), expected), name
            assert torch.equal(here[name](u.feats), expected), name
        assert remote[name].summary() == here[name].summary() == local.summary()
        assert local.summary()["calls"] == len(utts)
    assert remote["fp16_unstabilized"].summary()["mode"] == "fp16_unstabilized"


def test_an_error_stops_the_workers_without_running_every_job(tiny):
    module, utts, options = tiny
    graphs = {f"g{i}": ("fp16", options, "fp16") for i in range(6)}
    with pytest.raises(RuntimeError, match="audit failed"):
        with fp16_workers(2) as pool:
            start_fp16(pool, module, utts, graphs, workers=2)
            raise RuntimeError("audit failed")  # what this process does meanwhile fails
    with pytest.raises(RuntimeError, match="shutdown"):  # the workers are gone with the error
        pool.submit(print)


def test_softmax_k_distribution_counts_every_attention_row(tiny):
    module, utts, options = tiny
    k = softmax_k_distribution(module, utts, options)
    # one row per query frame, head and block: T' = T // 4 - 1 frames after 4x subsampling (two k=3 s=2 convs)
    frames = sum((u.feats.size(1) - 1) // 2 // 2 for u in utts)
    heads, blocks = 2, 1
    assert k["rows"] == pytest.approx(frames * heads * blocks, rel=0.1)
    assert sum(k["uncapped"].values()) == sum(k["capped"].values()) == k["rows"]
    assert k["rows_needing_rescaling"] == sum(n for key, n in k["uncapped"].items() if int(key) > 0)


def test_workers_see_the_model_as_it_was_when_started(tiny):
    module, utts, options = tiny
    module = copy.deepcopy(module)
    expected = precision_model(module.model, "fp16", module.cmvn, **options)
    want = [expected(u.feats) for u in utts]
    # More jobs than the pool takes at once (2 workers + 1 queued): the later ones are sent after the changes below.
    graphs = {f"fp16_{i}": ("fp16", options, "native") for i in range(4)}
    with fp16_workers(2) as pool:
        collect = start_fp16(pool, module, utts, graphs, workers=2)
        # What the stage does meanwhile: the audits hook closures into the model (not picklable); and a change.
        module.model.register_forward_hook(lambda *args: None)
        with torch.no_grad():
            for p in module.model.parameters():
                p.zero_()
        got = collect()
    for name in graphs:
        for u, w in zip(utts, want):
            assert torch.equal(got[name](u.feats), w), name
