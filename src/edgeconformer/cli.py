"""`edgeconformer` command line.

    edgeconformer transcribe AUDIO... --model models/dws [--method joint] [--beam 8] [--checkpoint best]
    edgeconformer transcribe AUDIO... --model models/practical --first-pass    # a cascade's streaming pass alone

prints one line per file: `<path><TAB><transcript>`. Unreadable files get a clear message on stderr, the other
files are still transcribed, and the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeconformer.decoding import METHODS


def load_trained(model_dir: str | Path, checkpoint: str = "best", seed: int | None = None):
    """models/<variant>[/s<seed>] -> ASRModule in eval mode (artifacts.load_trained: the default seed's run when
    no seed is given)."""
    from edgeconformer.artifacts import load_trained as load

    return load(model_dir, checkpoint, seed)


def read_any_audio(path: str, sample_rate: int = 16000):
    """Any file soundfile reads -> (N,) float32 mono at `sample_rate` (downmixed and resampled as needed)."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    audio, sr = sf.read(path, dtype="float32", always_2d=True)  # (N, C)
    x = torch.from_numpy(audio.mean(axis=1))
    return AF.resample(x, sr, sample_rate) if sr != sample_rate else x


def transcribe_files(module, paths: list[str], method: str, beam: int, ctc_weight: float, first_pass: bool = False):
    """Yields (path, transcript or None, error or None), one file at a time (batch 1: no padding)."""
    import torch

    for path in paths:
        try:
            audio = read_any_audio(path, module.fbank.sample_rate)
        except Exception as e:  # soundfile raises several types for missing/corrupt/unsupported files
            yield path, None, (f"{path}: cannot read audio ({type(e).__name__}: {e}); expected a readable "
                               "WAV/FLAC/OGG file")
            continue
        if audio.numel() < module.fbank.win_length * 8:  # fewer frames than the subsampling needs
            yield path, None, f"{path}: audio too short to transcribe ({audio.numel() / 16000:.3f} s)"
            continue
        text = module.transcribe(audio[None], torch.tensor([audio.numel()]), method=method, beam=beam,
                                 ctc_weight=ctc_weight, first_pass=first_pass)[0]
        yield path, text, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeconformer")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe 16 kHz audio files with a trained model")
    t.add_argument("audio", nargs="+", help="audio files (FLAC/WAV, 16 kHz mono)")
    t.add_argument("--model", required=True,
                   help="a trained model: models/<variant> (the run of its lowest seed, seed 1 in the default chain) "
                        "or one run's folder, models/<variant>/s<seed>")
    t.add_argument("--seed", type=int, default=None, help="with --model models/<variant>: the run of this seed")
    t.add_argument("--checkpoint", default="best", help="checkpoint name in the folder: best or last")
    t.add_argument("--method", default="ctc_greedy", choices=METHODS)
    t.add_argument("--beam", type=int, default=8)
    t.add_argument("--ctc-weight", type=float, default=0.3, help="CTC weight for joint decoding/rescoring")
    t.add_argument("--first-pass", action="store_true",
                   help="cascaded models: decode the causal first pass only (its CTC head; ctc_greedy or ctc_beam)")
    args = parser.parse_args(argv)

    import torch

    from edgeconformer.errors import UserError

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        module = load_trained(args.model, args.checkpoint, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.first_pass:
        from edgeconformer.models.cascade import CascadedASR
        from edgeconformer.models.lightning import FIRST_PASS_METHODS

        if not isinstance(module.model, CascadedASR):
            print(f"error: --first-pass: {args.model} is not a cascaded model (model.cascade.enabled=false); "
                  "drop --first-pass", file=sys.stderr)
            return 1
        if args.method not in FIRST_PASS_METHODS:
            print(f"error: --first-pass decodes the first pass's CTC head: --method must be one of "
                  f"{', '.join(FIRST_PASS_METHODS)}, got {args.method}", file=sys.stderr)
            return 1
    failed = 0
    for path, text, error in transcribe_files(module, args.audio, args.method, args.beam, args.ctc_weight,
                                              args.first_pass):
        if error:
            failed += 1
            print(f"error: {error}", file=sys.stderr)
        else:
            print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
