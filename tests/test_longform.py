"""Long-form transcription (edgeconformer.longform, transcribe_io): exact window stitching, pause cuts, equality with
whole-input decoding where segmentation cannot matter, batching, streaming audio reading, bounded memory, and the
WER bound on a 20-minute recording (with a trained model, when one is present)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO
from edgeconformer.longform import (
    Geometry,
    Settings,
    ctc_align,
    find_cut,
    transcribe_batch,
    transcribe_items,
    transcribe_long,
    windowed_frames,
)
from edgeconformer.transcribe_io import AudioError, Item, ReadStats, StreamResampler, read_audio, read_blocks
from tiny_asr import bursts, save_model_dir, tiny_module, write_audio

METHODS = ("ctc_greedy", "ctc_beam", "attention", "joint", "rescoring")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every test on one torch thread


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {kind: tiny_module(kind, root / kind) for kind in ("attention", "conv", "cascade")}


def blocks_of(x: torch.Tensor, n: int = 12345):
    return [x[i : i + n] for i in range(0, x.numel(), n)]


def whole(module, x, **kw):
    return module.transcribe(x[None], torch.tensor([x.numel()]), **kw)[0]


# ------------------------------------------------------------------------------------------------ audio reading
@pytest.mark.parametrize("orig", [8000, 22050, 44100, 48000])
def test_stream_resampler_equals_resampling_the_whole_signal(orig):
    x = torch.randn(orig * 2 + 77, dtype=torch.float64)
    r = StreamResampler(orig, 16000)
    r.resample = r.resample.double()
    r.buf = r.buf.double()
    whole_signal = r.resample(x)
    y = torch.cat([r.push(b) for b in blocks_of(x, 3001)] + [r.push(x[:0], final=True)])
    assert y.shape == whole_signal.shape
    torch.testing.assert_close(y, whole_signal, rtol=0, atol=1e-12)
    assert r.buf.numel() < 2 * (r.width + r.orig_step)  # only the filter's context is held


def test_read_blocks_downmixes_and_resamples_like_reading_whole(tmp_path):
    from edgeconformer.cli import read_any_audio

    x = np.stack([bursts(7.0, seed=1, sr=44100), bursts(7.0, seed=2, sr=44100)], axis=1)
    path = str(write_audio(tmp_path / "stereo.wav", x, sr=44100, subtype="FLOAT"))
    stats = ReadStats()
    blocks = list(read_blocks(path, 16000, stats, block_seconds=1.3))
    assert len(blocks) > 3 and stats.info.channels == 2 and stats.info.sample_rate == 44100
    got = torch.cat(blocks)
    torch.testing.assert_close(got, read_any_audio(path), rtol=0, atol=2e-4)  # float32 kernels, summed differently
    assert stats.samples == got.numel() == int(np.ceil(x.shape[0] * 16000 / 44100))


def test_non_finite_samples_are_an_error_naming_file_and_time(tmp_path):
    x = bursts(3.0)
    x[int(2.5 * 16000)] = np.nan
    path = str(write_audio(tmp_path / "nan.wav", x, subtype="FLOAT"))
    with pytest.raises(AudioError, match=r"nan\.wav: non-finite samples \(NaN or Inf\), the first at 2\.500 s"):
        read_audio(path)


# ------------------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("factor", [4, 8])
def test_windows_tile_the_input_exactly(tmp_path, factor):
    # A convolution-only encoder reads a bounded stretch of input, so with enough context every stitched frame
    # equals the whole-input frame: this checks the sample / frame bookkeeping of the windows and their ends.
    from omegaconf import OmegaConf

    from edgeconformer.config import compose
    from edgeconformer.data.tokenizer import Tokenizer, train_tokenizer
    from edgeconformer.longform import encode
    from edgeconformer.models.lightning import ASRModule
    from tiny_asr import KINDS, TINY

    cfg = compose([*TINY, *KINDS["conv"], f"model.subsampling_factor={factor}"])
    tok = Tokenizer(train_tokenizer(["A B C"] * 4, tmp_path, vocab_size=8))
    torch.manual_seed(0)
    module = ASRModule(OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.train), tok.vocab_size).eval()
    s = Settings(chunk_seconds=1.0, context_seconds=0.6)
    g = Geometry.of(module, s)
    for seconds in (0.09, 2.93, 6.01, 7.777):
        x = torch.from_numpy(bursts(seconds, seed=3))
        with torch.inference_mode():
            parts = list(windowed_frames(module, blocks_of(x, 7001), g))
            if g.encoder_frames(x.numel()) == 0:  # too short for one frame: nothing, and no error
                assert parts == []
                continue
            _, lp, _ = encode(module, x[None], torch.tensor([x.numel()]))
        stitched = torch.cat([p[1] for p in parts])
        assert stitched.shape == lp[0].shape == (g.encoder_frames(x.numel()), tok.vocab_size)
        torch.testing.assert_close(stitched, lp[0], rtol=0, atol=1e-5)


def test_long_input_equals_whole_input_when_segmentation_cannot_matter(models):
    # conv model (bounded receptive field) + greedy CTC (cuts fall in blank runs): long-form == whole input, token
    # for token; the text only differs by the word boundaries that pauses add
    from edgeconformer.decoding import ctc_greedy
    from edgeconformer.longform import encode

    module = models["conv"]
    x = torch.from_numpy(bursts(75.0, seed=4))
    s = Settings(chunk_seconds=3.0, context_seconds=1.0, max_segment_seconds=8.0, timestamps=True)
    t = transcribe_long(module, blocks_of(x, 16000 * 5 + 1), s)
    with torch.inference_mode():
        _, lp, _ = encode(module, x[None], torch.tensor([x.numel()]))
    assert t.segments > 5 and t.ids == ctc_greedy(lp[0])
    assert t.text.replace(" ", "") == whole(module, x).replace(" ", "")
    assert t.seconds == pytest.approx(75.0)
    starts = [w["start"] for w in t.words]
    assert starts == sorted(starts) and all(w["start"] < w["end"] for w in t.words)
    assert " ".join(w["word"] for w in t.words) == t.text  # words cut across segments are joined back


@pytest.mark.parametrize(
    "kind,first_pass", [("attention", False), ("conv", False), ("cascade", False), ("cascade", True)]
)
def test_utterance_sized_input_is_decoded_exactly_as_transcribe(models, kind, first_pass):
    module = models[kind]
    x = torch.from_numpy(bursts(4.0, seed=5))
    methods = ("ctc_greedy", "ctc_beam") if first_pass else METHODS
    for method in methods:
        s = Settings(method=method, beam=3, ctc_weight=0.4, first_pass=first_pass, timestamps=True)
        expected = whole(module, x, method=method, beam=3, ctc_weight=0.4, first_pass=first_pass)
        assert transcribe_long(module, [x], s).text == expected, method
        assert transcribe_batch(module, [torch.zeros(9000), x], s)[1].text == expected, method


@pytest.mark.parametrize("method", ["ctc_beam", "joint"])
def test_every_method_decodes_long_inputs(models, method):
    module = models["attention"]
    x = torch.from_numpy(bursts(50.0, seed=6))
    t = transcribe_long(
        module,
        blocks_of(x),
        Settings(method=method, beam=2, max_segment_seconds=10.0, min_segment_seconds=3.0, timestamps=True),
    )
    assert t.segments >= 5 and t.seconds == pytest.approx(50.0)
    assert t.words and t.words[-1]["end"] <= 50.0 + 0.04


def test_streaming_model_windows_start_on_its_chunk_grid(models):
    g = Geometry.of(models["cascade"], Settings(chunk_seconds=1.0, context_seconds=0.5))
    assert models["cascade"].model.encoder.chunk_size == 4
    assert g.chunk % 4 == 0 and g.left % 4 == 0


def test_batching_changes_no_transcript(models, tmp_path):
    module = models["attention"]
    items = [Item(str(write_audio(tmp_path / f"{i}.flac", bursts(0.5 + 1.7 * i % 9, seed=i)))) for i in range(11)]
    for method in ("ctc_greedy", "rescoring"):  # rescoring: the attention decoder reads the padded batch too
        s = Settings(method=method, beam=2)
        one = [o.transcript.text for o in transcribe_items(module, items, s, batch_size=1)]
        many = [o.transcript.text for o in transcribe_items(module, items, s, batch_size=4)]
        assert many == one and len(set(one)) > 5


# ------------------------------------------------------------------------------------------------ cuts, alignment
def fake_log_probs(path: list[int], V: int = 5) -> torch.Tensor:
    lp = torch.full((len(path), V), -10.0)
    lp[torch.arange(len(path)), torch.tensor(path)] = -0.001  # P > 0.99: blanks are confident
    return lp


def test_cuts_fall_in_pauses_after_the_minimum_length():
    g = Geometry(
        hop=160,
        win=400,
        factor=4,
        receptive=7,
        sample_rate=16000,
        chunk=10,
        left=2,
        right=2,
        max_segment=40,
        min_segment=10,
        pause=4,
    )
    # a pause of 6 blanks at 3..8 (too early), another at 14..19: cut in its middle, a word boundary
    path = [1, 2, 3] + [0] * 6 + [1, 2, 3, 1, 2] + [0] * 6 + [3] * 5
    assert find_cut(fake_log_probs(path), g, final=False) == (17, True)
    # no pause yet and shorter than max_segment: wait; at the end of the input, take everything
    assert find_cut(fake_log_probs([1, 2] * 10), g, final=False) is None
    assert find_cut(fake_log_probs([1, 2] * 10), g, final=True) == (20, False)
    # no pause within max_segment: the longest blank run
    path = ([1, 0, 2] * 5 + [1, 0, 0, 2]) * 3
    cut, pause = find_cut(fake_log_probs(path), g, final=False)
    assert 10 <= cut <= 40 and path[cut] == 0 and path[cut - 1] == 0 and not pause
    # a pause beyond max_segment does not make a longer segment
    path = [1, 2, 3] * 15 + [0] * 6 + [1]
    cut, pause = find_cut(fake_log_probs(path), g, final=False)
    assert cut <= 40 and not pause
    # no blank at all: where the label changes, so that no token is split in two
    path = [1, 1, 1, 2, 2, 2, 2] * 7
    cut, _ = find_cut(fake_log_probs(path), g, final=False)
    assert 20 <= cut < 40 and path[cut] != path[cut - 1]


def test_ctc_alignment_finds_token_spans():
    path = [0, 3, 3, 0, 0, 4, 0, 4, 4, 0]  # tokens 3, 4, 4 (a repeat needs a blank in between)
    assert ctc_align(fake_log_probs(path).double().numpy(), [3, 4, 4]) == [(1, 2), (5, 5), (7, 8)]
    assert ctc_align(fake_log_probs([0, 3]).double().numpy(), [3, 3, 3]) is None  # too few frames


# ------------------------------------------------------------------------------------------------ memory
MEASURE = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from edgeconformer.cli import load_trained
from edgeconformer.longform import Settings, transcribe_items
from edgeconformer.transcribe_io import expand_inputs
module = load_trained(sys.argv[1])
whole = sys.argv[3] == "whole"
s = Settings(max_segment_seconds=1e9 if whole else 20.0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
(o,) = transcribe_items(module, expand_inputs([sys.argv[2]]), s)
assert o.error is None, o.error
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024, "seconds": time.perf_counter() - t0}))
"""


