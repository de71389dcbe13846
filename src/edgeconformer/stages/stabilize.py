"""Stage `stabilize@<variant>-s<seed>`: a trained model -> its FP16-stable ANE-layout graph, checked and audited.

No retraining. Steps, each recorded in the run's reports/runs/<variant>/s<seed>/stabilize.json:
1. the ANE-layout (B, C, 1, S) graph built from the trained weights must equal the original in FP32 (encoder
   outputs within `stabilize.equivalence_atol`, identical CTC greedy transcripts on the test split), else the stage
   fails: an export of a graph that computes something else would be worse than none;
2. the three precision modes (fp32, fp16 without stabilization, fp16 with the configured pre-normalizer and LUT
   softmax) transcribe the test split, WER per mode -> precision_modes.json (every transcript;
   the evaluate stage reports these rather than decoding the split a second time);
3. FP16 range audits (per module, on the first `stabilize.audit_utterances`) of the original model and of both
   FP16 graphs -> fp16_audit.json + plot;
4. the stress case: activations scaled by `stabilize.stress_gain` (FP32 outputs unchanged by LayerNorm's scale
   invariance; "auto" picks a gain that overflows unstabilized FP16 LayerNorm by construction); unstabilized FP16
   is expected to fail, stabilized FP16 to stay with FP32;
5. the LUT softmax error table for the configured table sizes;
6. the stabilization ablation (`stabilize.ablation`, for the variants in `stabilize.ablation.variants`: the ones
   with seeds by default), where it matters: FP16 accumulation emulated (every sum
   rounded to FP16 after each addition, as on an accelerator that accumulates in FP16), the whole test split, arms
   acc16_none (plain LayerNorm, exact softmax), acc16_prenorm (the pre-normalizer only), acc16_lut (the LUT softmax
   only), acc16_both, and acc16_both_uncapped (the paper's conditional re-scaling as described: k from the row's
   range, no cap); with the distribution of k over the trained model's attention rows, capped and uncapped. The
   Performer's feature shift is the configured one in every arm, so the arms differ in exactly these two parts.
   Transcripts go to precision_modes.json with the other modes (paired comparisons in the compare stage).
models/<variant>/s<seed>/stabilized.pt holds the stabilized graph's weights and the options to rebuild it.

The FP16 transcripts of steps 2 and 6 (single-thread simulations, most of the work) run in `trainer.num_threads`
worker processes from right after step 1, while this process does steps 3-5 (run_steps; docs/stabilization.md
section 7); where they run changes no number.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context

import torch
from omegaconf import DictConfig, OmegaConf

from edgeconformer.artifacts import load_trained, run_paths, save_stabilized, write_json_atomic
from edgeconformer.errors import UserError
from edgeconformer.scoring import greedy_text, load_utterances, score
from edgeconformer.stabilize.ane import ANEConformer
from edgeconformer.stabilize.audit import audit, plot_audit, write_audit
from edgeconformer.stabilize.precision import MODES, SIMULATION_COUNTS, one_thread, precision_model
from edgeconformer.stabilize.softmax import LUTSoftmax, error_table, resolve_max_squarings, squarings
from edgeconformer.stabilize.stress import safe_gain, scale_activations


class EquivalenceError(UserError):
    """The ANE-layout graph does not compute what the trained model computes."""


def ane_options(s: DictConfig) -> dict:
    """conf/stabilize -> ANEConformer.from_asr keyword arguments of the stabilized graph."""
    return dict(
        prenorm=s.prenorm,
        p=int(s.p),
        fmt=s.format,
        softmax=s.softmax.kind,
        lut_size=int(s.softmax.table_size),
        lut_range=float(s.softmax.range),
        lut_interp=s.softmax.interp,
        lut_max_squarings=s.softmax.get("max_squarings"),
        performer_shift=bool(s.get("performer_shift", True)),
    )


@torch.no_grad()
def check_equivalence(module, ane, utterances, atol: float) -> tuple[dict, dict[int, torch.Tensor]]:
    """Original encoder (CMVN, padding-free batch 1) vs the ANE graph in FP32 on every utterance; -> (the result,
    the original model's CTC log-probs (1, T', V) by id() of each utterance's feats: the "fp32" precision mode)."""

    worst, mismatches, original = 0.0, [], {}
    for u in utterances:
        lengths = torch.tensor([u.feats.size(1)])
        enc, _ = module.model.encode(module.cmvn(u.feats, lengths), lengths)  # (1, T', D)
        enc_ane = ane.encode(u.feats)[:, :, 0, :].transpose(1, 2)  # (1, D, 1, T') -> (1, T', D)
        worst = max(worst, float((enc - enc_ane).abs().max()))
        original[id(u.feats)] = module.model.ctc_log_probs(enc).float()
        ref = greedy_text(original[id(u.feats)][0], module.tokenizer)
        hyp = greedy_text(ane(u.feats)[0], module.tokenizer)
        if ref != hyp:
            mismatches.append({"id": u.id, "original": ref, "ane": hyp})
    result = {
        "utterances": len(utterances),
        "encoder_max_abs_diff": worst,
        "atol": atol,
        "transcript_mismatches": mismatches,
    }
    if worst > atol or mismatches:
        raise EquivalenceError(
            f"the ANE-layout graph differs from the trained model in FP32: encoder max |diff| {worst:.2e} (allowed "
            f"{atol:.0e}), {len(mismatches)} greedy transcripts differ (first: {mismatches[:1]}); this is a "
            "conversion bug: report it with the model config"
        )
    return result, original


