"""Hybrid CTC/attention ASR model (Watanabe et al. 2017, as in ESPnet/WeNet): a shared encoder, a CTC
head and an optional attention decoder, trained on ctc_weight * CTC + (1 - ctc_weight) * attention."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def label_smoothing_loss(log_probs, targets, smoothing, ignore_id):
    # log_probs: (B, U, V), targets: (B, U) with ignore_id at padding. KL divergence to the smoothed
    # one-hot distribution (WeNet's LabelSmoothingLoss), summed over tokens and divided by the batch size.
    B, _, V = log_probs.shape
    valid = targets != ignore_id
    log_probs, targets = log_probs[valid], targets[valid]  # (N, V), (N,)
    true_dist = torch.full_like(log_probs, smoothing / (V - 1))
    true_dist.scatter_(1, targets.unsqueeze(1), 1.0 - smoothing)
    return F.kl_div(log_probs, true_dist, reduction="sum") / B


def ctc_loss(log_probs, lengths, tokens, token_lengths, blank, ignore_id):
    # log_probs: (B, T', V), tokens: (B, U) padded with ignore_id. Summed over the batch and divided by B (not by
    # target length, the ESPnet/WeNet convention); zero_infinity drops utterances too short for their transcript
    # instead of returning inf.
    B = log_probs.size(0)
    targets = tokens.masked_fill(tokens == ignore_id, blank)  # values past the length are unused
    return (
        F.ctc_loss(
            log_probs.transpose(0, 1).float(),
            targets,
            lengths,
            token_lengths,  # (T', B, V) as it wants
            blank=blank,
            reduction="sum",
            zero_infinity=True,
        )
        / B
    )


class DualDecoderASR(nn.Module):
    def __init__(
        self, encoder, vocab_size, decoder=None, ctc_weight=0.3, lsm_weight=0.1, blank=0, sos_eos=2, ignore_id=-1
    ):
        super().__init__()
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
        if decoder is None and ctc_weight < 1.0:
            raise ValueError("an attention decoder is required unless ctc_weight == 1")
        self.encoder = encoder
        self.ctc = nn.Linear(encoder.d_model, vocab_size)
        self.decoder = decoder
        self.vocab_size = vocab_size
        self.ctc_weight = ctc_weight
        self.lsm_weight = lsm_weight
        self.blank = blank
        self.sos_eos = sos_eos
        self.ignore_id = ignore_id

    def encode(self, feats, lengths, **chunking):
        # (B, T, F), (B,) -> (B, T', D), (B,); chunking: optional chunk_size/left_chunks overrides
        return self.encoder(feats, lengths, **chunking)

    def ctc_log_probs(self, encoder_out):
        # (B, T', D) -> (B, T', V)
        return F.log_softmax(self.ctc(encoder_out), dim=-1)

    def decoder_io(self, tokens, token_lengths):
        # tokens: (B, U) padded with ignore_id -> ys_in (B, U+1) = <sos> y, ys_out (B, U+1) = y <eos>.
        # ys_in is padded with <eos> (a real id the embedding accepts; the decoder masks it anyway),
        # ys_out with ignore_id so padding is excluded from the loss.
        B = tokens.size(0)
        sos = tokens.new_full((B, 1), self.sos_eos)
        ys_in = torch.cat([sos, tokens.masked_fill(tokens == self.ignore_id, self.sos_eos)], dim=1)
        ys_out = torch.cat([tokens, tokens.new_full((B, 1), self.ignore_id)], dim=1)
        ys_out[torch.arange(B, device=tokens.device), token_lengths] = self.sos_eos
        return ys_in, ys_out, token_lengths + 1

    def forward(self, feats, feat_lengths, tokens, token_lengths):
        # feats: (B, T, F), tokens: (B, U) padded with ignore_id
        encoder_out, encoder_lengths = self.encode(feats, feat_lengths)
        losses = self.losses(encoder_out, encoder_lengths, tokens, token_lengths)
        return dict(**losses, encoder_out=encoder_out, encoder_lengths=encoder_lengths)

    def losses(self, encoder_out, encoder_lengths, tokens, token_lengths):
        # The hybrid loss of an encoder output: dict(loss, loss_ctc, loss_att), None for a branch not trained.
        loss_ctc = None
        if self.ctc_weight > 0:
            loss_ctc = ctc_loss(
                self.ctc_log_probs(encoder_out), encoder_lengths, tokens, token_lengths, self.blank, self.ignore_id
            )

        loss_att = None
        if self.ctc_weight < 1:
            ys_in, ys_out, ys_lengths = self.decoder_io(tokens, token_lengths)
            att_log_probs = self.decoder(encoder_out, encoder_lengths, ys_in, ys_lengths)  # (B, U+1, V)
            loss_att = label_smoothing_loss(att_log_probs.float(), ys_out, self.lsm_weight, self.ignore_id)

        if loss_att is None:
            loss = loss_ctc
        elif loss_ctc is None:
            loss = loss_att
        else:
            loss = self.ctc_weight * loss_ctc + (1 - self.ctc_weight) * loss_att
        return dict(loss=loss, loss_ctc=loss_ctc, loss_att=loss_att)

    def _memory(self, encoder_out_one, length):
        # Drop the padded tail once, so the decoder needs no memory mask afterwards.
        if self.decoder is None:
            raise RuntimeError("this model has no attention decoder (ctc_weight == 1)")
        return encoder_out_one[:, : int(length)]  # (1, T, D)

    def attention_step_fn(self, encoder_out_one, length):
        # -> fn(prefixes: list[list[int]], each starting with <sos>) -> (N, V) next-token log-probs
        memory = self._memory(encoder_out_one, length)

        def step(prefixes):
            lengths = torch.tensor([len(p) for p in prefixes], device=memory.device)
            padded = torch.full((len(prefixes), int(lengths.max())), self.sos_eos, dtype=torch.long)
            for i, p in enumerate(prefixes):
                padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            return self.decoder.step(memory, padded.to(memory.device), lengths)

        return step

    def sequence_score_fn(self, encoder_out_one, length):
        # -> fn(hyps: list[list[int]] of token ids without <sos>/<eos>) -> (N,) teacher-forced
        # log P(y_1 .. y_U, <eos> | x), e.g. for attention rescoring of CTC n-best lists.
        memory = self._memory(encoder_out_one, length)

        @torch.no_grad()
        def score(hyps):
            # A leading <sos> is tolerated (sos_eos is never a regular token), so prefixes can be passed as is.
            hyps = [h[1:] if h and h[0] == self.sos_eos else h for h in hyps]
            N = len(hyps)
            lengths = torch.tensor([len(h) for h in hyps], dtype=torch.long, device=memory.device)
            tokens = torch.full((N, max(int(lengths.max()), 1)), self.ignore_id, dtype=torch.long, device=memory.device)
            for i, h in enumerate(hyps):
                tokens[i, : len(h)] = torch.tensor(h, dtype=torch.long)
            ys_in, ys_out, ys_lengths = self.decoder_io(tokens, lengths)
            memory_lengths = torch.full((N,), memory.size(1), dtype=torch.long, device=memory.device)
            log_probs = self.decoder(memory.expand(N, -1, -1), memory_lengths, ys_in, ys_lengths)  # (N, U+1, V)
            valid = ys_out != self.ignore_id
            picked = log_probs.gather(-1, ys_out.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, U+1)
            return (picked * valid).sum(-1)

        return score
