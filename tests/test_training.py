"""Training as the train stage runs it, on a tiny synthesized corpus: resume = uninterrupted, skipped non-finite
batches, the transcribe command, and the config contracts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_DATA, TINY_MODEL
from edgeconformer.config import compose

pytestmark = pytest.mark.slow  # trainings on a tiny corpus: CI runs it; `-m "not slow"` skips it


def tiny_cfg(data_dir: Path, out: Path, *extra: str):
    return compose(
        [
            *TINY_DATA,
            f"data.root={data_dir / 'raw'}",
            f"data.out_dir={data_dir / 'prepared'}",
            *TINY_MODEL,
            f"out_dir={out}",
            *extra,
        ]
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    from edgeconformer.stages.train import train

    full = train(tiny_cfg(data_dir, tmp_path / "full", "train.max_epochs=3", "train.test_after_fit=false"))
    train(tiny_cfg(data_dir, tmp_path / "split", "train.max_epochs=1", "train.test_after_fit=false"))
    shutil.copyfile(tmp_path / "split" / "last.ckpt", tmp_path / "split" / "epoch1.ckpt")
    resumed = train(tiny_cfg(data_dir, tmp_path / "split", "train.max_epochs=3", "train.test_after_fit=false"))
    assert resumed["resumed_from"].endswith("last.ckpt") and full["resumed_from"] is None
    assert resumed["steps"] == full["steps"] > 0
    a, b = _weights(tmp_path / "full" / "last.ckpt"), _weights(tmp_path / "split" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    one_epoch = _weights(tmp_path / "split" / "epoch1.ckpt")
    assert any(not torch.equal(one_epoch[k], a[k]) for k in a)  # training moved the weights


def test_mixed_precision_trains_with_gradient_clipping(data_dir, tmp_path):
    # the fused AdamW (an optimizer that unscales itself) is refused by Lightning's AMP plugin when gradients are
    # clipped: under a mixed precision the optimizer is the unfused one, in full precision the fused one
    from edgeconformer.config import apply_variant
    from edgeconformer.stages.train import train

    cfg = tiny_cfg(
        data_dir,
        tmp_path / "bf16",
        "variant=vanilla_bf16",  # the variant that trains vanilla in bf16-mixed (conf/variant_overrides)
        "train.max_epochs=1",
        "train.test_after_fit=false",
        "train.grad_clip=1.0",
    )
    out = train(apply_variant(cfg))
    assert out["steps"] > 0 and out["precision"]["chosen"] == "bf16-mixed"
    from edgeconformer.models.lightning import ASRModule

    module = ASRModule.load_from_checkpoint(tmp_path / "bf16" / "last.ckpt", map_location="cpu")
    assert module.make_optimizer().defaults["fused"]  # outside a trainer: full precision
    # FP32 master weights: what stabilization, FP16 and export start from is an FP32 checkpoint
    state = _weights(tmp_path / "bf16" / "best.ckpt")
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_resume_refuses_a_changed_config(data_dir, tmp_path):
    from edgeconformer.errors import UserError
    from edgeconformer.stages.train import train

    train(tiny_cfg(data_dir, tmp_path / "run", "train.max_epochs=1", "train.test_after_fit=false"))
    with pytest.raises(UserError, match="train.lr"):
        train(tiny_cfg(data_dir, tmp_path / "run", "train.max_epochs=2", "train.lr=0.01"))


def test_nonfinite_loss_skips_the_batch_and_counts_it(data_dir, tmp_path, monkeypatch):
    from edgeconformer.models.asr import DualDecoderASR
    from edgeconformer.stages.train import train

    forward = DualDecoderASR.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args):
        out = forward(self, *args)
        calls["n"] += 1
        if self.training and calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DualDecoderASR, "forward", sometimes_nan)
    metrics = train(tiny_cfg(data_dir, tmp_path / "nan", "train.max_epochs=1", "train.test_after_fit=false"))
    assert metrics["skipped_batches"] == 1
    weights = _weights(tmp_path / "nan" / "last.ckpt")
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    logged = (tmp_path / "nan" / "csv" / "metrics.csv").read_text()
    assert "train/skipped_batches" in logged


def test_train_writes_the_model_folder_and_transcribe_uses_it(data_dir, tmp_path):
    from edgeconformer.stages.train import train

    out = tmp_path / "model"
    metrics = train(tiny_cfg(data_dir, out, "train.max_epochs=2"))
    for name in ("best.ckpt", "last.ckpt", "tokenizer.model", "config.yaml", "train_metrics.json", "csv/metrics.csv"):
        assert (out / name).exists(), name
    saved = json.loads((out / "train_metrics.json").read_text())
    assert saved["averaged_epochs"] == [0, 1] and isinstance(saved["best_is_average"], bool)
    assert saved["epochs"] == 2 and saved == metrics
    assert saved["test_wer_ctc_greedy"] >= 0 and saved["test_wer_joint"] >= 0
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_step", "val/wer", "val/loss", "train/lr"} <= set(header)

    audio = sorted((data_dir / "raw").rglob("*.flac"))[:2]
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"garbage")
    exe = Path(sys.executable).parent / "edgeconformer"
    proc = subprocess.run(
        [str(exe), "transcribe", *map(str, audio), str(bad), "--model", str(out), "--method", "joint"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1  # one file failed, the others were transcribed
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(a) for a in audio]
    assert f"{bad}: cannot read audio" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [str(exe), "transcribe", str(audio[0]), "--model", str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "checkpoint not found" in proc.stderr


def test_flops_contract_last_line_is_json():
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "flops.py"), "model=conformer_m", "model.subsampling=dws"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < last["shares"]["subsampling"] < 0.15 and last["gflops_per_audio_second"] > 0
    assert abs(sum(last["shares"].values()) - 1) < 1e-4
    assert proc.stdout.splitlines()[3].startswith("subsampling")  # the table precedes the JSON line


def test_multirun_gives_one_wandb_run_per_job_in_one_group(data_dir, tmp_path):
    overrides = [
        *TINY_DATA,
        f"data.root={data_dir / 'raw'}",
        f"data.out_dir={data_dir / 'prepared'}",
        *[o for o in TINY_MODEL if not o.startswith("logger=")],
        "logger=wandb",
        "train.max_epochs=1",
        "train.test_after_fit=false",
        "hydra.sweep.dir=sweeps/s1",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), "-m", "model.subsampling=vanilla,dws", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    for job in ("0", "1"):
        assert (tmp_path / "sweeps" / "s1" / job / "last.ckpt").exists()
    for run in runs:
        log = next(run.glob("*.wandb")).read_bytes()
        assert b"sweep-sweeps-s1" in log  # the shared group
    names = b"".join(next(r.glob("*.wandb")).read_bytes() for r in runs)
    assert b"small-vanilla" in names and b"small-dws" in names


def test_average_state_dicts_is_the_elementwise_mean():
    from edgeconformer.training.callbacks import average_state_dicts

    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    avg = average_state_dicts([a, b])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 4.0]))
    assert avg["n"].item() == 5 and avg["w"].dtype == torch.float32


def test_ddp_spawn_on_two_cpu_processes_shards_the_batches(data_dir, tmp_path):
    # trainer=ddp_cpu: two processes, gradients all-reduced; each rank takes every other batch of the epoch's
    # list, so one epoch is half the optimizer steps of a single-process epoch.
    from edgeconformer.stages.train import train

    train(
        tiny_cfg(
            data_dir,
            tmp_path / "ddp",
            "trainer=ddp_cpu",
            "train.max_epochs=1",
            "train.test_after_fit=false",
            "train.average_last=1",
        )
    )
    train(
        tiny_cfg(data_dir, tmp_path / "one", "train.max_epochs=1", "train.test_after_fit=false", "train.average_last=1")
    )
    steps = {
        run: torch.load(tmp_path / run / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
        for run in ("ddp", "one")
    }
    assert steps["one"] >= 2 and steps["ddp"] == -(-steps["one"] // 2)
    assert (tmp_path / "ddp" / "best.ckpt").exists() and (tmp_path / "ddp" / "train_metrics.json").exists()


def test_features_on_the_fly_train_like_precomputed_ones(data_dir, tmp_path):
    # train.precompute_features=false (LibriSpeech scale: audio decoded per batch, features computed by the module)
    # must train the same model as the in-memory features of the default.
    from edgeconformer.stages.train import train

    for run, flag in (("pre", "true"), ("fly", "false")):
        train(
            tiny_cfg(
                data_dir,
                tmp_path / run,
                f"train.precompute_features={flag}",
                "train.max_epochs=1",
                "train.test_after_fit=false",
                "train.average_last=1",
            )
        )
    a, b = _weights(tmp_path / "pre" / "last.ckpt"), _weights(tmp_path / "fly" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_parallel_runs_setting(monkeypatch):
    from edgeconformer.errors import UserError
    from edgeconformer.stages import train as stage
    from edgeconformer.stages.train import parallel_runs

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(stage, "physical_memory", lambda: 64 * 2**30)
    assert parallel_runs("auto", 7, "cpu", 1) == min(7, 2 * cores)  # two one-thread runs per core
    assert parallel_runs("auto", 7, "cpu", cores) == 2
    assert parallel_runs("auto", 7, "cpu", 2 * cores) == 1
    assert parallel_runs("auto", 1, "cpu", 1) == 1
    monkeypatch.setattr(stage, "physical_memory", lambda: 5 * 2**30)  # room for one 3 GiB run
    assert parallel_runs("auto", 7, "cpu", 1) == 1
    assert parallel_runs("auto", 7, "gpu", 8) == 1  # one device: one run at a time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parallel_runs("auto", 7, "auto", 1) == 1  # Lightning's auto would put every run on the one GPU
    monkeypatch.setattr(stage, "physical_memory", lambda: 64 * 2**30)
    assert parallel_runs("auto", 7, "cpu", 1) == min(7, 2 * cores)
    assert parallel_runs(3, 2, "cpu", 1) == 2 and parallel_runs("4", 7, "cpu", 1) == 4
    with pytest.raises(UserError, match="parallel_runs=0"):
        parallel_runs(0, 7, "cpu", 1)


def test_runs_start_longest_first_and_each_distinct_config_is_timed_once():
    from omegaconf import OmegaConf

    from edgeconformer.stages.train import longest_first

    def cfg(d_model, seed, epochs=7):
        return OmegaConf.create(
            {"seed": seed, "model": {"d": d_model}, "train": {"max_epochs": epochs}, "trainer": {"num_threads": 1}}
        )

    configs = {
        "vanilla-s1": cfg(144, 1),
        "vanilla-s2": cfg(144, 2),
        "dws-s1": cfg(96, 1),
        "practical-s1": cfg(176, 1),
        "long-s1": cfg(96, 1, epochs=30),
    }
    timed = []

    def cost(c):
        timed.append(c.seed)
        return c.model.d * c.train.max_epochs

    order, costs = longest_first(list(configs), configs.__getitem__, cost)
    assert order == ["long-s1", "practical-s1", "vanilla-s1", "vanilla-s2", "dws-s1"]  # ties keep their order
    assert costs["vanilla-s1"] == costs["vanilla-s2"] == 144 * 7
    assert len(timed) == 4  # vanilla's seeds share one timing

    # A run whose config cannot be composed, or whose model cannot be timed, is not lost: it starts first, where
    # its worker fails with the error (listed with the run) while the others train.
    def broken(name):
        if name == "bad-s1":
            raise ValueError("unknown variant")
        return configs[name]

    def fragile(c):
        if c.model.d == 96:
            raise RuntimeError("shape mismatch")
        return cost(c)

    order, costs = longest_first(["vanilla-s1", "bad-s1", "dws-s1"], broken, fragile)
    assert order == ["bad-s1", "dws-s1", "vanilla-s1"] and costs["bad-s1"] == costs["dws-s1"] == float("inf")


def test_step_cost_times_the_run_and_leaves_the_process_as_it_was(data_dir, tmp_path, monkeypatch):
    from edgeconformer.stages import train as stage

    c = tiny_cfg(data_dir, tmp_path, "trainer.num_threads=1")
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    assert 0 < stage.step_cost(c) < float("inf")
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)

    seen = {}

    def timer(model, batch, steps):
        seen["batch_seconds"] = batch[0].shape[0] * batch[0].shape[1] / 100  # (B, T, F) at 100 frames/s
        return lambda precision: {"32-true": 0.5}[precision]

    monkeypatch.setattr(stage, "step_timer", timer)
    cost = stage.step_cost(c)
    assert cost == pytest.approx(0.5 / seen["batch_seconds"] * int(c.train.max_epochs))  # per audio s, x epochs


def test_train_runs_side_by_side_equal_each_run_trained_alone(data_dir, tmp_path, monkeypatch):
    """The chain's pool (two runs at once, one thread each, spawned processes) gives each run exactly the
    checkpoint that run gets trained alone on one thread; train@<run> then publishes it into models/<dir>/."""
    from omegaconf import OmegaConf

    from edgeconformer.config import apply_variant, load_params
    from edgeconformer.stages.train import PUBLISHED, publish_run, train, train_runs

    monkeypatch.chdir(tmp_path)
    extra = ["variants=[vanilla,dws]", "compared=[vanilla,dws]", "seeds=[1]", "trainer.parallel_runs=2"]
    base = tiny_cfg(data_dir, tmp_path / "unused", "train.max_epochs=1", "train.test_after_fit=false", *extra)
    base.out_dir = None
    OmegaConf.save(base, tmp_path / "params.yaml", resolve=True)
    cfg, _ = load_params("params.yaml", [])
    summary = train_runs(cfg, "params.yaml")
    assert set(summary["runs"]) == {"vanilla-s1", "dws-s1"} and summary["parallel_runs"] == 2
    assert all("error" not in r for r in summary["runs"].values())

    alone_cfg, given = load_params("params.yaml", ["variant=dws", "seed=1", f"out_dir={tmp_path / 'alone'}"])
    alone_cfg = apply_variant(alone_cfg, given)
    alone_cfg.trainer.num_threads = 1
    threads = torch.get_num_threads()
    try:
        train(alone_cfg)
    finally:
        torch.set_num_threads(threads)
    pooled, alone = _weights(tmp_path / "trained/dws/s1/best.ckpt"), _weights(tmp_path / "alone/best.ckpt")
    assert pooled.keys() == alone.keys() and all(torch.equal(pooled[k], alone[k]) for k in alone)

    for variant in ("vanilla", "dws"):
        run_cfg, given = load_params("params.yaml", [f"variant={variant}", "seed=1"])
        publish_run(apply_variant(run_cfg, given))
        for name in PUBLISHED:
            published = tmp_path / "models" / variant / "s1" / name
            assert published.read_bytes() == (tmp_path / "trained" / variant / "s1" / name).read_bytes()


def test_publish_run_names_the_missing_training(tmp_path, monkeypatch):
    from edgeconformer.errors import UserError
    from edgeconformer.stages.train import publish_run

    monkeypatch.chdir(tmp_path)
    cfg = compose([*TINY_MODEL, "variant=dws", "seed=2"])
    with pytest.raises(UserError, match=r"trained/dws/s2: best.ckpt.*dvc repro train_runs"):
        publish_run(cfg)