def choose_stress_gain(setting, ane_audit: dict, fp16_max: float = 65504.0) -> float:
    """A number, or "auto": the power of two that lifts the model's largest LayerNorm sum of squares 64x past the
    FP16 maximum (sums of squares grow with gain^2), so an unstabilized FP16 LayerNorm must overflow, but never
    beyond the gain that keeps the residual stream itself one bit below the maximum (stress.safe_gain): past it
    nothing can save FP16, stabilized or not."""

    if str(setting) != "auto":
        return float(setting)
    peak = ane_audit["summary"]["worst_layernorm_input_sumsq"]["peak"]
    if not 0 < peak < math.inf:
        raise UserError(
            f"stabilize.stress_gain=auto needs a finite LayerNorm peak from the FP32 audit, got {peak}; "
            "set stabilize.stress_gain to a number"
        )
    forcing = 2.0 ** max(0, math.ceil(math.log2(math.sqrt(64 * fp16_max / peak))))
    return min(forcing, safe_gain(ane_audit, margin_bits=1.0, max_gain=2.0**15))


@torch.no_grad()
def transcribe_modes(models: dict, utterances, tokenizer) -> dict:
    """{mode: PrecisionModel} -> {mode: {"wer", "cer", "nonfinite_utterances", "max_abs_diff_vs_fp32",
    "simulation", "rows"}}, batch 1. An FP16 LayerNorm whose sum of squares overflows returns zeros rather than
    inf (x / sqrt(inf) = 0), so the log-prob distance to FP32 shows a failure that non-finite counts miss."""

    refs, ids = [u.text for u in utterances], [u.id for u in utterances]
    reference = {u.id: models["fp32"](u.feats)[0].float() for u in utterances} if "fp32" in models else None
    out = {}
    for mode, model in models.items():
        hyps, nonfinite, worst = [], 0, 0.0
        for u in utterances:
            log_probs = model(u.feats)[0].float()  # (T', V)
            hyps.append(greedy_text(log_probs, tokenizer))
            bad = not torch.isfinite(log_probs).all()
            nonfinite += bad
            if reference is not None:
                worst = max(worst, math.inf if bad else float((log_probs - reference[u.id]).abs().max()))
        s = score(refs, hyps, ids)
        out[mode] = {
            "wer": s["wer"],
            "cer": s["cer"],
            "nonfinite_utterances": nonfinite,
            "max_abs_diff_vs_fp32": worst if reference is not None else None,
            "simulation": model.summary(),
            "rows": s["utterances"],
        }
    return out


