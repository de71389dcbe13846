"""Cascaded encoder (Botros et al. 2023; Narayanan et al. 2021): one model, two passes.

The encoder is a ConformerEncoder built with `first_pass_layers=N`: blocks 0..N-1 are the causal, streamable
first pass (causal convolutions, chunk mask), the remaining blocks a non-causal second pass over the first pass's
output. The first pass has its own CTC head (a streaming transcript); the second pass has the model's regular CTC
head and attention decoder, so everything written for DualDecoderASR (decoding, rescoring, FLOP counting) reads
the second pass. Both are trained together:

    loss = first_pass_weight * CTC(first pass) + (1 - first_pass_weight) * hybrid CTC/attention loss(second pass)
"""

import torch.nn as nn
import torch.nn.functional as F

from edgeconformer.models.asr import DualDecoderASR, ctc_loss


class CascadedASR(DualDecoderASR):
    def __init__(
        self,
        encoder,
        vocab_size,
        decoder=None,
        ctc_weight=0.3,
        lsm_weight=0.1,
        blank=0,
        sos_eos=2,
        ignore_id=-1,
        first_pass_weight=0.5,
    ):
        super().__init__(
            encoder,
            vocab_size,
            decoder,
            ctc_weight=ctc_weight,
            lsm_weight=lsm_weight,
            blank=blank,
            sos_eos=sos_eos,
            ignore_id=ignore_id,
        )
        if encoder.first_pass_layers < 1:
            raise ValueError("a cascaded model needs an encoder built with first_pass_layers >= 1")
        if not 0.0 <= first_pass_weight <= 1.0:
            raise ValueError(f"first_pass_weight must be in [0, 1], got {first_pass_weight}")
        self.first_pass_weight = first_pass_weight
        self.ctc_first = nn.Linear(encoder.first_pass_d_model, vocab_size)

    def encode_first_pass(self, feats, lengths, **chunking):
        # (B, T, F), (B,) -> first-pass output (B, T', D1), (B,); the second pass is not run
        first, _, lengths = self.encoder.forward_passes(feats, lengths, second_pass=False, **chunking)
        return first, lengths

    def first_pass_log_probs(self, first_out):
        # (B, T', D1) -> (B, T', V)
        return F.log_softmax(self.ctc_first(first_out), dim=-1)

    def forward(self, feats, feat_lengths, tokens, token_lengths):
        first, encoder_out, encoder_lengths = self.encoder.forward_passes(feats, feat_lengths)
        second = self.losses(encoder_out, encoder_lengths, tokens, token_lengths)
        loss_first = ctc_loss(
            self.first_pass_log_probs(first), encoder_lengths, tokens, token_lengths, self.blank, self.ignore_id
        )
        w = self.first_pass_weight
        return dict(
            loss=w * loss_first + (1 - w) * second["loss"],
            loss_ctc=second["loss_ctc"],
            loss_att=second["loss_att"],
            loss_first_pass=loss_first,
            loss_second_pass=second["loss"],
            encoder_out=encoder_out,
            encoder_lengths=encoder_lengths,
            first_pass_out=first,
        )
