"""The metrics schema (edgeconformer.metrics): the committed metrics read back byte-identical through the records,
the validation names the file, the key and the fix, and the derived tables agree with the fields."""

import json
from pathlib import Path

import pytest

from edgeconformer.files import write_json_atomic
from edgeconformer.metrics import (
    ABSENT,
    HEADLINE,
    OPTIONAL,
    SCHEMA,
    WANDB_KEYS,
    AttentionState,
    DeviceEstimate,
    Machine,
    MetricsError,
    RunMetrics,
    VariantMetrics,
    problems,
    wandb_summary,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p for p in (REPO / "metrics").glob("*.json") if p.name != "comparisons.json")
FIXTURES = sorted((REPO / "tests" / "fixtures" / "metrics").glob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_variant_metrics_round_trip_byte_identical(path, tmp_path):
    d = json.loads(path.read_text(encoding="utf-8"))
    record = VariantMetrics.from_dict(d, source=str(path))
    assert record.to_dict() == d and list(record.to_dict()) == list(d)
    assert all(isinstance(s, RunMetrics) and isinstance(s.machine, Machine) for s in record.seeds)
    assert all(isinstance(e, DeviceEstimate) for s in record.seeds for e in s.device_estimates.values())
    assert all(s.extra == {} for s in record.seeds) and record.extra == {}  # the schema knows every key
    # written as the compare stage writes it: the same bytes
    out = write_json_atomic(tmp_path / path.name, record.to_dict())
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_old_run_files_round_trip_with_their_extra_keys(path):
    d = json.loads(path.read_text(encoding="utf-8"))
    record = RunMetrics.from_dict(d, source=str(path))
    assert list(record.to_dict()) == list(d) and record.to_dict() == d
    assert record.seed is ABSENT and record.gflops_per_audio_second_streamed is ABSENT  # not in the file
    assert record.wer_coreml is None  # in the file, null
    assert set(record.extra) == {"_fixture"}


def test_a_run_record_built_from_fields_writes_the_evaluate_layout():
    d = json.loads(FIXTURES[0].read_text())
    record = RunMetrics.parse(d)
    rebuilt = RunMetrics(
        **{f: getattr(record, f) for f in ("variant", "wer_fp32", "machine")},
        seed=3,
        stabilization_arms={"acc16_none": 40.0, "acc16_both": 35.0},
        split="test",
    )
    assert rebuilt.to_dict() == {
        "variant": d["variant"],
        "seed": 3,
        "wer_fp32": d["wer_fp32"],
        "split": "test",
        "wer_acc16_none": 40.0,
        "wer_acc16_both": 35.0,
        "machine": d["machine"],
    }
    assert rebuilt.arm_wers() == {"wer_acc16_none": 40.0, "wer_acc16_both": 35.0}
    assert rebuilt.get("wer_coreml", "n/a") == "n/a" and rebuilt.get("seed") == 3


def test_nested_parts_parse_into_records_or_stay_as_written():
    state = {"seconds": 10.0, "attention": 51200, "positions": 0, "conv": 26880}
    record = RunMetrics.parse({"attention_state_bytes": state})
    assert isinstance(record.attention_state_bytes, AttentionState)
    assert record.attention_state_bytes.per_block is ABSENT and record.to_dict() == {"attention_state_bytes": state}
    assert RunMetrics.parse({"attention_state_bytes": 51200}).attention_state_bytes == 51200  # problems() says so


def test_from_dict_names_the_file_the_key_and_the_fix():
    d = json.loads(FIXTURES[0].read_text())
    del d["wer_fp32"]
    d.update(seed=2, rtf_cpu=None)
    with pytest.raises(MetricsError) as e:
        RunMetrics.from_dict(d, source="reports/runs/dws/s2/evaluation.json")
    message = str(e.value)
    assert message.startswith("reports/runs/dws/s2/evaluation.json: not a valid run record")
    assert "missing key 'wer_fp32'" in message and "rtf_cpu is null" in message
    assert "dvc repro evaluate@dws-s2" in message
    variant = {"variant": "dws", "seeds": [dict(d, seed=1)]}
    with pytest.raises(MetricsError, match=r"metrics/dws.json: not a valid variant record:\n  - seed 1: missing key"):
        VariantMetrics.from_dict(variant, source="metrics/dws.json")
    with pytest.raises(MetricsError, match="'seeds' must be a non-empty list"):
        VariantMetrics.from_dict({"variant": "dws"}, source="metrics/dws.json")
    with pytest.raises(MetricsError, match="must be a JSON object"):
        RunMetrics.from_dict([1], source="x.json")


def test_the_derived_tables_follow_the_fields():
    names = [f.name for f in RunMetrics.schema_fields()]
    assert list(SCHEMA) == [n for n in names if n in SCHEMA]  # file order
    assert set(OPTIONAL) <= set(names) and set(OPTIONAL).isdisjoint(SCHEMA)
    assert set(WANDB_KEYS) <= set(SCHEMA)
    variant_fields = {f.name for f in VariantMetrics.schema_fields()}
    assert {f"{k}_{s}" for k in HEADLINE for s in ("mean", "sd")} <= variant_fields
    for path in COMMITTED:
        for s in json.loads(path.read_text())["seeds"]:
            assert problems(s) == []


def test_wandb_summary_flattens_the_nested_figures():
    d = {
        "wer_fp32": 30.0,
        "wer_fp16": 30.5,
        "wer_coreml_sim": None,
        "flops_shares": {"mhsa": 0.3},
        "attention_state_bytes": {"attention": 5, "positions": 0, "conv": 2.5},
        "machine": {"cpu": "x"},
        "variant": "dws",
        "flag": True,
    }
    assert wandb_summary(d) == {
        "wer_fp32": 30.0,
        "wer_fp16": 30.5,
        "flops_share/mhsa": 0.3,
        "attention_state_bytes/attention": 5,
        "attention_state_bytes/positions": 0,
        "delta/wer_fp16": 0.5,
    }


def test_get_reads_a_key_of_the_file_like_a_dict():
    d = json.loads(COMMITTED[0].read_text())["seeds"][0]
    record = RunMetrics.parse(dict(d, _note="x"))
    for name in ("wer_fp32", "wer_acc16_none", "wer_coreml", "_note", "wer_acc16_missing", "nope", "extra"):
        assert record.get(name, "default") == (dict(d, _note="x").get(name) or "default"), name