def audit_fp16(module, feats, fmt: str) -> dict:
    with one_thread():
        return audit(module, [f.half() for f in feats], fmt=fmt)


class StepTimer:
    """Seconds per step (since the previous lap), reported with the results."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now


def stabilize(cfg: DictConfig) -> dict:
    s = cfg.stabilize
    torch.set_num_threads(cfg.trainer.num_threads)
    paths = run_paths(cfg)
    paths.report_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    module = load_trained(paths.model_dir)
    utts = load_utterances(cfg, module.fbank, limit=s.max_utterances)
    options = ane_options(s)
    timer = StepTimer()
    results = run_steps(cfg, paths, module, utts, options, timer)
    # Stored in FP32 (the trained weights exactly); consumers cast to their precision.
    save_stabilized(ANEConformer.from_asr(module.model, module.cmvn, **options), options, paths.stabilized)
    summary = stabilize_summary(
        s, paths.variant, options, results, len(utts), round(time.perf_counter() - started, 1), timer.seconds
    )
    write_json_atomic(paths.report_dir / "stabilize.json", summary)
    # Every transcript of every mode, for the evaluate stage (the same options it evaluates) and for inspection.
    write_json_atomic(
        paths.report_dir / "precision_modes.json",
        {
            "options": options,
            "softmax_k": results["softmax_k"],
            "frontend_peak": summary["frontend_peak"],
            "modes": {
                mode: {k: m[k] for k in ("wer", "cer", "nonfinite_utterances", "max_abs_diff_vs_fp32", "rows")}
                for mode, m in {**results["modes"], **results["ablation"]}.items()
            },
        },
    )
    print(format_summary(summary))
    print(json.dumps({k: summary[k] for k in ("variant", "wer", "wer_delta_fp16", "stress")}))
    return summary


def run_steps(cfg: DictConfig, paths, module, utts, options: dict, timer: StepTimer) -> dict:
    """Steps 1-6 of the module docstring; -> their results (the audit files written on the way)."""
    s = cfg.stabilize
    sim = dict(accumulate=s.accumulate)
    # 1. The graph itself, before any change of numerics (the Performer's shifts change none: exact rewrites, and
    # the exported graph's own). The original model's log-probs on the way are the "fp32" precision mode.
    ane32 = ANEConformer.from_asr(module.model, module.cmvn, performer_shift=options["performer_shift"]).eval()
    r = {}
    r["equivalence"], original = check_equivalence(module, ane32, utts, float(s.equivalence_atol))
    timer.lap("load_and_equivalence")

    # The FP16 transcripts of step 2 (the FP16 precision modes) and step 6 (the ablation's arms) are single-thread
    # simulations and most of the stage's work: they start now in `workers` processes, and this process does steps
    # 3-5 meanwhile. Their numbers do not depend on where they run (run_fp16 uses one thread anywhere).
    graphs, arms = fp16_graphs(s, options, paths.variant)
    workers = int(cfg.trainer.num_threads)
    with fp16_workers(workers) as pool:
        transcripts = start_fp16(pool, module, utts, graphs, workers)

        # 3. Range audits: the trained model as is, its ANE graph in FP32, and both FP16 graphs of step 2.
        fp16 = {
            mode: precision_model(module.model, mode, module.cmvn, **options, **sim) for mode in graphs if mode in MODES
        }
        feats = [u.feats for u in utts[: s.audit_utterances or None]]
        r["audits"], r["audit_utterances"] = range_audits(module, ane32, fp16, feats, s.format), len(feats)
        r["audit_path"] = write_audit(r["audits"], paths.report_dir / "fp16_audit.json")
        plot_audit(r["audits"], paths.report_dir / "fp16_audit.png")
        timer.lap("audits")

        # 4. Stress case: same FP32 function, residual stream `stress_gain` times larger.
        r["gain"] = choose_stress_gain(s.stress_gain, r["audits"]["ane_fp32"])
        stressed = scale_activations(module.model, r["gain"])
        stress_models = {mode: precision_model(stressed, mode, module.cmvn, **options, **sim) for mode in MODES}
        r["stress_utterances"] = len(utts[: int(s.stress_utterances)])
        r["stress"] = transcribe_modes(stress_models, utts[: int(s.stress_utterances)], module.tokenizer)
        timer.lap("stress")

        # 5. LUT softmax error vs float64 for the configured table sizes.
        r["lut"] = error_table(
            table_sizes=tuple(s.softmax.error_table_sizes),
            ranges=(float(s.softmax.range),),
            interps=(s.softmax.interp,),
        )
        # 6 (its FP32 part): how many squarings the trained model's attention rows need.
        r["softmax_k"] = softmax_k_distribution(module, utts, options) if arms else None
        timer.lap("lut_error_table_and_softmax_k")
        replayed = transcripts()
    timer.lap("fp16_transcripts_wait")

    # 2. Precision modes on the test split.
    r["modes"] = transcribe_modes(
        {"fp32": Replayed.fp32(original)} | {m: replayed[m] for m in fp16}, utts, module.tokenizer
    )
    # 6. Stabilization ablation under FP16 accumulation.
    r["ablation"] = transcribe_modes({arm: replayed[arm] for arm in arms}, utts, module.tokenizer) if arms else {}
    timer.lap("scoring")
    return r


def fp16_graphs(s: DictConfig, options: dict, variant: str) -> tuple[dict, dict]:
    """The FP16 graphs to transcribe, {name: (mode, options, accumulate)}: the FP16 precision modes, and the
    ablation's arms where stabilize.ablation asks for them (-> also the arms, {} without)."""
    graphs = {mode: (mode, options, s.accumulate) for mode in MODES if mode != "fp32"}
    ab = s.get("ablation") or {}
    ablate = ab.get("enabled", False) and (ab.get("variants") is None or variant in ab.variants)
    arms = ablation_arms(options) if ablate else {}
    graphs |= {name: ("fp16", dict(options, **arm), s.ablation.accumulate) for name, arm in arms.items()}
    return graphs, arms


