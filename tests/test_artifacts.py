"""Run paths per variant and seed, the default seed of `--model models/<variant>`, the fixed compute budget, and the
generated documentation blocks against the committed metrics."""

import time
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from edgeconformer.artifacts import resolve_model_dir, run_label, run_paths, seeds_in
from edgeconformer.config import compose
from edgeconformer.errors import UserError


def test_a_run_lives_in_folders_named_by_variant_and_seed():
    p = run_paths(OmegaConf.create({"variant": "dws", "seed": 2, "model": {"subsampling": "dws"}}))
    assert (str(p.model_dir), str(p.report_dir), p.name) == ("models/dws/s2", "reports/runs/dws/s2", "dws-s2")
    assert str(p.evaluation) == "reports/runs/dws/s2/evaluation.json"
    job = run_paths(OmegaConf.create({"variant": "dws", "seed": 2, "out_dir": "sweeps/0", "model": {}}))
    assert (str(job.model_dir), str(job.evaluation)) == ("sweeps/0", "sweeps/0/metrics.json")
    assert run_label("models/practical/s7") == "practical-s7" and run_label("sweeps/0") == "0"


def test_the_default_chain_trains_vanilla_and_dws_with_three_seeds_and_practical_with_one():
    cfg = compose()
    assert list(cfg.runs) == ["vanilla-s1", "vanilla-s2", "vanilla-s3", "dws-s1", "dws-s2", "dws-s3", "practical-s1"]
    assert cfg.train.max_time is None and "seed" not in cfg.train
    more = compose(["ablation_seeds=[1,2,3]"])
    assert [k for k in more.runs if k.startswith("practical")] == ["practical-s1", "practical-s2", "practical-s3"]


def test_model_dir_without_a_seed_resolves_to_the_lowest_trained_seed(tmp_path):
    for seed in (3, 1):
        (tmp_path / "dws" / f"s{seed}").mkdir(parents=True)
        (tmp_path / "dws" / f"s{seed}" / "best.ckpt").write_bytes(b"x")
    (tmp_path / "dws" / "s9").mkdir()  # no checkpoint: not a trained seed
    assert seeds_in(tmp_path / "dws") == [1, 3]
    assert resolve_model_dir(tmp_path / "dws") == tmp_path / "dws" / "s1"
    assert resolve_model_dir(tmp_path / "dws", seed=3) == tmp_path / "dws" / "s3"
    assert resolve_model_dir(tmp_path / "dws" / "s3") == tmp_path / "dws" / "s3"
    with pytest.raises(UserError, match=r"no run of seed 2 .*\[1, 3\]"):
        resolve_model_dir(tmp_path / "dws", seed=2)


def test_transcribe_names_the_seed_folders_when_a_seed_is_missing(tmp_path, capsys):
    from edgeconformer.cli import main

    (tmp_path / "dws" / "s1").mkdir(parents=True)
    (tmp_path / "dws" / "s1" / "best.ckpt").write_bytes(b"x")
    assert main(["transcribe", "a.flac", "--model", str(tmp_path / "dws"), "--seed", "5"]) != 0
    assert "no run of seed 5" in capsys.readouterr().err


def test_max_time_is_a_guard_that_fails_never_a_silent_truncation():
    from edgeconformer.training.callbacks import TimeGuard

    guard = TimeGuard("00:00:00:01")
    trainer = SimpleNamespace(current_epoch=2, global_step=40, max_epochs=7)
    guard.on_train_start(trainer, None)
    guard.on_train_batch_end(trainer, None, None, None, 0)  # within the limit: nothing happens
    guard.started = time.monotonic() - 2
    with pytest.raises(UserError, match=r"train.max_time=00:00:00:01 at epoch 2.*incomplete"):
        guard.on_train_batch_end(trainer, None, None, None, 0)
    from edgeconformer.config import check

    check(compose(["train.max_time=00:02:00:00"]))
    with pytest.raises(UserError, match="DD:HH:MM:SS"):  # every stage checks its config before it starts
        check(compose(["train.max_time='10 minutes'"]))


def test_documentation_tables_are_generated_from_the_committed_metrics():
    from edgeconformer.evidence import stale_blocks
    from edgeconformer.report import generated_blocks, load_comparisons, load_metrics

    generated = generated_blocks(load_metrics(REPO / "metrics"), load_comparisons(REPO / "metrics"))
    assert stale_blocks(REPO, generated) == [], (
        "results blocks differ from metrics/*.json: run `dvc repro report` (or python pipelines/report.py) and commit"
    )


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object would create the marker file
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_with_the_file_named(tmp_path, capsys):
    import torch

    from edgeconformer.cli import main

    run = tmp_path / "dws" / "s1"
    run.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "payload": _RunsACommand(marker)}, run / "best.ckpt")
    assert main(["transcribe", "a.flac", "--model", str(tmp_path / "dws")]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'best.ckpt'}: refused to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_dvc_composes_the_runs_from_conf_in_its_own_process(tmp_path):
    # `dvc exp run -S 'seeds=[4,5]'` composes conf/ in DVC's process, which finds the runs resolver through
    # hydra_plugins/ (DVC's hydra.plugins_path) without importing edgeconformer itself.
    import subprocess
    import sys

    out = tmp_path / "params.yaml"
    code = (
        "from dvc.utils.hydra import compose_and_dump; "
        f"compose_and_dump({str(out)!r}, {str(REPO / 'conf')!r}, None, 'config', {str(REPO)!r}, "
        "['seeds=[4,5]', 'ablation_seeds=[1,2]'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = OmegaConf.load(out).runs
    assert list(runs) == ["vanilla-s4", "vanilla-s5", "dws-s4", "dws-s5", "practical-s1", "practical-s2"]
    assert runs["dws-s5"].dir == "dws/s5"


def test_malformed_max_time_is_a_user_error_even_without_the_config_check():
    from edgeconformer.training.callbacks import TimeGuard

    for bad in ("10 minutes", "00:10:00", "00:xx:00:00", "1:2:3:4:5"):
        with pytest.raises(UserError, match="DD:HH:MM:SS"):
            TimeGuard(bad)
    assert TimeGuard("01:00:00:05").limit == 86405


@pytest.mark.parametrize("purpose", ["init_from", "averaging"])
def test_fine_tuning_and_averaging_refuse_a_checkpoint_that_would_run_code(tmp_path, purpose):
    import torch

    from edgeconformer.models.lightning import load_matching_weights
    from edgeconformer.training.callbacks import average_into_best

    marker = tmp_path / "ran"
    planted = {"state_dict": {"w": torch.zeros(2)}, "payload": _RunsACommand(marker)}
    if purpose == "init_from":
        torch.save(planted, tmp_path / "best.ckpt")
        with pytest.raises(UserError, match=rf"{tmp_path / 'best.ckpt'}: refused to load for train.init_from"):
            load_matching_weights(torch.nn.Linear(2, 2), tmp_path)
    else:
        (tmp_path / "epochs").mkdir()
        torch.save({"w": torch.zeros(2)}, tmp_path / "epochs" / "epoch001.pt")
        torch.save(planted, tmp_path / "epochs" / "epoch002.pt")
        with pytest.raises(UserError, match=r"epoch002.pt: refused to load for weight averaging"):
            average_into_best(tmp_path, tmp_path / "best.ckpt", None, None, None)
    assert not marker.exists()
