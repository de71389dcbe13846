"""Every bad-input case of the prepare stage: each item kept or rejected with a reason, never dropped."""

import json
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

from conftest import REPO, write_chapter, write_flac
from edgeconformer.data.manifest import Checks, find_candidates, scan_split, split_summary
from edgeconformer.files import read_jsonl


def _tree(root: Path) -> Path:
    """dev-clean with one good chapter and one chapter per kind of defect."""
    split = root / "LibriSpeech" / "dev-clean"
    write_chapter(split, "19", "198", {"0000": "HELLO WORLD", "0001": "IT'S A TEST"})
    chap = write_chapter(
        split,
        "20",
        "300",
        {"0000": "AUDIO WITHOUT LINE", "0001": "", "0002": "lower case", "0003": "DIGITS 42", "0004": "GOOD ONE"},
    )
    trans = chap / "20-300.trans.txt"
    lines = trans.read_text().splitlines()
    lines = [line for line in lines if not line.startswith("20-300-0000")]  # audio without transcript
    lines += ["20-300-0009 LINE WITHOUT AUDIO", "20-300-0004 DUPLICATE LINE"]
    trans.write_text("\n".join(lines) + "\n")
    (chap / "20-300-0005.flac").write_bytes(b"not a flac file at all")  # corrupt audio
    write_flac(chap / "20-300-0006.flac", sr=8000)  # wrong rate
    write_flac(chap / "20-300-0007.flac", channels=2)  # stereo
    sf.write(chap / "20-300-0008.wav", np.zeros(0, np.float32), 16000)  # decodes, but no samples
    write_flac(chap / "20-300-0010.flac", seconds=3.0)  # too long for the test bound
    write_flac(chap / "21-300-0011.flac")  # name does not match folders
    with open(trans, "a") as f:
        for u in ("0005", "0006", "0007", "0008", "0010"):
            f.write(f"20-300-{u} SOME WORDS\n")
        f.write("21-300-0011 MISPLACED FILE\n")
    return split


def _codes(rejected):
    return {r["id"]: r["code"] for r in rejected}


def test_every_item_is_kept_or_rejected_with_reason(tmp_path):
    split = _tree(tmp_path)
    checks = Checks(max_duration=2.0)
    kept, rejected = scan_split(split, checks, tmp_path / "converted", jobs=1)
    kept_ids = {r["id"] for r in kept}
    codes = _codes(rejected)
    assert kept_ids == {"19-198-0000", "19-198-0001", "20-300-0004", "20-300-0006", "20-300-0007"}
    assert codes == {
        "20-300-0000": "no_transcript",
        "20-300-0001": "empty_transcript",
        "20-300-0002": "charset",
        "20-300-0003": "charset",
        "20-300-0004": "duplicate",
        "20-300-0005": "decode",
        "20-300-0008": "empty_audio",
        "20-300-0009": "no_audio",
        "20-300-0010": "duration",
        "21-300-0011": "name_mismatch",
    }
    # found = distinct ids + duplicate lines; kept + rejected = found
    candidates, dup = find_candidates(split)
    assert len(kept) + len(rejected) == len(candidates) + len(dup)
    summary = split_summary(kept, rejected)
    assert summary["found"] == summary["kept"] + summary["rejected"] == 15
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert "trans.txt" in reasons["20-300-0000"] and ":" in reasons["20-300-0009"]  # names the file (and line)
    assert "'24'" in reasons["20-300-0003"] and "trans.txt:3" in reasons["20-300-0003"]


def test_conversions_produce_16k_mono_copies(tmp_path):
    split = _tree(tmp_path)
    kept, _ = scan_split(split, Checks(max_duration=2.0), tmp_path / "converted", jobs=1)
    rows = {r["id"]: r for r in kept}
    for uid, what in (("20-300-0006", "resampled"), ("20-300-0007", "downmixed")):
        row = rows[uid]
        assert what in row["converted"] and row["source_filepath"].endswith(f"{uid}.flac")
        info = sf.info(row["audio_filepath"])
        assert info.samplerate == 16000 and info.channels == 1
        assert abs(row["duration"] - 0.5) < 0.01
    original = rows["19-198-0000"]
    assert Path(original["audio_filepath"]).is_absolute() and "converted" not in original
    assert set(original) == {"id", "audio_filepath", "duration", "text", "speaker", "chapter"}
    assert original["speaker"] == "19" and original["chapter"] == "198"