def range_audits(module, ane32, models: dict, feats: list[torch.Tensor], fmt: str) -> dict:
    """FP16 range audits of the trained model as is, its ANE graph in FP32, and both FP16 graphs."""
    original = [(module.cmvn(f, torch.tensor([f.size(1)])), None) for f in feats]
    return {
        "original_fp32": audit(module.model.eval(), original, fmt=fmt),
        "ane_fp32": audit(ane32, feats, fmt=fmt),
        "fp16_unstabilized": audit_fp16(models["fp16_unstabilized"].module, feats, fmt),
        "fp16": audit_fp16(models["fp16"].module, feats, fmt),
    }


def stabilize_summary(
    s: DictConfig, variant: str, options: dict, r: dict, utterances: int, seconds: float, step_seconds: dict
) -> dict:
    """stabilize.json from the results of run_steps."""
    modes, stress, ablation, audits = r["modes"], r["stress"], r["ablation"], r["audits"]
    return {
        "variant": variant,
        "options": options,
        "equivalence": r["equivalence"],
        "wer": {mode: m["wer"] for mode, m in modes.items()},
        "nonfinite_utterances": {mode: m["nonfinite_utterances"] for mode, m in modes.items()},
        "wer_delta_fp16": modes["fp16"]["wer"] - modes["fp32"]["wer"],
        "wer_delta_fp16_unstabilized": modes["fp16_unstabilized"]["wer"] - modes["fp32"]["wer"],
        "simulation": {mode: m["simulation"] for mode, m in modes.items()},
        "stress": {
            "gain": r["gain"],
            "setting": str(s.stress_gain),
            "utterances": r["stress_utterances"],
            "wer": {mode: m["wer"] for mode, m in stress.items()},
            "nonfinite_utterances": {mode: m["nonfinite_utterances"] for mode, m in stress.items()},
            "max_abs_diff_vs_fp32": {mode: m["max_abs_diff_vs_fp32"] for mode, m in stress.items()},
        },
        "max_abs_diff_vs_fp32": {mode: m["max_abs_diff_vs_fp32"] for mode, m in modes.items()},
        "ablation": {
            "accumulate": s.get("ablation", {}).get("accumulate"),
            "arms": ablation_arms(options),
            "wer": {arm: m["wer"] for arm, m in ablation.items()},
            "nonfinite_utterances": {arm: m["nonfinite_utterances"] for arm, m in ablation.items()},
            "softmax_k": r["softmax_k"],
        },
        "audit_summary": {name: a["summary"] for name, a in audits.items()},
        # The front end's largest |activation| in the trained FP32 model (paper 1, claim 7: DWS vs vanilla range).
        "frontend_peak": max(
            (
                v["peak"]
                for k, v in audits["original_fp32"]["modules"].items()
                if "subsampling" in k.split(".") and v.get("peak") is not None
            ),
            default=None,
        ),
        "lut_error": r["lut"],
        "utterances": utterances,
        "audit_utterances": r["audit_utterances"],
        "seconds": seconds,
        "step_seconds": step_seconds,
        "config": OmegaConf.to_container(s, resolve=True),
        "audit": str(r["audit_path"]),
    }


