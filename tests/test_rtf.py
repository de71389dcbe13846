import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeconformer.artifacts import resolve_model_dir
from edgeconformer.evaluate.rtf import machine_info, measure_rtf, percentile, pick_by_duration

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A deterministic clock: the timed function advances it by the compute time it pretends to take."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def fake_fn(clock, cost):
    # cost(call_index, x) -> seconds this call "takes"; calls are recorded.
    calls = []

    def fn(x):
        clock.t += cost(len(calls), x)
        calls.append(x)

    return fn, calls


def test_known_rtf_is_recovered_and_warmup_is_not_timed():
    clock = FakeClock()
    warmup, repeats, rtf = 2, 3, 0.25
    inputs = [(1.0, 1.0), (2.5, 2.5), (4.0, 4.0)]  # x is the audio length itself
    # Warm-up calls are 1000x slower: if any were timed the RTF would be far off.
    fn, calls = fake_fn(clock, lambda i, x: rtf * x * (1000 if i < warmup else 1))
    result = measure_rtf(fn, inputs, warmup=warmup, repeats=repeats, threads=1, clock=clock)
    assert len(calls) == warmup + repeats * len(inputs)
    assert calls[:warmup] == [1.0, 2.5]  # warm-up cycles over the inputs
    assert result["rtf"] == result["rtf_median"] == pytest.approx(rtf)
    assert result["rtf_p90"] == pytest.approx(rtf) and result["rtf_total"] == pytest.approx(rtf)
    assert result["audio_seconds"] == pytest.approx(7.5)
    assert (result["audio_seconds_min"], result["audio_seconds_median"], result["audio_seconds_max"]) == (1.0, 2.5, 4.0)
    assert [len(r["runs"]) for r in result["utterances"]] == [repeats] * 3
    assert result["utterances"][1]["compute_seconds"] == pytest.approx(rtf * 2.5)
    assert (result["warmup"], result["repeats"], result["threads"], result["n_utterances"]) == (2, 3, 1, 3)


def test_compute_time_is_the_median_of_repeats_and_statistics_are_over_utterances():
    clock = FakeClock()
    per_utt = [0.1, 0.3, 0.2, 0.9, 0.5]
    seconds = [1.0, 2.0, 1.5, 3.0, 0.5]
    repeats = 3

    def cost(i, x):
        k, rep = divmod(i, repeats)
        base = per_utt[k] * seconds[k]
        return base * 5 if rep == 1 else base  # one outlier per utterance: the median ignores it

    fn, _ = fake_fn(clock, cost)
    result = measure_rtf(fn, [(k, s) for k, s in enumerate(seconds)], warmup=0, repeats=repeats, clock=clock)
    assert [r["rtf"] for r in result["utterances"]] == pytest.approx(per_utt)
    assert result["rtf_median"] == pytest.approx(statistics.median(per_utt))
    assert result["rtf_p90"] == pytest.approx(float(np.percentile(per_utt, 90)))
    assert result["rtf_total"] == pytest.approx(sum(r * s for r, s in zip(per_utt, seconds)) / sum(seconds))


def test_real_sleep_with_the_default_clock():
    rtf = 0.05
    result = measure_rtf(lambda x: time.sleep(rtf * x), [(1.0, 1.0)], warmup=1, repeats=3)
    assert rtf <= result["rtf"] < 1.5 * rtf  # sleep never returns early; overshoot is small


def test_thread_count_is_set_recorded_and_restored():
    before = torch.get_num_threads()
    target = 2 if before != 2 else 1
    seen = []
    result = measure_rtf(
        lambda x: seen.append(torch.get_num_threads()),
        [(0, 1.0)],
        warmup=1,
        repeats=2,
        threads=target,
        clock=FakeClock(),
    )
    assert seen == [target] * 3
    assert result["machine"]["torch_threads"] == target and result["threads"] == target
    assert f"torch threads = {target}" in result["protocol"]
    assert torch.get_num_threads() == before

    def boom(x):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        measure_rtf(boom, [(0, 1.0)], threads=target)
    assert torch.get_num_threads() == before  # restored on error too


def test_machine_facts():
    info = machine_info(3)
    assert info["torch_threads"] == 3 and info["torch_version"] == torch.__version__
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert info["cpu_count"] >= 1 and 1 <= info["cpus_available"] <= info["cpu_count"]
    assert info["python_version"].count(".") == 2 and info["platform"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"inputs": []}, "at least one"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"repeats": 0}, "repeats >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"inputs": [(0, 0.0)]}, "input 0: audio length must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"fn": lambda x: None, "inputs": [(0, 1.0)], **kwargs}
    with pytest.raises(ValueError, match=match):
        measure_rtf(**args)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=20), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)


def test_pick_by_duration_spreads_over_lengths_deterministically():
    rows = [{"id": f"u{i}", "duration": float(d)} for i, d in enumerate([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])]
    picked = pick_by_duration(rows, 4)
    assert [r["duration"] for r in picked] == [1.0, 4.0, 7.0, 10.0]  # ranks 0, 3, 6, 9 of 10
    assert pick_by_duration(list(reversed(rows)), 4) == picked  # independent of manifest order
    assert [r["duration"] for r in pick_by_duration(rows, 1)] == [5.0]
    assert len(pick_by_duration(rows, 50)) == 10
    with pytest.raises(ValueError):
        pick_by_duration(rows, 0)


@pytest.mark.skipif(
    not (resolve_model_dir(REPO / "models/dws") / "best.ckpt").exists()
    or not (REPO / "data/prepared/manifests/test.jsonl").exists(),
    reason="needs the trained models/dws checkpoint and the prepared test split (dvc repro)",
)
def test_cli_measures_a_trained_model(capsys, monkeypatch):
    from edgeconformer.evaluate.rtf import main

    monkeypatch.chdir(REPO)
    assert main(["--model", "models/dws", "--utterances", "2", "--warmup", "1", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_utterances"] == 2 and 0 < result["rtf"] < 10
    assert all(r["id"] and r["audio_seconds"] > 0 for r in result["utterances"])


class RecordingModule:
    """Stands in for an ASRModule: records how transcribe is called."""

    def __init__(self):
        self.calls = []

    def transcribe(self, audio, audio_lengths, method="ctc_greedy", first_pass=False):
        self.calls.append(
            {
                "shape": tuple(audio.shape),
                "lengths": audio_lengths.tolist(),
                "method": method,
                "first_pass": first_pass,
                "inference": torch.is_inference_mode_enabled(),
            }
        )
        return ["FIRST" if first_pass else "SECOND"]


def test_recognizer_fn_transcribes_one_utterance_and_passes_first_pass_through():
    from edgeconformer.evaluate.rtf import recognizer_fn

    module = RecordingModule()
    audio = torch.zeros(1600)
    assert recognizer_fn(module)(audio) == "SECOND"
    assert recognizer_fn(module, "ctc_beam", first_pass=True)(audio) == "FIRST"
    assert module.calls == [
        {"shape": (1, 1600), "lengths": [1600], "method": "ctc_greedy", "first_pass": False, "inference": True},
        {"shape": (1, 1600), "lengths": [1600], "method": "ctc_beam", "first_pass": True, "inference": True},
    ]
