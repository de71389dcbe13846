"""`edgeconformer` command line.

    edgeconformer transcribe INPUT... --model models/dws [--method joint] [--beam 8] [--checkpoint best]
    edgeconformer transcribe recordings/ test.jsonl --model models/dws --output-format jsonl --score
    edgeconformer transcribe AUDIO... --model models/practical --first-pass    # a cascade's streaming pass alone

INPUTs are audio files of any length, format, sample rate and channel count, directories (searched recursively
for audio) and JSONL manifests (the prepare stage's format). Prints one line per file: `<path><TAB><transcript>`
(`--output-format jsonl`: one JSON object per file with duration, processing time, RTF and word timestamps).
Decoding defaults (method, beam, CTC weight) are the model's own (its train.decode settings). A file that cannot
be transcribed gets a message naming it on stderr, the other files are still transcribed, and the exit status is
the number of failed files (at most 125); docs/transcribe.md has the details.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from edgeconformer.artifacts import load_trained as load
from edgeconformer.decoding import METHODS
from edgeconformer.errors import UserError
from edgeconformer.longform import CTC_METHODS, Settings, decoding_defaults, transcribe_items
from edgeconformer.models.cascade import CascadedASR
from edgeconformer.models.lightning import FIRST_PASS_METHODS
from edgeconformer.transcribe_io import expand_inputs, json_row, score_outcomes, utterance_score


def load_trained(model_dir: str | Path, checkpoint: str = "best", seed: int | None = None):
    """models/<variant>[/s<seed>] -> ASRModule in eval mode (artifacts.load_trained: the default seed's run when
    no seed is given)."""

    return load(model_dir, checkpoint, seed)


def read_any_audio(path: str, sample_rate: int = 16000):
    """Any file soundfile reads -> (N,) float32 mono at `sample_rate` (downmixed and resampled as needed)."""

    audio, sr = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
    x = torch.from_numpy(audio.mean(axis=1))
    return AF.resample(x, sr, sample_rate) if sr != sample_rate else x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeconformer")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "transcribe", help="transcribe audio files, directories and JSONL manifests with a trained model"
    )
    # Added in this order, which is the order `edgeconformer transcribe --help` lists them in.
    _add_input_arguments(t)
    _add_decoding_arguments(t)
    _add_output_arguments(t)
    _add_run_arguments(t)
    args = parser.parse_args(argv)
    return transcribe_command(args)


def _add_input_arguments(t: argparse.ArgumentParser) -> None:
    """What to transcribe and with which trained model."""
    t.add_argument(
        "audio",
        nargs="+",
        metavar="INPUT",
        help="audio files (any length, format, sample rate, channels), directories (searched "
        "recursively) or JSONL manifests (audio_filepath, text, id)",
    )
    t.add_argument(
        "--model",
        required=True,
        help="a trained model: models/<variant> (the run of its lowest seed, seed 1 in the default chain) "
        "or one run's folder, models/<variant>/s<seed>",
    )
    t.add_argument("--seed", type=int, default=None, help="with --model models/<variant>: the run of this seed")
    t.add_argument("--checkpoint", default="best", help="checkpoint name in the folder: best or last")


def _add_decoding_arguments(t: argparse.ArgumentParser) -> None:
    """Decoding settings; None means the model's own train.decode setting."""
    t.add_argument("--method", default=None, choices=METHODS, help="default: the model's train.decode.method")
    t.add_argument("--beam", type=int, default=None, help="default: the model's train.decode.beam")
    t.add_argument(
        "--ctc-weight",
        type=float,
        default=None,
        help="CTC weight for joint decoding/rescoring; default: the model's train.decode.ctc_weight",
    )
    t.add_argument(
        "--first-pass",
        action="store_true",
        help="cascaded models: decode the causal first pass only (its CTC head; ctc_greedy or ctc_beam)",
    )


def _add_output_arguments(t: argparse.ArgumentParser) -> None:
    """What is printed: the output format and optional scoring against reference texts."""
    t.add_argument(
        "--output-format",
        default="tsv",
        choices=("tsv", "jsonl"),
        help="tsv: <path><TAB><transcript>; jsonl: one object per file with duration, processing "
        "time, RTF and word timestamps",
    )
    t.add_argument(
        "--score",
        action="store_true",
        help="score against the manifest's `text`: per-utterance rows and corpus WER/CER on stderr",
    )