def _fp16_outputs(job) -> tuple[list[torch.Tensor], dict]:
    """One FP16 graph's CTC log-probs (simulated, one thread) for a share of the utterances, and its counts."""

    trained, mode, options, accumulate, feats = job
    asr, cmvn = pickle.loads(trained)
    model = precision_model(asr, mode, cmvn, **options, accumulate=accumulate)
    return [model(f) for f in feats], model.summary()


class Replayed:
    """A precision mode whose log-probs were computed elsewhere (start_fp16, check_equivalence), served for the
    same input tensors, so transcribe_modes scores it like a model it runs itself."""

    def __init__(self, mode: str, outputs: dict[int, torch.Tensor], summaries: list[dict]):
        self.outputs = outputs
        self.report = {"mode": mode, "calls": sum(r["calls"] for r in summaries)}
        for key in SIMULATION_COUNTS:
            self.report[key] = dict(sum((Counter(r.get(key, {})) for r in summaries), Counter()))

    @classmethod
    def fp32(cls, outputs: dict[int, torch.Tensor]) -> Replayed:
        """The "fp32" mode from the original model's log-probs (no simulation: empty counts)."""
        return cls("fp32", outputs, [{"calls": len(outputs)}])

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return self.outputs[id(feats)]

    def summary(self) -> dict:
        return self.report