def peak_memory(model_dir, audio, mode) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), str(audio), mode], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_memory_stays_flat_as_the_length_doubles(models, tmp_path):
    # Peak RSS of a fresh process per length and mode. Whole-input decoding is the control: its full attention
    # grows with the square of the length, so the measurement does see growth.
    model_dir = save_model_dir(models["attention"], tmp_path / "model")
    files = {}
    for minutes in (2, 4):
        path = tmp_path / f"{minutes}min.flac"
        with sf.SoundFile(path, "w", 16000, 1, subtype="PCM_16") as f:
            for k in range(minutes * 2):
                f.write(bursts(30.0, seed=k))
        files[minutes] = path
    peak = {
        (m, mode): peak_memory(model_dir, files[m], mode)["peak_mb"] for m in files for mode in ("longform", "whole")
    }
    print(peak)
    assert peak[4, "whole"] - peak[2, "whole"] > 150  # the control grows
    assert peak[4, "longform"] - peak[2, "longform"] < 15  # long-form does not


# ------------------------------------------------------------------------------------------------ real model
def trained_model_and_manifest():
    """A trained model and its test manifest: $EDGECONFORMER_TEST_MODEL / $EDGECONFORMER_TEST_MANIFEST, else
    models/dws and data/prepared/manifests/test.jsonl of this checkout (after `dvc repro`)."""
    model = Path(os.environ.get("EDGECONFORMER_TEST_MODEL", REPO / "models" / "dws"))
    manifest = Path(
        os.environ.get("EDGECONFORMER_TEST_MANIFEST", REPO / "data" / "prepared" / "manifests" / "test.jsonl")
    )
    if not manifest.is_file() or not (any(model.glob("*.ckpt")) or any(model.glob("s*/best.ckpt"))):
        pytest.skip(
            f"needs a trained model ({model}) and its test manifest ({manifest}): run `dvc repro` or set "
            "EDGECONFORMER_TEST_MODEL and EDGECONFORMER_TEST_MANIFEST"
        )
    return model, manifest


