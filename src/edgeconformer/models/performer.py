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
from einops import rearrange

TINY = 1e-30  # floor of the normaliser: a query with no visible key gets 0, not NaN


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

    def __init__(self, d_model, n_heads, dropout=0.0, n_features=64, seed=0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.n_features = n_features
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
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
        scale = self.d_head ** -0.25
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
        qf, kf, v = self.project(query, key, value)
        if chunk_size > 0:
            x = causal_linear_attention(qf, kf * mask[:, -1, None, :, None], v, chunk_size)
        elif mask.size(1) == 1:
            x = linear_attention(qf, kf, v, mask[:, 0])
        else:
            x = masked_linear_attention(qf, kf, v, mask)
        return self.merge(x, query.dtype)

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

    def state_bytes(self, batch=1):
        # Size of the streaming state in bytes (float32), independent of the context length.
        return 4 * batch * self.n_heads * self.n_features * (self.d_head + 1)
