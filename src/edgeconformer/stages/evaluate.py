"""Stage `evaluate@<variant>-s<seed>`: WER per precision (PyTorch FP32, FP16 without and with stabilization, the
exported Core ML program simulated on Linux or run on macOS), RTF, device estimates, FLOPs -> evaluation.json.

The PyTorch precision modes were decoded by the stabilize stage (<run report dir>/precision_modes.json, checked to
match the stabilized graph's options); this stage adds the exported program (MIL-simulated on the first
`eval.coreml_sim_utterances`, parity against the PyTorch FP16 graph), Core ML on macOS, RTF, estimates and FLOPs.

Per-utterance results (reference, hypothesis and errors of every mode) go to <run report dir>/utterances.jsonl
(reports/runs/<variant>/s<seed>/ in the DVC chain, artifacts.run_paths); every figure to evaluation.json there, built
as an edgeconformer.metrics.RunMetrics (the schema the compare stage, the report and W&B read).
WER is in percent (0-100). What cannot be measured on this machine is null, never a guess: wer_coreml and
rtf_coreml need macOS; rtf_device_estimate is labelled an estimate by construction (evaluate/device.py).

Practical-Conformer figures (docs/practical.md), for every model: attention_state_bytes (evaluate/state.py, at
eval.flops.seconds) and gflops_per_audio_second_streamed (evaluate/flops.py). For a cascaded model also the
streaming first pass alone: wer_first_pass_fp32 (PyTorch FP32, greedy CTC, the same utterances as wer_fp32),
rtf_cpu_first_pass (the RTF protocol on the same audio as rtf_cpu) and per-utterance rows under "fp32_first_pass";
these are null (rows: absent) for a model without a cascade.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from omegaconf import DictConfig

from edgeconformer.artifacts import load_stabilized, run_paths, write_json_atomic, write_jsonl_atomic
from edgeconformer.data.dataset import load_audio
from edgeconformer.errors import UserError
from edgeconformer.evaluate import coreml_device
from edgeconformer.evaluate.device import estimate_all
from edgeconformer.evaluate.flops import count_flops, count_params
from edgeconformer.evaluate.rtf import measure_rtf, pick_by_duration, recognizer_fn
from edgeconformer.evaluate.state import attention_state_bytes
from edgeconformer.export.milsim import MILExecutor, load_program
from edgeconformer.files import read_jsonl
from edgeconformer.metrics import AttentionState, CoremlSim, DeviceEstimate, Machine, RtfProtocol, RunMetrics
from edgeconformer.models.cascade import CascadedASR
from edgeconformer.scoring import greedy_text, load_utterances, score
from edgeconformer.stabilize.precision import precision_model

ROW_KEYS = ("hypothesis", "errors", "ref_words")  # what utterances.jsonl keeps of a score() row per mode


def coreml_sim(package, utterances, tokenizer, reference: dict[str, torch.Tensor]) -> dict:
    """The exported program run by the MIL executor in its declared precision: WER rows and parity (max |diff|
    of log-probs, identical transcripts) against the PyTorch FP16 stabilized graph's log-probs `reference`."""

    executor = MILExecutor(load_program(package))
    hyps, worst, same, started = [], 0.0, 0, time.perf_counter()
    for u in utterances:
        out = executor.run({"feats": u.feats.numpy()})["log_probs"]
        log_probs = torch.from_numpy(np.asarray(out, dtype=np.float32))[0]  # (T', V)
        hyps.append(greedy_text(log_probs, tokenizer))
        ref = reference[u.id]
        finite = torch.isfinite(log_probs) & torch.isfinite(ref)
        worst = max(worst, float((log_probs - ref)[finite].abs().max()) if finite.any() else float("inf"))
        same += hyps[-1] == greedy_text(ref, tokenizer)
    s = score([u.text for u in utterances], hyps, [u.id for u in utterances])
    return {
        "wer": s["wer"],
        "cer": s["cer"],
        "rows": s["utterances"],
        "max_abs_diff_vs_pytorch_fp16": worst,
        "identical_transcripts": same,
        "utterances": len(utterances),
        "seconds": round(time.perf_counter() - started, 1),
    }