@contextmanager
def fp16_workers(workers: int):
    """A pool of `workers` spawned processes for start_fp16 (None for one worker: it runs here); on the way out
    it waits for its jobs, or on an error cancels those not started."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def start_fp16(pool, module, utterances, graphs: dict[str, tuple[str, dict, str]], workers: int):
    """Starts {name: (mode, options of the FP16 graph, accumulate)} on `utterances` in `pool` (each graph's
    utterances in `workers` shares, one process and core each); -> a function that waits for them and returns
    {name: Replayed}. Without a pool the work runs when that function is called. The FP16 simulation runs on one
    thread (a CPU half kernel stalls on two, precision.one_thread) and costs ~0.02-0.04 s per audio second with
    FP16 accumulation."""

    shares = [utterances[i::workers] for i in range(max(1, workers))]
    # The trained model as it is now: the pool pickles jobs later, in a thread of its own, while this process may
    # attach hooks to the model (the audits) or change it.
    trained = pickle.dumps((module.model, module.cmvn))
    jobs = [
        (trained, mode, options, accumulate, [u.feats for u in share])
        for mode, options, accumulate in graphs.values()
        for share in shares
    ]
    futures = [pool.submit(_fp16_outputs, job) for job in jobs] if pool is not None else None

    def collect() -> dict[str, Replayed]:
        results = [f.result() for f in futures] if futures is not None else [_fp16_outputs(job) for job in jobs]
        out = {}
        for i, (name, (mode, _, _)) in enumerate(graphs.items()):
            outputs, summaries = {}, []
            for share, (log_probs, summary) in zip(shares, results[i * len(shares) : (i + 1) * len(shares)]):
                outputs.update({id(u.feats): lp for u, lp in zip(share, log_probs)})
                summaries.append(summary)
            out[name] = Replayed(mode, outputs, summaries)
        return out

    return collect


def ablation_arms(options: dict) -> dict:
    """The stabilization ablation's arms: overrides of the configured stabilized graph's options."""
    exact, lut = {"softmax": "exact"}, {"softmax": "lut"}
    plain, prenorm = {"prenorm": "none"}, {"prenorm": options["prenorm"]}
    return {
        "acc16_none": {**plain, **exact},
        "acc16_prenorm": {**prenorm, **exact},
        "acc16_lut": {**plain, **lut},
        "acc16_both": {**prenorm, **lut},
        "acc16_both_uncapped": {**prenorm, **lut, "lut_max_squarings": None},
    }


@torch.no_grad()
def softmax_k_distribution(module, utterances, options: dict) -> dict:
    """How many squarings k each attention row of the trained model needs (FP32 ANE graph on `utterances`):
    {"uncapped": {k: rows}, "capped": {k: rows}, "cap": the configured cap for the longest row, "rows": n}. k > 0
    only where a row's score range exceeds the table's range R; the capped rule drops those rows' entries below
    -R * 2^cap instead (below FP16's resolution when the cap is "auto")."""

    ane = ANEConformer.from_asr(
        module.model,
        module.cmvn,
        softmax="lut",
        lut_size=options["lut_size"],
        lut_range=options["lut_range"],
        lut_interp=options["lut_interp"],
        lut_max_squarings=None,
        performer_shift=options["performer_shift"],
    ).eval()
    uncapped, capped, widest = Counter(), Counter(), 0
    setting = options["lut_max_squarings"]

    def hook(softmax, args, kwargs):
        scores = args[0]
        dim, mask = kwargs.get("dim", -1), kwargs.get("mask")
        k = squarings(scores, dim, mask, softmax.range_, None).flatten().tolist()
        cap = resolve_max_squarings(setting, softmax.range_, scores.shape[dim], torch.float16)
        uncapped.update(k)
        capped.update(min(v, cap) if cap is not None else v for v in k)
        nonlocal widest
        widest = max(widest, scores.shape[dim])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in ane.modules() if isinstance(m, LUTSoftmax)]
    try:
        for u in utterances:
            ane(u.feats)
    finally:
        for h in handles:
            h.remove()
    if not handles:
        return None  # no softmax attention (e.g. Performer blocks only)
    cap = resolve_max_squarings(setting, options["lut_range"], max(widest, 1), torch.float16)
    return {
        "uncapped": {str(k): n for k, n in sorted(uncapped.items())},
        "capped": {str(k): n for k, n in sorted(capped.items())},
        "cap": cap,
        "setting": str(setting),
        "range": options["lut_range"],
        "rows": sum(uncapped.values()),
        "rows_needing_rescaling": sum(n for k, n in uncapped.items() if k > 0),
    }


def format_summary(s: dict) -> str:
    eq = s["equivalence"]
    lines = [
        f"stabilize@{s['variant']}: ANE graph == trained model in FP32 on {eq['utterances']} utterances "
        f"(encoder max |diff| {eq['encoder_max_abs_diff']:.1e}, identical greedy transcripts)",
        f"{'mode':<20} {'WER %':>7} {'non-finite':>10}   stress x{s['stress']['gain']:g}: WER %  non-finite",
    ]
    for mode in s["wer"]:
        lines.append(
            f"{mode:<20} {s['wer'][mode]:>7.2f} {s['nonfinite_utterances'][mode]:>10}   "
            f"{s['stress']['wer'][mode]:>20.2f} {s['stress']['nonfinite_utterances'][mode]:>11}"
        )
    return "\n".join(lines)
