import math

import pytest
import torch

from edgeconformer.models.asr import DualDecoderASR
from edgeconformer.models.attention import (
    MultiHeadAttention,
    RelPositionalEncoding,
    RelPositionMultiHeadAttention,
    chunk_attention_mask,
    make_pad_mask,
    position_scores,
    rel_shift,
)
from edgeconformer.models.conformer import ConformerEncoder
from edgeconformer.models.decoder import TransformerDecoder
from edgeconformer.models.subsampling import Conv2dSubsampling

IDIM = 20  # small feature dim keeps the tests fast; the geometry is the same as with 80 mel bins


def tiny_encoder(**kwargs):
    args = dict(idim=IDIM, d_model=64, n_layers=2, n_heads=4, ff_dim=128, kernel_size=7, dropout=0.0)
    args.update(kwargs)
    return ConformerEncoder(**args)


def right_edge(t, n_convs):
    # Last input frame read by subsampled frame t: each 3x3 stride-2 layer maps t -> 2t + 2.
    for _ in range(n_convs):
        t = 2 * t + 2
    return t


# ---------------------------------------------------------------- subsampling


@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("dws", [False, True])
def test_subsampling_lengths_match_output_sizes(factor, dws):
    sub = Conv2dSubsampling(IDIM, 32, factor=factor, dws=dws)
    for T in range(15, 140, 7):
        out, lengths = sub(torch.randn(1, T, IDIM), torch.tensor([T]))
        assert out.shape == (1, int(lengths), 32)
        assert int(lengths) == sub.subsample_lengths(T)
    # closed forms for padding-free stride-2 convs
    T = torch.arange(15, 500)
    expected = ((T - 1) // 2 - 1) // 2 if factor == 4 else (((T - 1) // 2 - 1) // 2 - 1) // 2
    assert torch.equal(sub.subsample_lengths(T), expected)


def test_dws_subsampling_structure():
    vanilla, dws = Conv2dSubsampling(80, 144, dws=False), Conv2dSubsampling(80, 144, dws=True)
    convs = [m for m in dws.conv if isinstance(m, torch.nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 144, 1]  # full first conv, then depthwise + pointwise
    assert convs[2].kernel_size == (1, 1)
    assert sum(p.numel() for p in dws.conv.parameters()) < sum(p.numel() for p in vanilla.conv.parameters()) / 5


@pytest.mark.parametrize("dws", [False, True])
def test_subsampling_valid_frames_ignore_padding(dws):
    torch.manual_seed(0)
    sub = Conv2dSubsampling(IDIM, 32, dws=dws).eval()
    x = torch.randn(1, 53, IDIM)
    alone, n = sub(x, torch.tensor([53]))
    padded = torch.cat([x, 100 * torch.randn(1, 40, IDIM)], dim=1)  # garbage padding
    batched, m = sub(padded, torch.tensor([53]))
    assert n == m
    torch.testing.assert_close(batched[:, : int(n)], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- masks and attention


def test_make_pad_mask():
    mask = make_pad_mask(torch.tensor([3, 1, 0]), 4)
    assert mask.tolist() == [[False, False, False, True], [False, True, True, True], [True, True, True, True]]


@pytest.mark.parametrize("chunk_size,left_chunks", [(1, -1), (3, -1), (3, 0), (2, 1), (4, 2), (0, -1), (-1, 3)])
def test_chunk_attention_mask_matches_definition(chunk_size, left_chunks):
    T = 11
    mask = chunk_attention_mask(T, chunk_size, left_chunks)
    for i in range(T):
        for j in range(T):
            if chunk_size <= 0:
                expected = True
            else:
                ci, cj = i // chunk_size, j // chunk_size
                lo = 0 if left_chunks < 0 else max(0, ci - left_chunks)
                expected = lo <= cj <= ci
            assert bool(mask[i, j]) == expected, (i, j)


def test_rel_shift_indexes_relative_positions():
    B, H, T = 2, 3, 6
    x = torch.randn(B, H, T, 2 * T - 1)  # column k = relative position (T-1) - k
    shifted = rel_shift(x)
    for i in range(T):
        for j in range(T):
            torch.testing.assert_close(shifted[:, :, i, j], x[:, :, i, (T - 1) - (i - j)], atol=0, rtol=0)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (3, 7), (2, 13), (5, 40)])
@pytest.mark.parametrize("max_blocks", [1, 2, 3, 4, 16])
def test_position_scores_in_row_blocks_equal_the_full_band(B, T, max_blocks):
    # Every blocking reads the same (query, position) pairs as rel_shift of the whole (2T-1)-column product:
    # values and both gradients agree (to rounding: the products' inner sums are split differently).
    torch.manual_seed(0)
    H, d = 2, 4
    q = torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True)
    p = torch.randn(H, d, 2 * T - 1, dtype=torch.float64, requires_grad=True)
    reference = rel_shift(torch.einsum("bthd,hdp->bhtp", q, p))  # (B, H, T, T)
    blocked = position_scores(q, p, max_blocks=max_blocks, min_rows=1)
    assert blocked.shape == (B, H, T, T)
    torch.testing.assert_close(blocked, reference, atol=1e-12, rtol=0)
    w = torch.randn(B, H, T, T, dtype=torch.float64)
    expected = torch.autograd.grad((reference * w).sum(), (q, p))
    got = torch.autograd.grad((blocked * w).sum(), (q, p))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


