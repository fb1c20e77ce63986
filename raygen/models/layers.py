"""The LlamaGen transformer substrate shared by the token families (ar, arpg, nar, ctf), and
the ViT/DiT pieces shared by the diffusion families (emigm, d2it) at the end.

Module and parameter names follow LlamaGen's `autoregressive/models/gpt.py`
(`attention.wqkv`, `attention.wo`, `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`,
`cls_embedding.embedding_table`), so a family built from these blocks has the same
state-dict keys and shapes as the official checkpoints. Everything here is single-device
PyTorch: the caller picks the device, dtype and random generator.

Axis letters: B batch, L sequence, S cached keys, H heads, D model width, K head width.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

INIT_STD = 0.02  # LlamaGen's initializer_range: N(0, 0.02) for every Linear/Embedding weight


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


def ffn_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: 2/3 of 4*dim, rounded up (768->2048, 1024->2816, 1280->3584)."""
    return find_multiple(int(2 * 4 * dim / 3), multiple_of)


# --- 2D rotary position embedding ----------------------------------------------------


def precompute_freqs_cis_2d(
    grid_size: int,
    head_dim: int,
    base: float = 10000.0,
    cls_token_num: int = 1,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """cos/sin table (cls_token_num + grid*grid, head_dim//2, 2) in raster order, float32.

    Rotation pairs [0, head_dim//4) turn with the ROW index and pairs [head_dim//4,
    head_dim//2) with the COLUMN index; both use freqs = 1 / base**(2i / (head_dim//2)).
    The class-token rows are all ZERO (cos = sin = 0), not the identity rotation: the class
    token's q and k therefore become zero vectors. That is a LlamaGen quirk, kept on purpose
    for parity with its checkpoints and with ARPG/NAR, which inherit it.
    """
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device=device)[: half // 2].float() / half
    freqs = 1.0 / (base**exponents)  # (K/4,)
    t = torch.arange(grid_size, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (G, K/4)
    grid = torch.cat(
        [
            repeat(angles, "r p -> r c p", c=grid_size),  # first quarter: row index
            repeat(angles, "c p -> r c p", r=grid_size),  # second quarter: column index
        ],
        dim=-1,
    )  # (G, G, K/2)
    cache = rearrange(torch.stack([grid.cos(), grid.sin()], dim=-1), "r c p two -> (r c) p two")
    cls = torch.zeros(cls_token_num, half, 2, device=device)  # the zero rows (see above)
    return torch.cat([cls, cache])  # (cls + G*G, K/2, 2)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, L, H, K) by freqs (L or B L, K/2, 2).

    out[2i] = x[2i] cos - x[2i+1] sin and out[2i+1] = x[2i+1] cos + x[2i] sin, computed in
    float32 (as one complex product, 3 kernels instead of 9) and cast back to x.dtype. A
    (B, L, K/2, 2) table gives every sample its own positions (e.g. a permuted order).
    """
    pattern = "l p two -> 1 l 1 p two" if freqs_cis.ndim == 3 else "b l p two -> b l 1 p two"
    rot = _as_complex(rearrange(freqs_cis.float(), pattern))  # (1|B, L, 1, K/2): cos + i sin
    pairs = _as_complex(rearrange(x.float(), "b l h (p two) -> b l h p two", two=2))  # (B, L, H, K/2)
    out = torch.view_as_real(pairs * rot)  # (B, L, H, K/2, 2)
    return rearrange(out, "b l h p two -> b l h (p two)").type_as(x)


def _as_complex(t: torch.Tensor) -> torch.Tensor:
    """View (..., 2) float32 as complex64, copying only when the strides do not allow a view."""
    if t.stride(-1) != 1 or t.storage_offset() % 2 or any(s % 2 for s in t.stride()[:-1]):
        t = t.contiguous()
    return torch.view_as_complex(t)


# --- normalisation and feed-forward --------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)  # (..., D)
        return normed * self.weight


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), bias-free, dropout on the output."""

    def __init__(self, dim: int, *, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden_dim = hidden_dim or ffn_hidden_dim(dim)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # (B, L, D)


# --- attention with an optional preallocated KV cache ----------------------------------


class KVCache:
    """Preallocated keys and values of one attention layer, (B, H, S_max, K) each.

    `update` writes the new keys/values in place and returns views of the filled prefix,
    so decoding one token costs one copy per layer and no concatenation.
    """

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, L, K) at [start_pos, start_pos + L); return keys/values [0, start_pos + L)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, S, K) views


class StaticKVCache(KVCache):
    """A KVCache of one fixed shape for captured decode steps: `update` takes the slots as a tensor.

    Keys/values go to the slots (L,) int64 with index_copy_ and `update` returns the whole
    (B, H, S_max, K) buffers, so every step has the same shapes whatever it writes; the caller
    hides the slots a query may not see (unwritten ones included) with a boolean mask. Zero
    initialised, so a slot that is never written holds finite values.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.k.zero_()
        self.v.zero_()

    def update(self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, K) at slots start_pos (L,) int64 (an int: from start_pos on); return all slots."""
        if not isinstance(start_pos, torch.Tensor):
            start_pos = torch.arange(start_pos, start_pos + k.shape[2], device=k.device)
        self.k.index_copy_(2, start_pos, k)
        self.v.index_copy_(2, start_pos, v)
        return self.k, self.v  # (B, H, S_max, K)

    def keep_batch(self, n: int) -> StaticKVCache:
        """A cache over the first n samples, sharing this one's memory."""
        view = object.__new__(StaticKVCache)
        view.k, view.v, view.max_len = self.k[:n], self.v[:n], self.max_len
        return view


class StaticCaches:
    """The static-shape decode state of a stack of attention layers: one StaticKVCache per layer and
    `written`, the slots that hold keys of the current decode (every layer writes the same slots).

    A decode calls `reset()` once (eagerly), then each step calls `visible(slots, allowed)` before
    its layers write at `slots`: it marks them written and returns allowed & written, the boolean
    attention mask (L, S_max) of the step. Every query must see at least one written slot (its
    own, or the class token's), so no mask row is all False. `slot_ids` (S_max,) is
    arange(S_max), for masks built from positions.
    """

    def __init__(self, n_layers: int, batch_size: int, n_head: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        kw = dict(dtype=dtype, device=device)
        self.layers = [StaticKVCache(batch_size, n_head, max_len, head_dim, **kw) for _ in range(n_layers)]
        self.written = torch.zeros(max_len, dtype=torch.bool, device=device)  # (S_max,)
        self.slot_ids = torch.arange(max_len, device=device)  # (S_max,)
        self.max_len = max_len

    def reset(self) -> None:
        """Start a decode: no slot is written, and all hold zeros.

        The mask alone gives an unwritten slot weight exactly 0, but 0 * inf or 0 * NaN in the
        weighted sum of values is NaN: zeroing keeps a previous decode's non-finite keys out.
        """
        self.written.zero_()
        for cache in self.layers:
            cache.k.zero_()
            cache.v.zero_()

    def visible(self, slots: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Mark slots (L,) written; -> allowed & written, broadcastable to (L, S_max) (allowed None = all)."""
        self.written.index_fill_(0, slots, True)
        return self.written[None] if allowed is None else allowed & self.written  # (1 | L, S_max)

    def keep_batch(self, n: int) -> StaticCaches:
        """The same state over the first n samples (views; `written` is shared)."""
        view = object.__new__(StaticCaches)
        view.layers = [cache.keep_batch(n) for cache in self.layers]
        view.written, view.slot_ids, view.max_len = self.written, self.slot_ids, self.max_len
        return view


class Attention(nn.Module):
    """Multi-head self-attention: fused bias-free qkv, RoPE on q and k, SDPA, resid dropout."""

    def __init__(self, dim: int, n_head: int, *, resid_dropout: float = 0.0):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: [q | k | v], LlamaGen's layout
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        causal: bool = True,
        kv_cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D).

        attn_mask: boolean, True = attend, broadcastable to (B, H, L, S); overrides `causal`.
        causal: without a mask, query i sees keys <= its own position (else all keys).
        kv_cache/start_pos: x holds positions [start_pos, start_pos + L); keys/values of the
        earlier positions come from the cache. A StaticKVCache takes start_pos as the slots (L,)
        int64 and returns all its slots: pass the mask that hides the ones not to be seen.
        """
        qk, v = self.wqkv(x).split([2 * self.n_head * self.head_dim, self.n_head * self.head_dim], dim=-1)
        # q and k are rotated together: 2H heads, the first H of them q's
        qk = apply_rotary_emb(rearrange(qk, "b l (h k) -> b l h k", k=self.head_dim), freqs_cis)  # (B, L, 2H, K)
        q, k = rearrange(qk, "b l (two h) k -> two b h l k", two=2)  # (B, H, L, K) each
        v = rearrange(v, "b l (h k) -> b h l k", k=self.head_dim)  # (B, H, L, K)
        if kv_cache is not None:
            k, v = kv_cache.update(start_pos, k, v)  # (B, H, S, K), S = start_pos + L (static: S_max)
        n_q, n_k = q.shape[2], k.shape[2]
        is_causal = False
        if attn_mask is None and causal and n_q > 1:
            if n_q == n_k:
                is_causal = True
            else:  # a chunk after a cached prefix: SDPA's is_causal would align top-left
                attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, L, K)
        out = rearrange(out, "b h l k -> b l (h k)")  # (B, L, D)
        return self.resid_dropout(self.wo(out))


class PreNormBlock(nn.Module):
    """Pre-norm LlamaGen block around any attention: x + attn(norm(x), ...), then h + ffn(norm(h))."""

    def __init__(self, attention: nn.Module, dim: int, *, ffn_dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.attention = attention
        self.feed_forward = FeedForward(dim, dropout=ffn_dropout)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); args and kwargs go to the attention after x's norm."""
        h = x + self.attention(self.attention_norm(x), *args, **kwargs)  # (B, L, D)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, L, D)


class TransformerBlock(PreNormBlock):
    """The LlamaGen block: `Attention` (self-attention, optional KV cache) in a PreNormBlock.

    Called as block(x (B, L, D), freqs_cis, *, attn_mask, causal, kv_cache, start_pos), the
    keywords of `Attention.forward`.
    """

    def __init__(
        self,
        dim: int,
        n_head: int,
        *,
        resid_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        attention = Attention(dim, n_head, resid_dropout=resid_dropout)
        super().__init__(attention, dim, ffn_dropout=ffn_dropout, norm_eps=norm_eps)


# --- class conditioning ----------------------------------------------------------------


class LabelEmbedder(nn.Module):
    """Class ids -> one (B, 1, D) condition token; row `num_classes` is the null class for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def class_rows(self) -> dict[str, tuple[int, int]]:
        """Rows [0, num_classes) of the table are per class; the null row stays last."""
        return {"embedding_table.weight": (0, self.num_classes)}

    @property
    def null_id(self) -> int:
        return self.num_classes

    def token_drop(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null id with probability dropout_prob (B,) -> (B,)."""
        return drop_labels(labels, self.dropout_prob, self.null_id, generator)

    def forward(self, labels: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels, generator)
        return rearrange(self.embedding_table(labels), "b d -> b 1 d")  # (B, 1, D)


def drop_labels(labels: torch.Tensor, prob: float, null_id: int, generator: torch.Generator | None) -> torch.Tensor:
    """CFG's label dropout: each id (B,) becomes null_id with probability prob, one uniform draw per row."""
    drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, null_id), labels)


# --- initialisation and derived tables ---------------------------------------------------


def init_llamagen_weights_(module: nn.Module, std: float = INIT_STD) -> None:
    """N(0, std) Linear/Embedding weights, zero biases, unit RMSNorm gains (in place).

    Works on meta tensors (nothing is materialised), and after `to_empty` it fully
    re-initialises every parameter. Heads that must start at zero are zeroed by the family.
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()


class LlamaGenMixin:
    """Mixin for a family model on this substrate: the GPT trunk, its derived tables, one initialize_weights.

    `build_trunk` adds LlamaGen GPT's modules under their official names, in LlamaGen's order
    (cls_embedding, tok_embeddings, tok_dropout, layers, norm, output). The tables (the 2D-RoPE
    `freqs_cis`, plus whatever `_tables` adds) are non-persistent buffers: not in checkpoints
    (like LlamaGen's plain attribute), and rebuilt in float32 on their device after every move,
    cast or to_empty (`_apply`), since a cast would round the cos/sin table and to_empty leaves
    it garbage. The config needs the ARConfig fields. Mix in before the nn.Module base:
    `class ARModel(LlamaGenMixin, GenerativeModel)`.
    """

    config: Any
    zero_init: ClassVar[tuple[str, ...]] = ("output",)  # Linear heads that start at zero

    def build_trunk(self, n_blocks: int, *, tok_embeddings: nn.Embedding | None = None) -> None:
        """Add the class/token embeddings, n_blocks TransformerBlocks, the final norm and the V-row head."""
        c = self.config
        self.cls_embedding = LabelEmbedder(c.num_classes, c.dim, c.class_dropout)
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim) if tok_embeddings is None else tok_embeddings
        self.tok_dropout = nn.Dropout(c.token_dropout)
        block = dict(resid_dropout=c.resid_dropout, ffn_dropout=c.ffn_dropout, norm_eps=c.norm_eps)
        self.layers = nn.ModuleList(TransformerBlock(c.dim, c.n_head, **block) for _ in range(n_blocks))
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)

    def _embed(
        self, tokens: torch.Tensor, *, labels: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[class token, tokens (B, n)] -> (B, 1 + n, D) input embeddings (class dropout when train)."""
        cond = self.cls_embedding(labels, train=train, generator=generator)  # (B, 1, D)
        return self.tok_dropout(torch.cat([cond, self.tok_embeddings(tokens)], dim=1))  # (B, 1 + n, D)

    def _tables(self, device: torch.device | None) -> dict[str, torch.Tensor]:
        """The derived buffers by name, built on device; families extend it."""
        return {"freqs_cis": self._rope_table(device=device)}

    def _rope_table(self, *, device: torch.device | None) -> torch.Tensor:
        """(1 + G*G, K/2, 2) cos/sin table, float32 (the class token takes the first slot)."""
        c = self.config
        return precompute_freqs_cis_2d(c.grid_size, c.head_dim, c.rope_base, cls_token_num=1, device=device)

    def register_tables(self) -> None:
        """Create the table buffers on the default device (call once in __init__)."""
        for name, table in self._tables(None).items():
            self.register_buffer(name, table, persistent=False)  # type: ignore[attr-defined]

    def _rebuild_tables(self) -> None:
        device = self.freqs_cis.device  # type: ignore[attr-defined]
        for name, table in self._tables(device).items():
            setattr(self, name, table)

    def initialize_weights(self) -> None:
        """LlamaGen init: N(0, 0.02) Linear/Embedding weights, unit norms, zero heads (zero_init), fresh tables."""
        init_llamagen_weights_(self)  # type: ignore[arg-type]
        for name in self.zero_init:
            nn.init.zeros_(getattr(self, name).weight)
        self._rebuild_tables()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)  # type: ignore[misc]
        self._rebuild_tables()
        return self


# --- ViT / DiT pieces (emigm, d2it) ------------------------------------------------------------


class ViTAttention(nn.Module):
    """Multi-head self-attention, fused qkv with bias, attention and projection dropout."""

    def __init__(self, dim: int, n_head: int, *, attn_dropout: float, proj_dropout: float):
        super().__init__()
        self.n_head, self.attn_dropout = n_head, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.n_head)
        drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, H, L, E)
        return self.proj_drop(self.proj(rearrange(out, "b h l e -> b l (h e)")))  # (B, L, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) step labels t (M,) -> (M, dim) [cos | sin], always float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (M, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (M, W)