def build_recording(rows: list[dict], path: Path, minutes: float, gap: float = 0.4) -> tuple[str, int]:
    """Test utterances one after another (cycling through them), `gap` seconds of silence between them, written
    block by block; returns the reference transcript and the number of utterances used."""
    texts, seconds = [], 0.0
    with sf.SoundFile(path, "w", 16000, 1, subtype="PCM_16") as f:
        k = 0
        while seconds < minutes * 60:
            row = rows[k % len(rows)]
            x, sr = sf.read(row["audio_filepath"], dtype="float32")
            assert sr == 16000
            f.write(np.concatenate([x, np.zeros(int(gap * sr), dtype=np.float32)]))
            texts.append(row["text"])
            seconds += x.size / sr + gap
            k += 1
    return " ".join(texts), k


@pytest.mark.slow
def test_wer_of_a_20_minute_recording_is_within_a_point_of_utterance_decoding(tmp_path):
    # greedy CTC, the models' default (docs/transcribe.md: dws seed 2 +0.88 points, vanilla seed 3 +0.47)
    from edgeconformer.cli import load_trained
    from edgeconformer.files import read_jsonl
    from edgeconformer.longform import decoding_defaults
    from edgeconformer.scoring import score

    model_dir, manifest = trained_model_and_manifest()
    module = load_trained(model_dir)
    torch.set_num_threads(2)
    rows = read_jsonl(manifest)
    reference, n = build_recording(rows, tmp_path / "long.flac", minutes=20)
    s = Settings(**{**decoding_defaults(module), "method": "ctc_greedy"})
    used = [Item(rows[k % len(rows)]["audio_filepath"], reference=rows[k % len(rows)]["text"]) for k in range(n)]
    one_by_one = [o.transcript.text for o in transcribe_items(module, used, s)]
    wer_utterances = score([" ".join(i.reference for i in used)], [" ".join(one_by_one)], ["all"])["wer"]
    (long,) = transcribe_items(module, [Item(str(tmp_path / "long.flac"))], s)
    wer_long = score([reference], [long.transcript.text], ["all"])["wer"]
    print(f"WER one by one {wer_utterances:.2f}%, 20-minute recording {wer_long:.2f}%")
    assert long.transcript.seconds > 20 * 60 and wer_long <= wer_utterances + 1.0