def test_position_scores_block_only_products_with_enough_rows():
    # A batch-1 utterance keeps one product (fewer, larger calls are faster there); a training batch is blocked.
    q = torch.randn(1, 149, 4, 36)
    p = torch.randn(4, 36, 297)
    calls = []
    with BmmColumns(calls):
        position_scores(q, p)
    assert len(calls) == 1
    calls.clear()
    with BmmColumns(calls):
        position_scores(q.expand(16, -1, -1, -1), p)
    assert len(calls) == 4 and all(c < 297 for c in calls)


class BmmColumns(torch.overrides.TorchFunctionMode):
    # records the column count of every torch.bmm
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.bmm:
            self.calls.append(args[1].size(-1))
        return func(*args, **(kwargs or {}))


def test_rel_positional_encoding_is_translation_invariant():
    # The embedding of relative position r is the same whatever the sequence length.
    enc = RelPositionalEncoding(16)
    _, short = enc(torch.zeros(1, 5, 16))
    _, long = enc(torch.zeros(1, 9, 16))
    # row 0 of short is +4, row 4 is 0; in long those are rows 4 and 8
    torch.testing.assert_close(short[0], long[0, 4:13])


@pytest.mark.parametrize("rel", [False, True])
def test_attention_excludes_masked_keys_exactly(rel):
    torch.manual_seed(0)
    D, T = 32, 7
    attn = (RelPositionMultiHeadAttention if rel else MultiHeadAttention)(D, 4).eval()
    x = torch.randn(2, T, D)
    pos = RelPositionalEncoding(D)(x)[1] if rel else None
    mask = ~make_pad_mask(torch.tensor([7, 4]), T).unsqueeze(1)  # (B, 1, T)
    out = attn(x, x, x, mask, pos)
    y = x.clone()
    y[1, 4:] += 1000.0  # masked keys/values of utterance 1
    out2 = attn(y, y, y, mask, pos)
    torch.testing.assert_close(out2[1, :4], out[1, :4], atol=1e-6, rtol=0)

    # A query that sees no key at all gets a zero attention context (output = output bias), not NaN.
    none = torch.zeros(2, T, T, dtype=torch.bool)
    out = attn(x, x, x, none, pos)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attn.out.bias.expand_as(out))


# ---------------------------------------------------------------- encoder


ENCODER_VARIANTS = [
    dict(dws_subsampling=False, pos="rel"),
    dict(dws_subsampling=True, pos="rel"),
    dict(dws_subsampling=False, pos="abs"),
    dict(dws_subsampling=True, pos="abs"),
    dict(dws_subsampling=True, pos="rel", chunk_size=4, causal=True),
    dict(dws_subsampling=False, pos="abs", chunk_size=3, left_chunks=1, causal=True),
    dict(dws_subsampling=False, pos="rel", subsampling_factor=8),
]


