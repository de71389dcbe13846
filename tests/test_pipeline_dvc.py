"""The DVC chain as a user runs it, on a copy of the repository with a tiny corpus."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from edgeconformer.files import read_jsonl

pytestmark = pytest.mark.slow  # `dvc repro` in a scratch repository: CI runs it; `-m "not slow"` skips it

TINY = [
    "data.synth.train_hours=0.01",
    "data.synth.dev_utterances=4",
    "data.synth.test_utterances=4",
    "data.synth.train_espeak_speakers=4",
    "data.synth.train_flite_speakers=4",
    "data.synth.heldout_espeak_speakers=1",
    "data.synth.heldout_flite_speakers=1",
    "data.tokenizer.vocab_size=40",
]


def test_params_yaml_is_composed_from_conf():
    proc = subprocess.run([sys.executable, "-m", "edgeconformer.params", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _copy_repo(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def _dvc(cwd, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_dvc_repro_tokenize_builds_corpus_and_is_a_noop_the_second_time(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    subprocess.run(
        [sys.executable, "-m", "edgeconformer.params", *TINY],
        cwd=repo,
        check=True,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
        capture_output=True,
    )
    first = _dvc(repo, "repro", "tokenize")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (repo / "data/raw/mini/LibriSpeech/train").is_dir()
    rows = read_jsonl(repo / "data/prepared/manifests/train.jsonl")
    assert rows and all(Path(r["audio_filepath"]).is_file() for r in rows)
    assert (repo / "data/prepared/tokenizer/tokenizer.model").is_file()
    second = _dvc(repo, "repro", "tokenize")
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout
    status = _dvc(repo, "status", "tokenize", "--with-deps")
    assert "up to date" in status.stdout.lower(), status.stdout
    # a tokenizer setting re-runs only the tokenizer
    subprocess.run(
        [sys.executable, "-m", "edgeconformer.params", *TINY[:-1], "data.tokenizer.vocab_size=36"],
        cwd=repo,
        check=True,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
        capture_output=True,
    )
    third = _dvc(repo, "repro", "tokenize")
    assert "Running stage 'tokenize'" in third.stdout and "Running stage 'prepare'" not in third.stdout