def _add_run_arguments(t: argparse.ArgumentParser) -> None:
    """How the inputs are processed: batching, windowing of long inputs (None: longform's defaults), progress."""
    t.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="utterance-sized files decoded together (transcripts do not depend on it)",
    )
    t.add_argument("--chunk-seconds", type=float, default=None, help="long inputs: encoder window advance (default 8)")
    t.add_argument(
        "--context-seconds",
        type=float,
        default=None,
        help="long inputs: context encoded on each side of a window's chunk (default 1)",
    )
    t.add_argument(
        "--max-segment-seconds",
        type=float,
        default=None,
        help="longest stretch decoded in one piece; longer inputs are windowed (default 20)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar (shown for more than 5 inputs)")


def transcribe_command(args) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 1
    try:
        module = load_trained(args.model, args.checkpoint, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.first_pass:
        if not isinstance(module.model, CascadedASR):
            print(
                f"error: --first-pass: {args.model} is not a cascaded model (model.cascade.enabled=false); "
                "drop --first-pass",
                file=sys.stderr,
            )
            return 1
        if args.method is not None and args.method not in FIRST_PASS_METHODS:
            print(
                f"error: --first-pass decodes the first pass's CTC head: --method must be one of "
                f"{', '.join(FIRST_PASS_METHODS)}, got {args.method}",
                file=sys.stderr,
            )
            return 1
    defaults = decoding_defaults(module)
    method = args.method or defaults["method"]
    if args.first_pass and method not in CTC_METHODS:  # the model's default needs the second pass
        method = "ctc_greedy"
    given = {
        k: v
        for k, v in (
            ("chunk_seconds", args.chunk_seconds),
            ("context_seconds", args.context_seconds),
            ("max_segment_seconds", args.max_segment_seconds),
        )
        if v is not None
    }
    settings = Settings(
        method=method,
        beam=args.beam if args.beam is not None else defaults["beam"],
        ctc_weight=args.ctc_weight if args.ctc_weight is not None else defaults["ctc_weight"],
        first_pass=args.first_pass,
        timestamps=args.output_format == "jsonl",
        **given,
    )
    try:
        settings.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run_transcribe(
        module,
        args.audio,
        settings,
        output_format=args.output_format,
        score=args.score,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def run_transcribe(
    module,
    inputs: list[str],
    settings,
    output_format: str = "tsv",
    score: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> int:
    """Transcribes `inputs` with a loaded model, printing results in input order; returns the exit status."""

    items = expand_inputs(inputs)
    if score and not any((i.reference or "").strip() for i in items):
        print(
            "error: --score needs reference texts: give a JSONL manifest whose rows have a `text` field",
            file=sys.stderr,
        )
        return 1
    bar = tqdm(
        total=len(items), unit="file", file=sys.stderr, disable=not progress or len(items) <= 5, dynamic_ncols=True
    )

    def say(message):  # stderr lines that do not tear the progress bar
        if bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            bar.write(message, file=sys.stderr)

    outcomes = []
    failed = 0
    for o in transcribe_items(module, items, settings, batch_size):
        bar.update(1)
        if score:
            outcomes.append(o)
        if o.error:
            failed += 1
            say(f"error: {o.error}")
        for note in o.notes:
            say(f"warning: {o.item.path}: {note}")
        if output_format == "jsonl":
            row = json_row(o)
            if score and o.transcript is not None and (o.item.reference or "").strip():
                row.update(utterance_score(o.item.reference, o.transcript.text))
            print(json.dumps(row, ensure_ascii=False), flush=True)
        elif o.transcript is not None:
            print(f"{o.item.path}\t{o.transcript.text}", flush=True)
    bar.close()
    if score:
        _, lines = score_outcomes(outcomes)
        for line in lines[-1:] if output_format == "jsonl" else lines:
            print(line, file=sys.stderr)
    if failed:
        print(f"error: {failed} of {len(items)} inputs failed", file=sys.stderr)
    return min(failed, 125)


if __name__ == "__main__":
    sys.exit(main())
