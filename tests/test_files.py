"""The one atomic writer and the safe loader (edgeconformer.files): a failed write leaves the previous file intact
and no temporary file behind; a folder is swapped as a whole."""

import json

import pytest
import torch

from edgeconformer.errors import UserError
from edgeconformer.files import (
    atomic_folder,
    atomic_path,
    load_weights,
    read_jsonl,
    save_torch_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_jsonl_round_trip_replaces_a_stale_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text("stale\n")
    rows = [{"id": "x", "text": "ÜBER"}, {"id": "y", "n": 2}]
    assert write_jsonl_atomic(path, rows) == path
    assert read_jsonl(path) == rows
    assert "ÜBER" in path.read_text(encoding="utf-8")  # kept as text, not \u escapes
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_a_failed_write_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")}, allow_nan=False)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON object"):
        read_jsonl(path)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "pkg"
    with atomic_folder(target) as staged:
        (staged / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staged:
            (staged / "b").write_text("2")
            raise RuntimeError("conversion failed")
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # the old folder, untouched
    with atomic_folder(target) as staged:
        (staged / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]  # replaced as a whole
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_tensors_load_and_a_pickle_that_would_run_code_is_refused(tmp_path):
    state = {"w": torch.arange(3.0), "meta": {"epoch": 2}}
    save_torch_atomic(state, tmp_path / "ok.pt")
    loaded = load_weights(tmp_path / "ok.pt", "a test")
    assert torch.equal(loaded["w"], state["w"]) and loaded["meta"] == {"epoch": 2}
    torch.save({"x": _RunsACommand(tmp_path / "ran")}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"evil.pt: refused to load for a test"):
        load_weights(tmp_path / "evil.pt", "a test")
    assert not (tmp_path / "ran").exists()