@pytest.mark.parametrize("variant", ENCODER_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_encoder_output_independent_of_batch_padding(variant):
    torch.manual_seed(0)
    enc = tiny_encoder(**variant).eval()
    lengths = [61, 140, 97]
    feats = [torch.randn(n, IDIM) for n in lengths]
    batch = 10 * torch.randn(len(lengths), max(lengths), IDIM)  # padding is garbage, not zeros
    for i, f in enumerate(feats):
        batch[i, : len(f)] = f
    with torch.no_grad():
        out, out_lengths = enc(batch, torch.tensor(lengths))
        for i, f in enumerate(feats):
            alone, n = enc(f[None], torch.tensor([len(f)]))
            assert int(n) == int(out_lengths[i]) == alone.size(1)
            torch.testing.assert_close(out[i, : int(n)], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", ["rel", "abs"])
@pytest.mark.parametrize("left_chunks", [-1, 1])
def test_chunk_attention_with_causal_conv_does_not_see_future_chunks(pos, left_chunks):
    torch.manual_seed(0)
    chunk = 4
    enc = tiny_encoder(pos=pos, chunk_size=chunk, left_chunks=left_chunks, causal=True).eval()
    T, p = 160, 90  # perturb input frames p.. (far beyond the first chunks)
    x = torch.randn(1, T, IDIM)
    y = x.clone()
    y[:, p:] += torch.randn(1, T - p, IDIM)
    # First subsampled frame whose receptive field (4t .. 4t+6) reaches frame p: it and everything in its
    # chunk may change (intra-chunk look-ahead); frames of earlier chunks may not.
    first_touched = next(t for t in range(T) if right_edge(t, 2) >= p)
    safe = (first_touched // chunk) * chunk
    assert safe > 2 * chunk
    with torch.no_grad():
        a, _ = enc(x, torch.tensor([T]))
        b, _ = enc(y, torch.tensor([T]))
    torch.testing.assert_close(b[:, :safe], a[:, :safe], atol=1e-5, rtol=0)
    assert not torch.allclose(b[:, safe : safe + chunk], a[:, safe : safe + chunk], atol=1e-4)


def test_full_attention_sees_future_and_noncausal_conv_leaks_across_chunks():
    torch.manual_seed(0)
    chunk, T, p = 4, 160, 90
    x = torch.randn(1, T, IDIM)
    y = x.clone()
    y[:, p:] += torch.randn(1, T - p, IDIM)
    first_touched = next(t for t in range(T) if right_edge(t, 2) >= p)
    safe = (first_touched // chunk) * chunk  # protected by chunk attention + causal conv (test above)
    for enc in [tiny_encoder(causal=True).eval(), tiny_encoder(chunk_size=chunk, causal=False).eval()]:
        with torch.no_grad():
            a, _ = enc(x, torch.tensor([T]))
            b, _ = enc(y, torch.tensor([T]))
        # full attention: every frame sees the perturbation; chunked attention with a centred conv
        # kernel: frames of earlier chunks see it through the conv's right context
        assert not torch.allclose(a[:, :safe], b[:, :safe], atol=1e-4)


def test_forward_chunk_override_and_dynamic_chunk_training():
    torch.manual_seed(0)
    enc = tiny_encoder(dynamic_chunk=True, causal=True)
    x, lengths = torch.randn(2, 100, IDIM), torch.tensor([100, 80])
    enc.train()
    out, _ = enc(x, lengths)
    out.sum().backward()
    enc.eval()
    with torch.no_grad():
        full, _ = enc(x, lengths)  # eval: no random chunking, deterministic
        again, _ = enc(x, lengths)
        chunked, _ = enc(x, lengths, chunk_size=2)
    torch.testing.assert_close(full, again)
    assert not torch.allclose(full, chunked)


def test_batchnorm_option_runs():
    enc = tiny_encoder(norm="batch")
    out, _ = enc(torch.randn(2, 60, IDIM), torch.tensor([60, 50]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError):
        tiny_encoder(norm="group")


# ---------------------------------------------------------------- hybrid CTC/attention model

VOCAB = 12  # 0 blank, 1 unk, 2 sos/eos, 3.. tokens


def tiny_asr(ctc_weight=0.3, with_decoder=True, lsm_weight=0.1):
    enc = tiny_encoder()
    dec = TransformerDecoder(VOCAB, d_model=64, n_heads=4, ff_dim=128, n_layers=2, dropout=0.0)
    return DualDecoderASR(enc, VOCAB, dec if with_decoder else None, ctc_weight=ctc_weight, lsm_weight=lsm_weight)


def padded_tokens(seqs, ignore_id=-1):
    out = torch.full((len(seqs), max(map(len, seqs))), ignore_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out, torch.tensor([len(s) for s in seqs])


def test_hybrid_loss_is_finite_and_combines_branches():
    torch.manual_seed(0)
    model = tiny_asr(ctc_weight=0.3)
    tokens, token_lengths = padded_tokens([[3, 4, 5], [6, 7]])
    out = model(torch.randn(2, 90, IDIM), torch.tensor([90, 70]), tokens, token_lengths)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    torch.testing.assert_close(out["loss"], 0.3 * out["loss_ctc"] + 0.7 * out["loss_att"])
    assert out["encoder_out"].shape[:2] == (2, int(out["encoder_lengths"].max()))
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ctc_only_model_needs_no_decoder():
    model = tiny_asr(ctc_weight=1.0, with_decoder=False)
    tokens, token_lengths = padded_tokens([[3, 4], [5]])
    out = model(torch.randn(2, 60, IDIM), torch.tensor([60, 40]), tokens, token_lengths)
    assert out["loss_att"] is None and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], out["loss_ctc"])
    with pytest.raises(ValueError):
        DualDecoderASR(tiny_encoder(), VOCAB, None, ctc_weight=0.5)


def test_ctc_loss_zero_infinity_for_too_short_input():
    model = tiny_asr(ctc_weight=1.0, with_decoder=False)
    tokens, token_lengths = padded_tokens([list(range(3, 12)) * 2])  # 18 tokens for 3 encoder frames
    out = model(torch.randn(1, 20, IDIM), torch.tensor([20]), tokens, token_lengths)
    assert torch.isfinite(out["loss"])


def test_decoder_step_and_sequence_score_match_teacher_forcing():
    torch.manual_seed(0)
    model = tiny_asr().eval()
    with torch.no_grad():
        enc, enc_len = model.encode(torch.randn(2, 80, IDIM), torch.tensor([80, 64]))
        one, length = enc[1:2], enc_len[1]  # the padded utterance: its memory must be trimmed
        hyps = [[3, 4, 5, 6], [7], [], [5, 5, 9]]

        step = model.attention_step_fn(one, length)
        by_steps = []
        for h in hyps:
            seq = [model.sos_eos] + h
            # all prefixes of this hypothesis in one batched call (different lengths -> right padding)
            log_probs = step([seq[: u + 1] for u in range(len(seq))])  # (U+1, V)
            targets = h + [model.sos_eos]
            by_steps.append(sum(float(log_probs[u, t]) for u, t in enumerate(targets)))

        score = model.sequence_score_fn(one, length)(hyps)
        assert score.shape == (len(hyps),)
        torch.testing.assert_close(score, torch.tensor(by_steps), atol=1e-4, rtol=0)

        # the batched decoder forward on the padded batch agrees with the trimmed single-utterance memory
        tokens, token_lengths = padded_tokens([hyps[0], hyps[0]])
        ys_in, ys_out, ys_lengths = model.decoder_io(tokens, token_lengths)
        log_probs = model.decoder(enc, enc_len, ys_in, ys_lengths)
        teacher = log_probs[1].gather(-1, ys_out[1].unsqueeze(-1)).sum()
        torch.testing.assert_close(teacher, score[0], atol=1e-4, rtol=0)

        # step returns normalised distributions
        torch.testing.assert_close(step([[2], [2, 3]]).exp().sum(-1), torch.ones(2))


def ctc_greedy(log_probs, length, blank=0):
    best = log_probs[:length].argmax(-1).tolist()
    return [t for i, t in enumerate(best) if t != blank and (i == 0 or t != best[i - 1])]


def test_tiny_model_overfits_a_few_utterances():
    torch.manual_seed(0)
    model = tiny_asr(ctc_weight=0.5, lsm_weight=0.0)
    targets = [[3, 4, 5], [6, 7, 8, 3], [9, 10], [11, 4, 6]]
    lengths = torch.tensor([72, 64, 56, 80])
    feats = torch.randn(len(targets), int(lengths.max()), IDIM)
    tokens, token_lengths = padded_tokens(targets)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        model.train()
        loss = model(feats, lengths, tokens, token_lengths)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                enc, enc_len = model.encode(feats, lengths)
                log_probs = model.ctc_log_probs(enc)
            hyps = [ctc_greedy(log_probs[i], int(enc_len[i])) for i in range(len(targets))]
            if hyps == targets:
                break
    assert hyps == targets, f"not overfit after {step + 1} steps: {hyps}"
    assert math.isfinite(loss.item())