def test_benchmark_script_smoke(models, tmp_path, capsys):
    # benchmarks/bench_longform.py on the tiny model: both parts run and report their ratios (no timing claims)
    import importlib.util

    from edgeconformer.files import write_jsonl_atomic

    spec = importlib.util.spec_from_file_location("bench_longform", REPO / "benchmarks" / "bench_longform.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_dir = save_model_dir(models["attention"], tmp_path / "model")
    rows = [
        {
            "id": f"u{i}",
            "audio_filepath": str(write_audio(tmp_path / f"u{i}.flac", bursts(2.0, seed=i))),
            "duration": 2.0,
            "text": "AND GOD SAID",
        }
        for i in range(4)
    ]
    write_jsonl_atomic(tmp_path / "test.jsonl", rows)
    report = bench.main(
        [
            "--model",
            str(model_dir),
            "--manifest",
            str(tmp_path / "test.jsonl"),
            "--minutes",
            "0.5",
            "--short-utterances",
            "2",
            "--wer-minutes",
            "0.4",
            "--group-minutes",
            "0.2",
            "--configs",
            "8:2,2:0.5",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads((tmp_path / "r.json").read_text())
    (length,) = report["memory"]["lengths"]
    assert length["minutes"] == 0.5 and length["rtf_ratio"] > 0 and length["peak_rss_mb"] > 0
    assert [r["chunk_seconds"] for r in report["wer"]["longform"]] == [8.0, 2.0]
    rows = {"utterances", "whole", "longform", "chunked_8_left-1", "chunked_8_left16"}
    assert rows <= set(report["wer"]["groups"])