def test_conversions_can_be_refused(tmp_path):
    split = _tree(tmp_path)
    _, rejected = scan_split(split, Checks(max_duration=2.0, resample=False, downmix=False), tmp_path / "c", jobs=1)
    codes = _codes(rejected)
    assert codes["20-300-0006"] == "sample_rate" and codes["20-300-0007"] == "channels"


def test_parallel_scan_equals_serial(tmp_path):
    split = tmp_path / "LibriSpeech" / "train"
    for spk in range(3):
        write_chapter(
            split, str(100 + spk), "1", {f"{i:04d}": f"WORD NUMBER {'X' * (i % 4 + 1)}" for i in range(25)}, seconds=0.2
        )
    serial = scan_split(split, Checks(), tmp_path / "c1", jobs=1)
    parallel = scan_split(split, Checks(), tmp_path / "c2", jobs=2)
    assert serial == parallel and len(serial[0]) == 75


def _run_prepare(python, *args):
    return subprocess.run(
        [python, str(REPO / "pipelines" / "prepare.py"), *args], capture_output=True, text=True, cwd=REPO
    )


def test_prepare_cli_contract(tmp_path, python):
    split = tmp_path / "corpus" / "LibriSpeech" / "dev-clean"
    write_chapter(split, "19", "198", {"0000": "HELLO WORLD", "0001": "IT'S A TEST", "0002": "THIRD ONE"})
    write_flac(split / "19" / "198" / "19-198-0003.flac")  # no transcript line -> rejected, 75% kept
    out = tmp_path / "out"
    for root in (tmp_path / "corpus", tmp_path / "corpus" / "LibriSpeech"):  # the folder or its parent
        proc = _run_prepare(
            python,
            "data=librispeech",
            f"data.root={root}",
            "data.splits=[dev-clean]",
            f"data.out_dir={out}",
            "data.validate.min_kept_fraction=0.5",
        )
        assert proc.returncode == 0, proc.stderr
        rows = read_jsonl(out / "manifests" / "dev-clean.jsonl")
        assert [r["id"] for r in rows] == ["19-198-0000", "19-198-0001", "19-198-0002"]
        assert all(Path(r["audio_filepath"]).is_absolute() and r["duration"] > 0 for r in rows)
        rejected = read_jsonl(out / "manifests" / "dev-clean.rejected.jsonl")
        assert [(r["id"], r["code"]) for r in rejected] == [("19-198-0003", "no_transcript")]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["splits"]["dev-clean"]["kept"] == 3 and summary["splits"]["dev-clean"]["found"] == 4
        assert "dev-clean" in proc.stdout and "rejected" in proc.stdout


def test_prepare_fails_clearly_below_floor_and_on_empty_split(tmp_path, python):
    split = tmp_path / "LibriSpeech" / "dev-clean"
    write_chapter(split, "19", "198", {"0000": "HELLO", "0001": "bad text"})
    proc = _run_prepare(
        python,
        "data=librispeech",
        f"data.root={tmp_path}",
        "data.splits=[dev-clean]",
        f"data.out_dir={tmp_path / 'out'}",
    )
    assert proc.returncode == 1
    assert "dev-clean: kept 50.0% < data.validate.min_kept_fraction" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the manifests are still written, so the user can read the reasons
    assert read_jsonl(tmp_path / "out" / "manifests" / "dev-clean.rejected.jsonl")[0]["code"] == "charset"

    (tmp_path / "LibriSpeech" / "test-clean" / "1" / "2").mkdir(parents=True)
    proc = _run_prepare(
        python,
        "data=librispeech",
        f"data.root={tmp_path}",
        "data.splits=[test-clean]",
        f"data.out_dir={tmp_path / 'out2'}",
        "data.download=false",
    )
    assert proc.returncode == 1 and "test-clean: no usable utterances" in proc.stderr


def test_missing_subset_without_download_names_the_fix(tmp_path, python):
    proc = _run_prepare(
        python,
        "data=librispeech",
        f"data.root={tmp_path}",
        "data.splits=[dev-other]",
        f"data.out_dir={tmp_path / 'out'}",
        "data.download=false",
    )
    assert proc.returncode == 1 and "data.download=true" in proc.stderr and "Traceback" not in proc.stderr


def test_manifest_read_error_names_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a"}\nnot json\n')
    try:
        read_jsonl(path)
    except ValueError as e:
        assert f"{path}:2" in str(e)
    else:
        raise AssertionError("expected an error")
