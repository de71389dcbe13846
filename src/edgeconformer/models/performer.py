"""FAVOR+ linear attention (Choromanski et al. 2021, "Rethinking Attention with Performers"), the attention of
the RNNAttention-Performer in Botros et al. 2023.

Softmax attention weighs key j for query i by exp(q_i.k_j / sqrt(d)). FAVOR+ writes that kernel as an
expectation over random features: with x' = x / d^(1/4) and rows w of W drawn from N(0, I_d),

    exp(q'.k') = E_w[phi(q') . phi(k')],      phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)      (m features)

phi is positive (no cancellation, so the normaliser stays positive) and the m rows of W are made orthogonal in
blocks of d (lower variance than i.i.d. rows). Then attention is a ratio of two linear maps of the query features,

    out_i = phi(q_i) . S / phi(q_i) . z,      S = sum_j phi(k_j) v_j^T  (m, d),   z = sum_j phi(k_j)  (m,)

so it costs O(T m d) instead of O(T^2 d), and in causal (prefix-sum) form the pair (S, z) is a constant-size
state carried from frame to frame: the "RNN" form used for streaming.

Forms (all exact rewrites of the same estimate; tests check they agree):
* non-causal: keys summed once (mask of shape (B, 1, Tk): key padding only);
* masked: phi(Q) phi(K)^T with any (B, Tq, Tk) mask applied before normalising, O(T^2): exact for any mask
  (limited left context included), and the causal parallel form the other causal forms are checked against;
* causal prefix sums (`causal_linear_attention`; forward with chunk_size > 0), O(T m d): what the encoder uses
  under a chunk/causal mask with unlimited left context;
* the recurrent `step` on one chunk/frame with the carried state (streaming).

Numerics: the per-query maximum is subtracted inside exp (a per-query constant cancels in the ratio). Keys get no
data-dependent shift, because a shift that depends on other frames would couple frames (future keys in causal
form); exp(w.k' - |k'|^2/2) <= exp(|w|^2/2) bounds them instead. That bound (about e^36 at d=36) overflows
float16, so features and state are always computed in float32 whatever the input dtype.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from edgeconformer.models.layout import TRAINING

TINY = 1e-30  # floor of the normaliser: a query with no visible key gets 0, not NaN
MASKED = 1.0e4  # subtracted from the key shifts of masked keys: exp(-1e4) = 0 in every format, and finite in FP16


def nonzero(x):
    # x where x != 0, else 1: a divisor that leaves every nonzero value exact (no floor constant, which FP16 would
    # round to 0 or which would change tiny FP32 values) and turns 0/0 into 0/1.
    return x + (x == 0).to(x.dtype)


def orthogonal_gaussian(m, d, seed):
    # (m, d) random features: blocks of d orthonormal rows (QR of a Gaussian matrix, signs fixed so the
    # block is Haar-distributed), each row rescaled to the norm of an independent N(0, I_d) vector so
    # every row is marginally N(0, I_d) and the estimator stays unbiased (FAVOR+, section 2.4).
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64, device="cpu"))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=g, dtype=torch.float64, device="cpu").norm(dim=1)
    return (w * norms[:, None]).float()


def positive_features(x, w, query):
    # x: (B, H, T, d) already scaled by d^(-1/4), w: (m, d) -> (B, H, T, m), float32
    x = x.float()
    z = torch.einsum("bhtd,md->bhtm", x, w) - 0.5 * (x * x).sum(-1, keepdim=True)
    if query:
        z = z - z.amax(-1, keepdim=True).detach()  # per-query constant: cancels in the normalised ratio
    return torch.exp(z) / math.sqrt(w.size(0))


def linear_attention(qf, kf, v, key_valid):
    # qf: (B, H, Tq, m), kf: (B, H, Tk, m), v: (B, H, Tk, d), key_valid: (B, Tk) True = real key -> (B, H, Tq, d)
    kf = kf * key_valid[:, None, :, None]
    kv = torch.einsum("bhtm,bhtd->bhmd", kf, v)  # S: (B, H, m, d)
    z = kf.sum(2)  # (B, H, m)
    num = torch.einsum("bhtm,bhmd->bhtd", qf, kv)
    den = torch.einsum("bhtm,bhm->bht", qf, z)
    return num / den.clamp_min(TINY)[..., None]


def masked_linear_attention(qf, kf, v, mask):
    # mask: (B, Tq, Tk) True = may attend. The quadratic form: exact for any mask (chunks, limited left context).
    a = torch.einsum("bhim,bhjm->bhij", qf, kf) * mask[:, None]  # (B, H, Tq, Tk) unnormalised weights
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(TINY)


def causal_linear_attention(qf, kf, v, chunk_size=1):
    # Prefix-sum form, O(T m d): frame t sees every frame of its own chunk (t // chunk_size) and all earlier ones
    # (chunk_size=1: strictly causal). Equals masked_linear_attention with chunk_attention_mask(T, chunk_size).
    B, H, T, m = qf.shape
    n = -(-T // chunk_size)
    pad = n * chunk_size - T  # zero features add nothing to the sums
    kf = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(B, H, n, chunk_size, m)
    vp = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, H, n, chunk_size, -1)
    kv = torch.einsum("bhncm,bhncd->bhnmd", kf, vp).cumsum(2)  # S after each chunk: (B, H, n, m, d)
    z = kf.sum(3).cumsum(2)  # (B, H, n, m)
    qf = torch.nn.functional.pad(qf, (0, 0, 0, pad)).view(B, H, n, chunk_size, m)
    num = torch.einsum("bhncm,bhnmd->bhncd", qf, kv)
    den = torch.einsum("bhncm,bhnm->bhnc", qf, z)
    out = num / den.clamp_min(TINY)[..., None]
    return out.reshape(B, H, n * chunk_size, -1)[:, :, :T]


class PerformerAttention(nn.Module):
    """Drop-in for MultiHeadAttention (same query/key/value/out projections, so softmax weights load into it).

    Relative-position terms have no counterpart here: pos_emb is accepted and ignored; positions reach the
    model through the convolution modules. There is no attention matrix to apply dropout to, so none is applied.
    The random features are a persistent buffer (saved with the model: inference must use the features the model
    was trained with); `redraw_features(seed)` draws new ones.
    """

    def __init__(self, d_model, n_heads, dropout=0.0, n_features=64, seed=0, layout=TRAINING):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.n_features = n_features
        self.channels_first, self.shift = layout.channels_first, layout.performer_shift
        self.query = layout.linear(d_model, d_model)
        self.key = layout.linear(d_model, d_model)
        self.value = layout.linear(d_model, d_model)
        self.out = layout.linear(d_model, d_model)
        # One (m, d_head) matrix shared by the heads; torch.empty follows a meta-device context (FLOP counting).
        self.register_buffer("features", torch.empty(n_features, self.d_head))
        self.redraw_features(seed)

    @torch.no_grad()
    def redraw_features(self, seed):
        if self.features.is_meta:
            return
        self.features.copy_(orthogonal_gaussian(self.n_features, self.d_head, seed))

    def project(self, query, key, value):
        # (B, T, D) x3 -> float32 query/key features (B, H, T, m) and values (B, H, Tk, d)
        scale = self.d_head**-0.25
        q = rearrange(self.query(query), "b t (h d) -> b h t d", h=self.n_heads) * scale
        k = rearrange(self.key(key), "b t (h d) -> b h t d", h=self.n_heads) * scale
        v = rearrange(self.value(value), "b t (h d) -> b h t d", h=self.n_heads)
        w = self.features.float()
        return positive_features(q, w, query=True), positive_features(k, w, query=False), v.float()

    def merge(self, x, dtype):
        # (B, H, T, d) float32 -> (B, T, D) in the input dtype
        return self.out(rearrange(x, "b h t d -> b t (h d)").to(dtype))

    def forward(self, query, key, value, mask, pos_emb=None, chunk_size=0):
        # query: (B, Tq, D), key/value: (B, Tk, D), mask: True = may attend, either (B, 1, Tk) key padding ->
        # linear form, or (B, Tq, Tk) -> masked form. chunk_size > 0 (self-attention) says the mask is the chunk
        # mask with unlimited left context (chunk_size=1: causal): the linear prefix-sum form then computes the
        # same, and the mask's last row (the last query sees every real key) gives the key padding.
        # Channels-first: query = key = value (B, D, 1, T), mask (1, T, 1, T) or None.
        if self.channels_first:
            return self.forward_heads(query, mask)
        qf, kf, v = self.project(query, key, value)
        if chunk_size > 0:
            x = causal_linear_attention(qf, kf * mask[:, -1, None, :, None], v, chunk_size)
        elif mask.size(1) == 1:
            x = linear_attention(qf, kf, v, mask[:, 0])
        else:
            x = masked_linear_attention(qf, kf, v, mask)
        return self.merge(x, query.dtype)

    # ------------------------------------------------------------------------------------- channels first
    def logits(self, x):
        # x: (B, d, 1, T) one head's queries or keys -> (B, m, 1, T): w_f.x' - |x'|^2 / 2, a 1x1 convolution by W
        x = x * self.d_head**-0.25
        return F.conv2d(x, self.features[:, :, None, None]) - 0.5 * (x * x).sum(1, keepdim=True)

    def forward_heads(self, x, mask=None):
        """x: (B, D, 1, T), mask: (1, T, 1, T) True where query i may attend key j, or None -> (B, D, 1, T).

        The masked parallel form, one head at a time, O(T^2 m) per head (the order of a softmax layer: the graph
        runs once per utterance; streaming on device would carry the recurrent (S, z) state of `step`). With
        a(q)_f = w_f.q' - |q'|^2/2 and b(k)_f = w_f.k' - |k'|^2/2, key j weighs A_ij = sum_f exp(a_if) exp(b_jf) / m
        for query i. The key features reach exp(|w_f|^2/2), about e^36 at d = 36, far past FP16's 65504 (e^11.1).
        `shift` (the layout's performer_shift) computes the same ratio from bounded factors (docs/stabilization.md
        section 8):

            A_ij = c_i * exp(beta_j - M_i) * sum_f exp(a_if - alpha_i) exp(b_jf - beta_j)

        alpha_i = max_f a_if, beta_j = max_f b_jf (each key's own maximum: no key underflows as a whole) and
        M_i = the maximum of beta_j over the keys query i sees, like a softmax's row maximum; c_i (one number per
        query) cancels in the normalised ratio, and so does the division of each row by its maximum. So every
        weight is <= 1 and the normaliser <= T: nothing overflows in FP16, for any input. Shifting keys by their
        own maximum couples a key to nothing else, and M_i is taken over the visible keys only, so the chunk mask
        keeps its meaning exactly. Without `shift` this is the trained model's arithmetic (per-query maximum only),
        which overflows in FP16.
        """
        d = self.d_head
        q = self.query(x).split(d, dim=1)  # H x (B, d, 1, T)
        k = self.key(x).split(d, dim=1)
        v = self.value(x).transpose(1, 3).split(d, dim=3)  # H x (B, T, 1, d)
        # the mask as 1/0 numbers, once per layer: a multiplier (plain) or a -1e4 bias on masked keys' shifts
        keep = None if mask is None else mask.to(x.dtype)  # (1, Tq, 1, Tk)
        heads = []
        for h in range(self.n_heads):
            a = self.logits(q[h])
            qf = torch.exp(a - a.amax(1, keepdim=True)).transpose(1, 3)  # (B, Tq, 1, m), max 1 per query
            b = self.logits(k[h])  # (B, m, 1, Tk)
            weights, norm = (self.shifted_weights if self.shift else self.plain_weights)(qf, b, keep)
            heads.append(torch.einsum("bqhk,bkhc->bqhc", weights, v[h]) / norm)  # (B, Tq, 1, d)
        return self.out(torch.cat(heads, dim=3).transpose(1, 3))  # (B, T, 1, D) -> (B, D, 1, T)

    def shifted_weights(self, qf, b, keep):
        # qf: (B, Tq, 1, m), b: (B, m, 1, Tk) -> weights (B, Tq, 1, Tk) and their row sums (B, Tq, 1, 1), FP16-safe
        beta = b.amax(1, keepdim=True)  # (B, 1, 1, Tk)
        # The feature sum in (0, m], unscaled: the trained model's 1/m would push small weights into FP16's
        # subnormals (measured: 8x the log-prob error). Then row i's per-key factors, and the row scaled to a
        # maximum of 1 (a per-query constant), so the normaliser stays <= T for any input.
        weights = torch.einsum("bqhc,bchk->bqhk", qf, torch.exp(b - beta))  # (B, Tq, 1, Tk)
        if keep is not None:
            beta = beta + (keep - 1.0) * MASKED  # (B, Tq, 1, Tk)
        weights = weights * torch.exp(beta - beta.amax(3, keepdim=True))  # 0 for masked keys
        weights = weights / nonzero(weights.amax(3, keepdim=True))
        return weights, nonzero(weights.sum(3, keepdim=True))  # the sum is >= 1 unless every weight is 0

    def plain_weights(self, qf, b, keep):
        # The trained model's arithmetic, its floor included (0 in FP16: 0/0 where all weights underflow)
        weights = torch.einsum("bqhc,bchk->bqhk", qf, torch.exp(b)) * (1.0 / self.n_features)
        if keep is not None:
            weights = weights * keep
        return weights, weights.sum(3, keepdim=True).clamp_min(TINY)  # (B, Tq, 1, 1)

    # ------------------------------------------------------------------------------------------ streaming
    def init_state(self, batch, device=None):
        # Constant-size streaming state: S = sum phi(k) v^T (B, H, m, d) and z = sum phi(k) (B, H, m), float32
        H, m, d = self.n_heads, self.n_features, self.d_head
        return (torch.zeros(batch, H, m, d, device=device), torch.zeros(batch, H, m, device=device))

    def step(self, x, state):
        # x: (B, c, D) the next chunk (c = 1: one frame), state from init_state or the previous step
        # -> (B, c, D), new state. Frames of the chunk see the whole chunk and everything before it.
        kv, z = state
        qf, kf, v = self.project(x, x, x)
        kv = kv + torch.einsum("bhtm,bhtd->bhmd", kf, v)
        z = z + kf.sum(2)
        num = torch.einsum("bhtm,bhmd->bhtd", qf, kv)
        den = torch.einsum("bhtm,bhm->bht", qf, z)
        return self.merge(num / den.clamp_min(TINY)[..., None], x.dtype), (kv, z)

    def stream_state(self, batch, device=None):
        # the attention part of a block's streaming state (ConformerBlock.stream_init)
        return {"attn": self.init_state(batch, device), "pos": None}

    def stream_step(self, h, state, left_frames, chunk_size):
        # ConformerBlock.stream_step's interface: state["attn"] is the constant-size (S, z) pair, which keeps the
        # sum over all past frames (so left_frames = -1: stream_init checks it)
        out, state["attn"] = self.step(h, state["attn"])
        return out

    def state_bytes(self, batch=1):
        # Size of the streaming state in bytes (float32), independent of the context length.
        return 4 * batch * self.n_heads * self.n_features * (self.d_head + 1)