def coreml_on_device(package, utterances, tokenizer, subsampled, warmup: int) -> dict | None:
    """macOS only: WER and RTF per compute-unit setting; None elsewhere (the reason is printed)."""

    ok, why = coreml_device.available()
    if not ok:
        print(f"Core ML on device: skipped ({why})")
        return None
    results = coreml_device.evaluate_compute_units(
        str(package), [(u.feats.numpy(), u.seconds) for u in utterances], warmup=warmup, out_frames=subsampled
    )
    refs, ids = [u.text for u in utterances], [u.id for u in utterances]
    out = {}
    for unit, r in results.items():
        hyps = [greedy_text(torch.from_numpy(y), tokenizer) for y in r.pop("log_probs")]
        out[unit] = dict(r, wer=score(refs, hyps, ids)["wer"])
    return out


def read_precision_modes(path, options: dict, run: str) -> dict:
    """The stabilize stage's precision_modes.json (transcripts per precision mode and stabilization arm, the
    softmax k distribution), checked to belong to the stabilized graph evaluated."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `dvc repro stabilize@{run}` first") from None
    if saved["options"] != options:
        raise UserError(
            f"{path}: written for stabilization options {saved['options']}, but stabilized.pt holds "
            f"{options}; re-run `dvc repro stabilize@{run}`"
        )
    return saved


def is_cascade(module) -> bool:
    return isinstance(module.model, CascadedASR)


@torch.no_grad()
def first_pass_scores(module, utterances) -> dict:
    """Cascade: the streaming first pass alone, PyTorch FP32, greedy CTC on every utterance (batch 1, no padding):
    score() of its transcripts ({"wer", "cer", "utterances": rows, ...})."""
    model = module.model.eval()
    hyps = []
    for u in utterances:
        lengths = torch.tensor([u.feats.size(1)])
        first, first_lengths = model.encode_first_pass(module.cmvn(u.feats, lengths), lengths)  # (1, T', D1)
        log_probs = model.first_pass_log_probs(first)[0, : int(first_lengths[0])]  # (T', V)
        hyps.append(greedy_text(log_probs, module.tokenizer))
    return score([u.text for u in utterances], hyps, [u.id for u in utterances])


def first_pass_metrics(module, utterances, rtf_inputs, rtf_cfg) -> dict:
    """{"wer_first_pass_fp32", "rtf_cpu_first_pass", "rows"} of a cascaded model's first pass (rows: per utterance,
    in `utterances` order); all None for a model without a cascade. rtf_inputs: the (waveform, seconds) pairs
    rtf_cpu is measured on; rtf_cfg: eval.rtf (warmup, repeats, threads)."""

    if not is_cascade(module):
        return {"wer_first_pass_fp32": None, "rtf_cpu_first_pass": None, "rows": None}
    s = first_pass_scores(module, utterances)
    rtf = measure_rtf(
        recognizer_fn(module, first_pass=True),
        rtf_inputs,
        warmup=rtf_cfg.warmup,
        repeats=rtf_cfg.repeats,
        threads=rtf_cfg.threads,
    )
    return {"wer_first_pass_fp32": s["wer"], "rtf_cpu_first_pass": rtf["rtf_median"], "rows": s["utterances"]}


def precision_inputs(cfg: DictConfig, paths, module, options: dict) -> tuple[dict, list]:
    """The stabilize stage's precision_modes.json (checked against the stabilized graph's `options`) and the test
    utterances it covers, in its order."""
    saved = read_precision_modes(paths.report_dir / "precision_modes.json", options, paths.name)
    ids = [r["id"] for r in saved["modes"]["fp32"]["rows"]]
    utts = [u for u in load_utterances(cfg, module.fbank, limit=len(ids)) if u.id in set(ids)]
    if [u.id for u in utts] != ids:
        raise UserError(
            f"{paths.report_dir / 'precision_modes.json'} covers other utterances than "
            f"{cfg.data.test_split}: re-run `dvc repro stabilize@{paths.name}`"
        )
    return saved, utts


def simulated_program(cfg: DictConfig, package, module, options: dict, utts: list, modes: dict) -> dict:
    """The exported program, simulated, against the PyTorch FP16 graph on the same (first
    eval.coreml_sim_utterances) utterances: coreml_sim() plus the PyTorch FP16 WER on that subset."""
    n = cfg.eval.coreml_sim_utterances
    sim_utts = utts[:n] if n else utts
    fp16 = precision_model(module.model, "fp16", module.cmvn, **options, accumulate=cfg.stabilize.accumulate)
    with torch.no_grad():
        fp16_log_probs = {u.id: fp16(u.feats)[0] for u in sim_utts}
    sim = coreml_sim(package, sim_utts, module.tokenizer, fp16_log_probs)
    rows = modes["fp16"]["rows"][: len(sim_utts)]
    sim["wer_pytorch_fp16_same_utterances"] = score(
        [r["reference"] for r in rows], [r["hypothesis"] for r in rows], [r["id"] for r in rows]
    )["wer"]
    return sim


def rtf_audio(cfg: DictConfig) -> list[tuple]:
    """(waveform, seconds) of the eval.rtf.utterances test utterances picked by duration, what RTF is timed on."""
    manifest = f"{cfg.data.out_dir}/manifests/{cfg.data.test_split}.jsonl"
    timed = pick_by_duration(read_jsonl(manifest), cfg.eval.rtf.utterances)
    return [(load_audio(r["audio_filepath"], uid=r["id"], manifest=manifest), float(r["duration"])) for r in timed]


def run_record(
    cfg: DictConfig,
    paths,
    module,
    options: dict,
    saved: dict,
    utts: list,
    *,
    sim: dict,
    device: dict | None,
    rtf: dict,
    first: dict,
) -> RunMetrics:
    """The run's evaluation.json (metrics.RunMetrics) from the stage's measurements and the model's counted
    figures (model_figures)."""
    modes = saved["modes"]
    return RunMetrics(
        variant=paths.variant,
        seed=paths.seed,
        model=cfg.model.name,
        wer_fp32=modes["fp32"]["wer"],
        wer_fp16=modes["fp16"]["wer"],
        wer_fp16_unstabilized=modes["fp16_unstabilized"]["wer"],
        wer_coreml_sim=sim["wer"],
        wer_coreml=device["ALL"]["wer"] if device else None,
        cer_fp32=modes["fp32"]["cer"],
        cer_fp16=modes["fp16"]["cer"],
        rtf_cpu=rtf["rtf_median"],
        rtf_cpu_p90=rtf["rtf_p90"],
        rtf_coreml=device["ALL"]["rtf_median"] if device else None,
        wer_first_pass_fp32=first["wer_first_pass_fp32"],
        rtf_cpu_first_pass=first["rtf_cpu_first_pass"],
        n_utterances=len(utts),
        audio_hours=sum(u.seconds for u in utts) / 3600,
        split=cfg.data.test_split,
        stabilization=options,
        nonfinite_utterances={mode: m["nonfinite_utterances"] for mode, m in modes.items()},
        # The stabilization ablation (FP16 accumulation emulated; empty when stabilize.ablation is off).
        stabilization_arms={arm: modes[arm]["wer"] for arm in modes if arm.startswith("acc16_")},
        softmax_k=saved.get("softmax_k"),
        audit_frontend_peak=saved.get("frontend_peak"),
        coreml_sim=CoremlSim.parse({k: v for k, v in sim.items() if k != "rows"}),
        coreml_device=device,
        rtf_protocol=RtfProtocol.parse({k: v for k, v in rtf.items() if k != "utterances"}),
        machine=Machine.parse(rtf["machine"]),
        **model_figures(cfg, module),
    )


def model_figures(cfg: DictConfig, module) -> dict:
    """RunMetrics fields counted on the model itself: device estimates, FLOPs, parameters, streaming state."""
    e = cfg.eval
    d = e.device_estimate
    estimates = estimate_all(module.model, d.seconds, list(d.profiles), d.precision)
    flops = count_flops(
        module.model, e.flops.seconds, idim=module.fbank.n_mels, tokens_per_second=e.flops.tokens_per_second
    )
    return dict(
        rtf_device_estimate=estimates[d.device]["rtf"],
        device=d.device,
        rtf_device_estimates={name: est["rtf"] for name, est in estimates.items()},
        flops_subsampling_share=flops["shares"]["subsampling"],
        flops_shares=flops["shares"],
        gflops_per_audio_second=flops["gflops_per_audio_second"],
        params_millions=count_params(module.model) / 1e6,
        gflops_per_audio_second_streamed=flops["gflops_per_audio_second_streamed"],
        attention_state_bytes=AttentionState.parse(attention_state_bytes(module.model, e.flops.seconds)),
        device_estimates={name: DeviceEstimate.parse(est) for name, est in estimates.items()},
    )


def utterance_rows(utts: list, modes: dict, first_rows: list | None, sim_rows: list) -> list[dict]:
    """utterances.jsonl: per utterance, ROW_KEYS of every precision mode, a cascade's first pass alone and the
    simulated program (on its subset)."""
    rows = []
    for i, u in enumerate(utts):
        row = {"id": u.id, "reference": u.text, "seconds": round(u.seconds, 3)}
        for mode, m in modes.items():
            row[mode] = {k: m["rows"][i][k] for k in ROW_KEYS}
        if first_rows is not None:  # cascade: the streaming first pass alone
            row["fp32_first_pass"] = {k: first_rows[i][k] for k in ROW_KEYS}
        if i < len(sim_rows):
            row["coreml_sim"] = {k: sim_rows[i][k] for k in ROW_KEYS}
        rows.append(row)
    return rows


def evaluate(cfg: DictConfig) -> dict:
    e = cfg.eval
    torch.set_num_threads(cfg.trainer.num_threads)
    paths = run_paths(cfg)
    module, _, options = load_stabilized(paths.model_dir)
    saved, utts = precision_inputs(cfg, paths, module, options)
    modes = saved["modes"]
    sim = simulated_program(cfg, paths.package, module, options, utts, modes)
    device = coreml_on_device(
        paths.package, utts, module.tokenizer, module.model.encoder.subsampling.subsample_lengths, e.rtf.warmup
    )
    rtf_inputs = rtf_audio(cfg)
    rtf = measure_rtf(
        recognizer_fn(module), rtf_inputs, warmup=e.rtf.warmup, repeats=e.rtf.repeats, threads=e.rtf.threads
    )
    first = first_pass_metrics(module, utts, rtf_inputs, e.rtf)
    record = run_record(cfg, paths, module, options, saved, utts, sim=sim, device=device, rtf=rtf, first=first)

    paths.report_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(paths.report_dir / "utterances.jsonl", utterance_rows(utts, modes, first["rows"], sim["rows"]))
    metrics = record.to_dict()
    write_json_atomic(paths.evaluation, metrics)
    print(format_metrics(metrics))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
    return metrics


def format_state(state: dict | None) -> str:
    """attention_state_bytes -> "51,200 B attention (+0 B positions, 26,880 B conv caches) at 10 s"."""
    if not state:
        return "n/a"
    return (
        f"{state['attention']:,} B attention (+{state['positions']:,} B positions, {state['conv']:,} B conv "
        f"caches) at {state['seconds']:g} s"
    )


def format_metrics(m: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.2f}"

    def num(v, spec):
        return "n/a" if v is None else format(v, spec)

    streamed = m.get("gflops_per_audio_second_streamed")
    lines = [
        f"evaluate@{m['variant']}-s{m.get('seed')}: {m['n_utterances']} utterances "
        f"({m['audio_hours'] * 60:.1f} min) of {m['split']}",
        f"  WER %  fp32 {pct(m['wer_fp32'])}  fp16 {pct(m['wer_fp16'])}  fp16 unstabilized "
        f"{pct(m['wer_fp16_unstabilized'])}  Core ML (simulated) {pct(m['wer_coreml_sim'])}  Core ML "
        f"{pct(m['wer_coreml'])}",
        f"  RTF    cpu {m['rtf_cpu']:.4f} ({m['machine'].get('cpu_model', '?')}, {m['rtf_protocol']['threads']} "
        f"thread(s))  Core ML {pct(m['rtf_coreml'])}  {m['device']} (estimate) {m['rtf_device_estimate']:.4f}",
        f"  FLOPs  {m['gflops_per_audio_second']:.3f} GFLOPs per audio second, subsampling share "
        f"{m['flops_subsampling_share']:.1%}; {m['params_millions']:.2f} M parameters",
        f"  stream {num(streamed, '.3f')} GFLOPs per audio second streamed; attention state "
        f"{format_state(m.get('attention_state_bytes'))}",
    ]
    if m.get("wer_first_pass_fp32") is not None or m.get("rtf_cpu_first_pass") is not None:
        lines.append(
            f"  first pass  WER % fp32 {pct(m.get('wer_first_pass_fp32'))}  RTF cpu "
            f"{num(m.get('rtf_cpu_first_pass'), '.4f')}"
        )
    return "\n".join(lines)
