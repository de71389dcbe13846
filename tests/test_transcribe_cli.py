"""`edgeconformer transcribe`: inputs (files, directories, manifests), output formats, scoring, bad input, exit
status and decoding defaults, on a tiny untrained model saved as a model folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgeconformer.cli import main
from tiny_asr import bursts, save_model_dir, tiny_module, write_audio

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every test on one torch thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    module = tiny_module("attention", root / "tok", decode={"method": "ctc_greedy", "beam": 3, "ctc_weight": 0.5})
    return save_model_dir(module, root / "model")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return [str(write_audio(root / f"{i}.flac", bursts(1.0 + 0.7 * i, seed=i))) for i in range(3)]


def run(capsys, *args):
    status = main(["transcribe", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def test_tsv_lines_by_default_and_jsonl_with_timing_and_words(model_dir, clips, capsys):
    status, lines, err = run(capsys, *clips, "--model", model_dir)
    assert status == 0 and err == ""
    assert [line.split("\t")[0] for line in lines] == clips and all(line.count("\t") == 1 for line in lines)

    status, rows, _ = run(capsys, *clips, "--model", model_dir, "--output-format", "jsonl")
    rows = [json.loads(r) for r in rows]
    assert status == 0 and [r["path"] for r in rows] == clips
    assert [r["transcript"] for r in rows] == [line.split("\t")[1] for line in lines]
    for r, seconds in zip(rows, (1.0, 1.7, 2.4)):
        assert r["duration"] == pytest.approx(seconds) and r["processing_seconds"] > 0
        assert r["rtf"] == pytest.approx(r["processing_seconds"] / r["duration"], abs=1e-5)
        assert r["sample_rate"] == 16000 and r["channels"] == 1
        assert " ".join(w["word"] for w in r["words"]) == r["transcript"]
        assert all(0 <= w["start"] < w["end"] <= seconds + 0.05 for w in r["words"])


def test_directories_recursively_and_manifests(model_dir, clips, tmp_path, capsys, monkeypatch):
    d = tmp_path / "recordings"
    write_audio(d / "b.wav", bursts(1.2, seed=7))
    write_audio(d / "sub" / "a.FLAC", bursts(1.5, seed=8))
    (d / "notes.txt").write_text("not audio")
    status, lines, err = run(capsys, d, "--model", model_dir)
    assert status == 0 and err == ""
    assert [line.split("\t")[0] for line in lines] == [str(d / "b.wav"), str(d / "sub" / "a.FLAC")]

    # a manifest in the prepare stage's format; relative paths are found next to the manifest
    monkeypatch.chdir(tmp_path)
    manifest = d / "m.jsonl"
    manifest.write_text(
        json.dumps({"id": "u1", "audio_filepath": "b.wav", "text": "SING UNTO THE LORD"})
        + "\n"
        + json.dumps({"id": "u2", "audio_filepath": clips[0], "duration": 1.0})
        + "\n"
        + json.dumps({"id": "u3", "audio_filepath": "gone.wav"})
        + "\n"
        + "{not json\n"
        + json.dumps({"id": "u5"})
        + "\n"
    )
    status, rows, err = run(capsys, manifest, "--model", model_dir, "--output-format", "jsonl")
    rows = [json.loads(r) for r in rows]
    assert status == 3 and [(r["id"], r["path"]) for r in rows[:2]] == [("u1", str(d / "b.wav")), ("u2", clips[0])]
    assert rows[0]["reference"] == "SING UNTO THE LORD" and "reference" not in rows[1]
    assert f"error: gone.wav: no such file (listed at {manifest}:3)" in err
    assert f"error: {manifest}:4: not a JSON object" in err
    assert f"error: {manifest}:5: no `audio_filepath` string in this row" in err


def test_score_prints_wer_cer_and_per_utterance_rows(model_dir, clips, tmp_path, capsys):
    from edgeconformer.scoring import score

    manifest = tmp_path / "test.jsonl"
    refs = ["SING UNTO THE LORD", "ALL THE EARTH", "LET THERE BE LIGHT"]
    manifest.write_text(
        "".join(
            json.dumps({"id": f"u{i}", "audio_filepath": c, "text": t}) + "\n"
            for i, (c, t) in enumerate(zip(clips, refs))
        )
    )
    status, lines, err = run(capsys, manifest, "--model", model_dir, "--score")
    hyps = [line.split("\t")[1] for line in lines]
    expected = score(refs, hyps, ["u0", "u1", "u2"])
    report = [line for line in err.splitlines() if line.startswith("score: ")]
    assert status == 0 and len(report) == 1 + 3 + 1
    assert report[1].split("\t")[:4] == [
        "score: u0",
        f"{expected['utterances'][0]['wer']:.1f}",
        str(expected["utterances"][0]["errors"]),
        "4",
    ]
    assert f"WER {expected['wer']:.2f}%" in report[-1] and f"CER {expected['cer']:.2f}%" in report[-1]

    status, rows, err = run(capsys, manifest, "--model", model_dir, "--score", "--output-format", "jsonl")
    rows = [json.loads(r) for r in rows]
    assert [r["wer"] for r in rows] == [round(u["wer"], 2) for u in expected["utterances"]]
    assert f"WER {expected['wer']:.2f}%" in err

    status, _, err = run(capsys, *clips, "--model", model_dir, "--score")
    assert status == 1 and "--score needs reference texts" in err


def test_bad_inputs_are_named_and_the_others_transcribed(model_dir, clips, tmp_path, capsys):
    bad = {
        "missing": tmp_path / "missing.flac",
        "empty_dir": tmp_path / "empty",
        "garbage": tmp_path / "garbage.wav",
        "no_samples": tmp_path / "no_samples.wav",
        "nan": tmp_path / "nan.wav",
        "too_short": tmp_path / "short.wav",
    }
    bad["empty_dir"].mkdir()
    (bad["empty_dir"] / "readme.txt").write_text("no audio here")
    bad["garbage"].write_bytes(b"RIFF not really a wave file")
    sf.write(bad["no_samples"], np.zeros(0, dtype=np.float32), 16000)
    x = bursts(2.0)
    x[5000:5003] = [np.nan, np.inf, 0.0]
    write_audio(bad["nan"], x, subtype="FLOAT")
    write_audio(bad["too_short"], bursts(0.05))
    silent = write_audio(tmp_path / "silent.wav", np.zeros(32000, dtype=np.float32))
    odd = write_audio(
        tmp_path / "odd.wav", np.stack([bursts(2.0, sr=8000), bursts(2.0, sr=8000, seed=3)], 1), sr=8000
    )  # 8 kHz stereo: resampled and downmixed
    inputs = [clips[0], *bad.values(), silent, odd, clips[1]]
    status, lines, err = run(capsys, *inputs, "--model", model_dir, "--no-progress")
    assert status == len(bad)
    assert [line.split("\t")[0] for line in lines] == [clips[0], str(silent), str(odd), clips[1]]
    assert lines[1].startswith(f"{silent}\t")  # an untrained model may "hear" something in silence
    messages = {
        "missing": f"error: {bad['missing']}: no such file or directory",
        "empty_dir": f"error: {bad['empty_dir']}: directory holds no audio files",
        "garbage": f"error: {bad['garbage']}: cannot read audio",
        "no_samples": f"error: {bad['no_samples']}: empty audio file",
        "nan": f"error: {bad['nan']}: non-finite samples (NaN or Inf), the first at 0.312 s",
        "too_short": f"error: {bad['too_short']}: audio too short to transcribe (0.050 s",
    }
    for key, message in messages.items():
        assert message in err, key
    assert f"warning: {silent}: the audio is silent" in err
    assert f"error: {len(bad)} of {len(inputs)} inputs failed" in err and "Traceback" not in err

    status, rows, _ = run(capsys, bad["nan"], clips[0], "--model", model_dir, "--output-format", "jsonl")
    rows = [json.loads(r) for r in rows]
    assert status == 1 and rows[0]["error"].startswith(f"{bad['nan']}: non-finite") and "transcript" in rows[1]


def test_exit_status_counts_failures_from_the_console_script(model_dir, clips, tmp_path):
    exe = Path(sys.executable).parent / "edgeconformer"
    proc = subprocess.run(
        [str(exe), "transcribe", clips[0], str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--model", str(model_dir)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout.startswith(clips[0] + "\t")
    assert "Traceback" not in proc.stderr and f"{tmp_path / 'b.wav'}: no such file" in proc.stderr


def test_decoding_defaults_come_from_the_model_config(model_dir, clips, capsys, monkeypatch, tmp_path):
    import edgeconformer.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_transcribe", lambda module, inputs, settings, **kw: seen.append(settings) or 0)
    other = save_model_dir(
        tiny_module("attention", tmp_path / "tok", decode={"method": "joint", "beam": 5, "ctc_weight": 0.7}),
        tmp_path / "m",
    )
    main(["transcribe", clips[0], "--model", str(other)])
    main(["transcribe", clips[0], "--model", str(other), "--method", "rescoring", "--beam", "2", "--ctc-weight", "0.1"])
    main(["transcribe", clips[0], "--model", str(model_dir)])
    assert [(s.method, s.beam, s.ctc_weight) for s in seen] == [
        ("joint", 5, 0.7),
        ("rescoring", 2, 0.1),
        ("ctc_greedy", 3, 0.5),
    ]


def test_progress_bar_for_more_than_a_few_files(model_dir, clips, capsys):
    _, _, err = run(capsys, *(clips * 2), "--model", model_dir)
    assert "6/6" in err and "file" in err
    _, _, err = run(capsys, *(clips * 2), "--model", model_dir, "--no-progress")
    assert err == ""
    _, _, err = run(capsys, *clips, "--model", model_dir)
    assert err == ""


def test_long_recording_through_the_command(model_dir, tmp_path, capsys):
    path = tmp_path / "long.flac"
    with sf.SoundFile(path, "w", 44100, 2, subtype="PCM_16") as f:  # 44.1 kHz stereo, 70 s
        for k in range(7):
            f.write(np.stack([bursts(10.0, seed=k, sr=44100)] * 2, 1))
    status, rows, _ = run(
        capsys,
        path,
        "--model",
        model_dir,
        "--output-format",
        "jsonl",
        "--max-segment-seconds",
        "10",
        "--chunk-seconds",
        "4",
        "--context-seconds",
        "1",
    )
    (row,) = [json.loads(r) for r in rows]
    assert status == 0 and row["duration"] == pytest.approx(70.0) and row["segments"] >= 7
    assert row["sample_rate"] == 44100 and row["channels"] == 2
    assert row["words"][-1]["end"] <= 70.05
