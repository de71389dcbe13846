"""The one way artifacts are written and read: atomic writes (a temporary file in the target's folder, then a
rename, so a reader or an interrupted run never sees half a file) and safe loading of tensors (no code runs when a
checkpoint is unpickled).

This module sits at the bottom of the package (it imports only `errors`): `data`, `models`, the stages and
`artifacts` (which re-exports it with the paths per run) all write through it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch  # here, not at the top: data preparation and the report never need torch

from edgeconformer.errors import UserError


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; renames it onto `path` when the block succeeds and removes
    it when it fails. `suffix` keeps a file type recognisable to writers that infer it from the name (".flac").
    For folders see atomic_folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields an empty staging folder beside `path` to fill; when the block succeeds the staging folder takes the
    place of `path` (an existing folder there is swapped out with two renames and then removed; if the second
    rename fails the old folder is put back). A failure leaves no partial folder and an existing one untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = work / path.name
        staged.mkdir()
        yield staged
        previous = work / "previous"
        if path.exists():
            os.replace(path, previous)
        try:
            os.replace(staged, path)
        except BaseException:
            if previous.exists():
                os.replace(previous, path)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | Path, obj, indent: int = 2, allow_nan: bool = True) -> Path:
    """Indented JSON with a final newline (diff-friendly for the git-tracked metrics). allow_nan=False: strict JSON,
    an inf/NaN is an error instead of a token other readers reject."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line (manifests, per-utterance results); non-ASCII text kept as is."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """JSON-lines rows; blank lines are skipped, a malformed line is an error naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not a JSON object ({e}); regenerate the file with the stage "
                    "that wrote it (`dvc repro`)"
                ) from e
    return rows


def save_torch_atomic(obj, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load_weights(path: str | Path, purpose: str):
    """torch.load with weights_only=True: tensors and plain containers only, so a planted pickle cannot run code.
    `purpose` names what asked for the file (e.g. "train.init_from") in the error."""

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(path, purpose, e) from None


def refused(path: str | Path, purpose: str, error: pickle.UnpicklingError) -> UserError:
    """The error for a file that weights_only loading refused (also raised by artifacts.load_trained, where
    Lightning does the loading)."""
    return UserError(
        f"{path}: refused to load for {purpose}: the file holds objects other than tensors and plain "
        f"containers, which could run code when unpickled ({str(error).splitlines()[-1][:200]}); "
        "load only checkpoints written by edgeconformer's training"
    )
