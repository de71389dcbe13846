"""W&B for results: one run per evaluated job, offline by default; a W&B Report built from a sweep.

Offline runs land in ./wandb/offline-run-*; `wandb sync wandb/offline-run-*` uploads them once logged in
(`wandb login`). `create_report` then builds a Report over the sweep's group with the public reports API
(wandb-workspaces): WER vs FLOPs, FLOP share by module, RTF, FP16 deltas. `read_offline_run` reads a run file back
without the network (the file is a LevelDB-style log of protobuf records), which is how the tests check what a run
recorded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from edgeconformer.errors import UserError
from edgeconformer.metrics import WANDB_KEYS, wandb_summary

# Summary keys every evaluated job logs (metrics/<variant>.json keys), the panels' vocabulary: the schema's.
SUMMARY_KEYS = WANDB_KEYS


def log_job(
    metrics: dict,
    config: dict,
    *,
    project: str,
    entity: str | None,
    group: str | None,
    name: str,
    mode: str = "offline",
    job_type: str = "evaluate",
    save_dir: str = ".",
) -> str:
    """One W&B run holding a job's config and its metrics as summary (metrics.wandb_summary: the schema's keys, FLOP
    shares flattened to `flops_share/<part>`, the streaming state to `attention_state_bytes/<part>`, FP16 deltas
    `delta/<key>` added); finished before returning, so multirun jobs never share a run. Returns the run's local
    directory."""
    import wandb  # lazy: only W&B logging needs it (logger=csv does not), ~1 s to import

    os.environ.setdefault("WANDB_SILENT", "true")
    summary = wandb_summary(metrics)
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        name=name,
        job_type=job_type,
        config=config,
        mode=mode,
        dir=save_dir,
        reinit="finish_previous",
    )
    try:
        run.summary.update(summary)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def log_chain(
    summaries: dict,
    comparisons: list[dict],
    config: dict,
    *,
    project: str,
    entity: str | None,
    mode: str = "offline",
    save_dir: str = ".",
) -> list[str]:
    """The compare stage's W&B record: one run per seed (job_type "evaluate", named <variant>-s<seed>, grouped per
    variant like the training runs, so panels grouped by run group show mean and error bars over seeds) and one
    "compare" run whose summary holds every variant's mean/sd and every paired comparison
    (`compare/<a> - <b>/diff`, `/ci_lo`, `/ci_hi`, `/significant`: 1 when the CI excludes 0)."""
    dirs = []
    for variant, summary in summaries.items():
        for seed_metrics in summary["seeds"]:
            group = f"{seed_metrics.get('model', 'model')}-{variant}"
            dirs.append(
                log_job(
                    seed_metrics,
                    dict(config, variant=variant, seed=seed_metrics["seed"]),
                    project=project,
                    entity=entity,
                    group=group,
                    name=f"{variant}-s{seed_metrics['seed']}",
                    mode=mode,
                    save_dir=save_dir,
                )
            )
    headline = {
        f"{variant}/{k}": v
        for variant, summary in summaries.items()
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for c in comparisons:
        name = f"compare/{c['a']} - {c['b']}"
        headline.update(
            {
                f"{name}/diff": c["diff"],
                f"{name}/ci_lo": c["ci95"][0],
                f"{name}/ci_hi": c["ci95"][1],
                f"{name}/significant": int(not c["verdict"].startswith("not")),
            }
        )
    dirs.append(
        log_job(
            headline,
            config,
            project=project,
            entity=entity,
            group="comparisons",
            name="comparisons",
            mode=mode,
            job_type="compare",
            save_dir=save_dir,
        )
    )
    return dirs


def report_spec(project: str, entity: str | None, group: str | None, title: str | None = None):
    """The Report (not saved): a run set filtered to the sweep's group and its panels (paper 1: WER/FLOPs, FLOP
    share, RTF, FP16 deltas; paper 2: the streaming cost per job)."""
    import wandb_workspaces.reports.v2 as wr  # lazy: only building a W&B report needs it

    runset = wr.Runset(
        entity=entity or "", project=project, name=group or "all runs", filters=f"Group == '{group}'" if group else ""
    )
    panels = _ablation_panels(wr)
    # The DVC chain's evaluate runs grouped per variant: bars are means over seeds, error bars their sd.
    seeds = wr.Runset(
        entity=entity or "",
        project=project,
        name="per variant over seeds",
        filters="JobType == 'evaluate'",
        groupby=["group"],
    )
    over_seeds = _over_seeds_panels(wr)
    return wr.Report(
        project=project,
        entity=entity or "",
        title=title or f"edgeconformer: {group or project}",
        description="WER, FLOPs, RTF and FP16 stability per job of an edgeconformer sweep.",
        blocks=[
            wr.H1("Variants over seeds"),
            wr.P(
                "One run per seed, grouped per variant; the paired comparisons with their 95% "
                "CIs are in the summary of the run named 'comparisons' (metrics/comparisons.json)."
            ),
            wr.PanelGrid(runsets=[seeds], panels=over_seeds),
            wr.H1("Ablation results"),
            wr.P("One run per job; metrics as in metrics/<variant>.json."),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )


def _ablation_panels(wr) -> list:
    """One panel per result of a job (wr: the lazily imported wandb_workspaces.reports.v2): WER vs FLOPs, FLOP
    share, RTF, FP16 deltas, then the streaming cost."""
    return [
        wr.ScatterPlot(
            title="WER vs FLOPs", x=wr.SummaryMetric("gflops_per_audio_second"), y=wr.SummaryMetric("wer_fp32")
        ),
        wr.BarPlot(
            title="FLOP share by module", metrics=[wr.SummaryMetric("flops_subsampling_share")], orientation="v"
        ),
        wr.BarPlot(
            title="Real-time factor",
            metrics=[wr.SummaryMetric("rtf_cpu"), wr.SummaryMetric("rtf_device_estimate")],
            orientation="v",
        ),
        wr.BarPlot(
            title="FP16 WER deltas (points vs FP32)",
            metrics=[
                wr.SummaryMetric("delta/wer_fp16"),
                wr.SummaryMetric("delta/wer_fp16_unstabilized"),
                wr.SummaryMetric("delta/wer_coreml_sim"),
            ],
            orientation="v",
        ),
        wr.ScatterPlot(
            title="WER vs attention state per streaming step",
            x=wr.SummaryMetric("attention_state_bytes/attention"),
            y=wr.SummaryMetric("wer_fp32"),
        ),
        wr.BarPlot(
            title="Streamed part: GFLOPs per audio second",
            metrics=[wr.SummaryMetric("gflops_per_audio_second_streamed")],
            orientation="v",
        ),
    ]


def _over_seeds_panels(wr) -> list:
    """WER bars per variant run group (wr: the lazily imported wandb_workspaces.reports.v2): the mean over seeds,
    error bars the sd."""
    return [
        wr.BarPlot(
            title=f"{label} (mean over seeds, error bars: sd)",
            metrics=[wr.SummaryMetric(key)],
            orientation="v",
            groupby_aggfunc="mean",
            groupby_rangefunc="stddev",
        )
        for key, label in (
            ("wer_fp32", "WER FP32"),
            ("wer_fp16", "WER FP16"),
            ("wer_fp16_unstabilized", "WER FP16 unstabilized"),
        )
    ]


def create_report(project: str, entity: str | None, group: str | None, title: str | None = None) -> str:
    """Saves the Report to W&B (needs `wandb login` and synced runs) and returns its URL."""
    import wandb  # lazy: only W&B logging needs it (logger=csv does not), ~1 s to import

    if wandb.Api().api_key is None:
        raise UserError(
            "creating a W&B Report needs an account: run `wandb login`, then `wandb sync "
            "wandb/offline-run-*` to upload the offline runs, then retry"
        )
    return report_spec(project, entity, group, title).save().url


# -------------------------------------------------------------------------------- reading offline run files
_BLOCK = 32768  # the log is written in blocks of 32 KiB; a record header is 7 bytes
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise UserError(f"{path}: not a W&B run file (missing the ':W&B' header)")
    pos, pending = 7, b""  # file header: ident (4), magic (2), version (1)
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            continue


def read_offline_run(run_dir: str | Path) -> dict:
    """{"group", "name", "job_type", "config": {...}, "summary": {...}} of a local (offline) run folder."""

    from wandb.proto import wandb_internal_pb2 as pb  # lazy: only W&B logging needs it

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb"))
    if not files:
        raise UserError(f"{run_dir}: no .wandb run file")
    out = {"group": None, "name": None, "job_type": None, "config": {}, "summary": {}}

    def key(item):
        return item.key or "/".join(item.nested_key)

    for raw in _records(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(
                group=record.run.run_group or None, name=record.run.display_name, job_type=record.run.job_type or None
            )
            for item in record.run.config.update:
                out["config"][key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][key(item)] = json.loads(item.value_json)
    return out
