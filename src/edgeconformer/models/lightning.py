"""The one LightningModule: wires front end, model, loss, optimiser, decoding and WER.

The plain modules (features, encoder, decoders) take tensors and lengths; only this file and `build_model` read
configs. Determinism: every random draw of a training step is seeded by (seed, global step), and the data order by
(seed, epoch), so resuming from an epoch-end checkpoint replays exactly what an uninterrupted run would do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import jiwer
import lightning as L
import torch

from edgeconformer.data.features import GlobalCMVN, LogMelFilterbank, SpecAugment
from edgeconformer.data.tokenizer import BLANK_ID, SOS_EOS_ID
from edgeconformer.decoding import decode
from edgeconformer.errors import UserError
from edgeconformer.files import load_weights, write_json_atomic
from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.cascade import CascadedASR
from edgeconformer.models.config import ModelConfig
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.models.decoder import TransformerDecoder

FIRST_PASS_METHODS = ("ctc_greedy", "ctc_beam")  # the attention decoder reads the second pass


def build_model(m: ModelConfig | Mapping, vocab_size: int) -> DualDecoderASR:
    """Model config (conf/model/*.yaml, a ModelConfig or its dict) -> DualDecoderASR (CascadedASR when
    model.cascade.enabled). The encoder is built from the config's resolved EncoderDims, which it records."""
    m = ModelConfig.from_dict(m)
    encoder = ConformerEncoder.from_dims(m.encoder_dims())
    decoder = None
    if m.ctc_weight < 1:
        d = m.decoder
        decoder = TransformerDecoder(vocab_size, encoder.d_model, d.n_heads, d.ff_dim, d.n_layers, d.dropout)
    heads = dict(ctc_weight=m.ctc_weight, lsm_weight=m.lsm_weight, blank=BLANK_ID, sos_eos=SOS_EOS_ID)
    if m.cascade.enabled:
        return CascadedASR(encoder, vocab_size, decoder, **heads, first_pass_weight=m.cascade.first_pass_weight)
    return DualDecoderASR(encoder, vocab_size, decoder, **heads)


NOT_INITIALISED = ("skipped_batches",)  # counters of the earlier run, not weights


def load_matching_weights(module: torch.nn.Module, path: str | Path) -> dict:
    """Fine-tuning start (`train.init_from`): copies every tensor of checkpoint `path` (a .ckpt file or a model
    folder, then its best.ckpt) whose name and shape match into `module`; the others keep their initial values.
    Returns what happened: counts and the names of missing (not in the checkpoint, or another shape),
    unexpected (only in the checkpoint) and shape-mismatched tensors. Training counters are not copied."""
    path = Path(path)
    ckpt_path = path / "best.ckpt" if path.is_dir() else path
    if not ckpt_path.is_file():
        raise UserError(
            f"train.init_from={str(path)!r}: no checkpoint there; give a .ckpt file or a trained model "
            "folder (models/<variant>) holding best.ckpt"
        )
    ckpt = load_weights(ckpt_path, "train.init_from")
    state = {k: v for k, v in ckpt.get("state_dict", ckpt).items() if k not in NOT_INITIALISED}
    own = module.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(loaded, strict=False)
    return {
        "path": str(ckpt_path),
        "loaded": len(loaded),
        "total": len(own),
        "missing": sorted(k for k in own if k not in loaded and k not in NOT_INITIALISED),
        "unexpected": sorted(k for k in state if k not in own),
        "shape_mismatch": sorted(k for k in state if k in own and own[k].shape != state[k].shape),
    }


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then inverse square root (Noam), cosine to min_ratio, or constant."""
    warmup = max(1, warmup)

    def f(step: int) -> float:
        s = step + 1
        if s <= warmup:
            return s / warmup
        if schedule == "inverse_sqrt":
            return math.sqrt(warmup / s)
        if schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


def word_error_rate(refs: list[str], hyps: list[str]) -> tuple[float, float]:
    """(WER %, CER %) over a corpus; references are never empty (prepare rejects empty transcripts)."""
    if not refs:
        return float("nan"), float("nan")
    return 100 * jiwer.wer(refs, hyps), 100 * jiwer.cer(refs, hyps)


class ASRModule(L.LightningModule):
    def __init__(
        self, model: dict | ModelConfig, optim: dict, vocab_size: int, seed: int = 0, decode: dict | None = None
    ):
        super().__init__()
        if isinstance(model, ModelConfig):
            model = model.to_dict()
        self.save_hyperparameters()
        config = ModelConfig.from_dict(model)  # hparams keep the plain dict (weights_only loading)
        self.fbank = LogMelFilterbank(n_mels=config.n_mels)
        self.cmvn = GlobalCMVN(config.n_mels)
        self.specaug = SpecAugment(**config.to_dict()["specaug"])
        self.model = build_model(config, vocab_size)
        self.tokenizer = None  # set by the caller; needed for WER and transcripts, not for the loss
        self.register_buffer("skipped_batches", torch.zeros((), dtype=torch.long))
        self._val: list[tuple[str, str]] = []
        self._val_first: list[tuple[str, str]] = []  # cascade: first-pass transcripts
        self.init_report: dict | None = None  # what train.init_from loaded
        self.audio_seconds_seen = 0.0  # throughput of this process (not checkpointed)

    # ---------------------------------------------------------------------------------------- features
    def features(self, audio: torch.Tensor, audio_lengths: torch.Tensor):
        """(B, N) waveforms -> normalised (B, T, n_mels) features and (B,) frame lengths."""
        feats, lengths = self.fbank(audio, audio_lengths)
        return self.cmvn(feats, lengths), lengths

    def _batch_features(self, batch):
        # Batches carry precomputed log-mels ("feats") in training, raw audio at inference.
        if "feats" in batch:
            return self.cmvn(batch["feats"], batch["feat_lengths"]), batch["feat_lengths"]
        return self.features(batch["audio"], batch["audio_lengths"])

    # ---------------------------------------------------------------------------------------- training
    def setup(self, stage: str):
        # train.init_from: start from another checkpoint's matching weights (e.g. softmax -> Performer fine-tune).
        # setup runs before Lightning restores a checkpoint to resume from, so resuming still wins.
        path = self.hparams.optim.get("init_from")
        if stage != "fit" or not path:
            return
        self.init_report = load_matching_weights(self, path)
        r = self.init_report
        print(
            f"init_from {r['path']}: loaded {r['loaded']} of {r['total']} tensors; missing {r['missing']}; "
            f"unexpected {r['unexpected']}; shape mismatch {r['shape_mismatch']}"
        )
        if self.trainer.is_global_zero:
            write_json_atomic(Path(self.trainer.default_root_dir) / "init_from.json", r)

    def training_step(self, batch, batch_idx):
        # Every random draw of a step (dropout via the global RNG, SpecAugment via its generator) is a function
        # of (seed, global step), so a resumed run replays exactly what the uninterrupted one would.
        step_seed = self.hparams.seed * 1_000_003 + self.global_step
        torch.manual_seed(step_seed)
        feats, lengths = self._batch_features(batch)
        feats = self.specaug(feats, lengths, generator=torch.Generator().manual_seed(step_seed))
        out = self.model(feats, lengths, batch["tokens"], batch["token_lengths"])
        loss = out["loss"]
        if not torch.isfinite(loss):
            # Skip the update (returning None makes Lightning skip backward and the optimiser step), count it.
            self.skipped_batches += 1
            self.log("train/skipped_batches", self.skipped_batches.float(), on_step=True, batch_size=feats.size(0))
            return None
        bs = feats.size(0)
        self.audio_seconds_seen += float(lengths.sum()) * self.fbank.hop_length / self.fbank.sample_rate
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for name in ("loss_ctc", "loss_att", "loss_first_pass", "loss_second_pass"):
            if out.get(name) is not None:
                self.log(f"train/{name}", out[name], on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=bs)
        self.log("train/skipped_batches", self.skipped_batches.float(), on_step=True, batch_size=bs)
        return loss

    def make_optimizer(self) -> torch.optim.AdamW:
        o = self.hparams.optim
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            # No weight decay on biases, norms and the attention position biases (standard practice).
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        # fused: one kernel over all parameters instead of a dozen tensor ops per parameter (same update rule);
        # measured on 2 CPU threads for the small encoder's parameters: 13.8 ms -> 2.8 ms per step. Not under a
        # mixed precision: Lightning's AMP plugin refuses gradient clipping for optimizers that unscale themselves.
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        fused = "mixed" not in precision and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"],
            betas=tuple(o["betas"]),
            fused=fused or None,
        )

    def configure_optimizers(self):
        o = self.hparams.optim
        opt = self.make_optimizer()
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o["schedule"], o["warmup_steps"], total, o["min_lr_ratio"])
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------------------------------- validation
    def validation_step(self, batch, batch_idx):
        feats, lengths = self._batch_features(batch)
        out = self.model(feats, lengths, batch["tokens"], batch["token_lengths"])
        self.log("val/loss", out["loss"], on_epoch=True, prog_bar=True, batch_size=feats.size(0))
        hyps = self.decode_encoder_output(out["encoder_out"], out["encoder_lengths"], method="ctc_greedy")
        self._val += list(zip(batch["texts"], hyps))
        if "first_pass_out" in out:  # cascade: val/wer is the second pass, val/wer_first_pass the streaming one
            self.log("val/loss_first_pass", out["loss_first_pass"], on_epoch=True, batch_size=feats.size(0))
            hyps = self.decode_first_pass(out["first_pass_out"], out["encoder_lengths"])
            self._val_first += list(zip(batch["texts"], hyps))

    def on_validation_epoch_end(self):
        refs, hyps = zip(*self._val) if self._val else ((), ())
        wer, cer = word_error_rate(list(refs), list(hyps))
        self.log("val/wer", wer, prog_bar=True)
        self.log("val/cer", cer)
        self._val = []
        if self._val_first:
            refs, hyps = zip(*self._val_first)
            wer, cer = word_error_rate(list(refs), list(hyps))
            self.log("val/wer_first_pass", wer, prog_bar=True)
            self.log("val/cer_first_pass", cer)
            self._val_first = []

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def decode_encoder_output(
        self, encoder_out, encoder_lengths, method="ctc_greedy", beam=8, ctc_weight=0.3
    ) -> list[str]:
        """(B, T', D) encoder output -> B transcripts (upper case) with one of decoding.METHODS."""
        log_probs = self.model.ctc_log_probs(encoder_out)  # (B, T', V)
        texts = []
        for i in range(encoder_out.size(0)):
            T = int(encoder_lengths[i])
            kwargs = {}
            if method in ("attention", "joint"):
                kwargs["step_fn"] = self.model.attention_step_fn(encoder_out[i : i + 1], T)
            if method == "rescoring":
                kwargs["score_fn"] = self.model.sequence_score_fn(encoder_out[i : i + 1], T)
            ids = decode(
                method,
                log_probs[i, :T],
                sos_eos=SOS_EOS_ID,
                beam=beam,
                ctc_weight=ctc_weight,
                blank=BLANK_ID,
                max_len=T,
                **kwargs,
            )
            texts.append(self.tokenizer.decode(ids))
        return texts

    @torch.no_grad()
    def decode_first_pass(self, first_out, lengths, method="ctc_greedy", beam=8) -> list[str]:
        """Cascade: (B, T', D1) first-pass output -> B transcripts from the first-pass CTC head."""
        if method not in FIRST_PASS_METHODS:
            raise ValueError(
                f"the first pass has only a CTC head: method must be one of {FIRST_PASS_METHODS}, got {method!r}"
            )
        log_probs = self.model.first_pass_log_probs(first_out)  # (B, T', V)
        return [
            self.tokenizer.decode(decode(method, log_probs[i, : int(lengths[i])], beam=beam, blank=BLANK_ID))
            for i in range(first_out.size(0))
        ]

    @torch.no_grad()
    def transcribe(
        self,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        method="ctc_greedy",
        beam=8,
        ctc_weight=0.3,
        first_pass=False,
    ) -> list[str]:
        feats, lengths = self.features(audio, audio_lengths)
        if first_pass:  # cascade: the streaming first pass only (CTC methods)
            first_out, lengths = self.model.encode_first_pass(feats, lengths)
            return self.decode_first_pass(first_out, lengths, method, beam)
        encoder_out, encoder_lengths = self.model.encode(feats, lengths)
        return self.decode_encoder_output(encoder_out, encoder_lengths, method, beam, ctc_weight)
